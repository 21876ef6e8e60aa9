from __future__ import annotations

import random

from otelprof_middleware import Config
from otelprof_middleware.profiling._start_policy import StartPolicy


def sampler(**settings: object) -> StartPolicy:
    return StartPolicy(Config.load({}, **settings))


def test_viewer_and_excluded_paths_are_never_profiled() -> None:
    s = sampler(exclude_paths="/health,/static")
    for path in ("/debug/profile", "/debug/profile/abc", "/health", "/static/app.js"):
        assert s.is_excluded(path), path
    for path in ("/", "/healthz", "/debug/profiles", "/api/health"):
        assert not s.is_excluded(path), path


def test_disabled_excludes_everything() -> None:
    assert sampler(enabled=False).is_excluded("/anything")


def test_rate_is_deterministic_by_trace_id_and_close_to_the_rate() -> None:
    s = sampler(sample_rate=0.25)
    rng = random.Random(7)
    ids = [rng.getrandbits(128) for _ in range(20_000)]
    first = [s.is_sampled(i, True) for i in ids]
    assert first == [s.is_sampled(i, True) for i in ids]
    assert 0.23 < sum(first) / len(ids) < 0.27


def test_rate_bounds_and_unrecorded_traces() -> None:
    rng = random.Random(1)
    ids = [rng.getrandbits(128) for _ in range(1000)]
    assert not any(sampler(sample_rate=0).is_sampled(i, True) for i in ids)
    assert all(sampler(sample_rate=1).is_sampled(i, True) for i in ids)
    assert not any(sampler(sample_rate=1).is_sampled(i, False) for i in ids)


def test_same_decision_as_otel_trace_id_ratio_sampler() -> None:
    from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased

    otel = TraceIdRatioBased(0.3)
    ours = sampler(sample_rate=0.3)
    rng = random.Random(3)
    for _ in range(2000):
        trace_id = rng.getrandbits(128)
        expected = otel.should_sample(None, trace_id, "x").decision == Decision.RECORD_AND_SAMPLE
        assert ours.is_sampled(trace_id, True) == expected


def test_trigger_only_when_allowed() -> None:
    local, remote = "127.0.0.1", "198.51.100.7"
    assert not sampler().is_triggered(b"1", local)  # production default: no viewer, no token
    assert sampler(debug_route=True).is_triggered(b"1", local)  # development
    assert sampler(debug_route=True).is_triggered(b"1", "::1")
    assert not sampler(debug_route=True).is_triggered(b"1", remote)  # loopback only, as the viewer
    assert not sampler(debug_route=True).is_triggered(b"1", None)
    assert not sampler(debug_route=True).is_triggered(None, local)
    with_token = sampler(debug_token="s3cret")
    assert with_token.is_triggered(b"s3cret", remote)
    assert not with_token.is_triggered(b"wrong", local)
    assert not with_token.is_triggered(b"1", local)


def test_root_path_excludes_the_root_page_only() -> None:
    """``/`` names the root page (a load balancer's health check), as the docs now say:
    by the sub-path rule alone it would read as every path."""
    s = sampler(exclude_paths="/")
    assert s.is_excluded("/")
    for path in ("/items", "/health/live"):
        assert not s.is_excluded(path), path
