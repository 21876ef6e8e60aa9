"""WSGI in always-on mode: the time from the last tick to the app call's return is the
state that tick saw, exactly (as a worker job's end is its own), not half of it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from otelprof_middleware import WSGIProfilingMiddleware
from otelprof_middleware.profiling._request_profile import RequestProfile, current_request
from otelprof_middleware.profiling.always_on import AlwaysOnSampler
from otelprof_middleware.profiling.always_on._ledger import Running
from otelprof_middleware.stores import MemoryStore

from .helpers import make_provider

STACK = ["thread\x00<thread>\x001", "view\x00app.py\x001", "marker\x00app.py\x009"]


@pytest.fixture
def sampler() -> Iterator[AlwaysOnSampler]:
    sampler = AlwaysOnSampler(0.01, sigprof=False)  # never registered with: no thread runs
    yield sampler
    sampler.stop()


def _seen_running(sampler: AlwaysOnSampler, seconds_ago: float) -> RequestProfile:
    request = RequestProfile(0.01, 1000, None, True)
    sampler.ledger.states[request] = Running(list(STACK))  # what the last tick saw
    sampler.last_tick = time.perf_counter() - seconds_ago
    return request


def test_up_to_the_app_return_is_credited_whole(sampler: AlwaysOnSampler) -> None:
    request = _seen_running(sampler, 0.008)
    request.left_app_at = sampler.last_tick + 0.003  # then the server wrote for 5 ms
    sampler.unregister_current(request)
    [(stack, seconds)] = request.records
    assert stack == STACK and seconds == pytest.approx(0.003)


def test_without_the_app_return_half_the_tail_is_credited(sampler: AlwaysOnSampler) -> None:
    request = _seen_running(sampler, 0.008)
    sampler.unregister_current(request)
    [(stack, seconds)] = request.records
    assert stack == STACK and 0.004 <= seconds < 0.008  # half of 8 ms and a little more


def test_a_tick_after_the_app_return_keeps_the_half_rule(sampler: AlwaysOnSampler) -> None:
    request = _seen_running(sampler, 0.008)
    request.left_app_at = sampler.last_tick - 0.001  # the tick saw the server's code
    sampler.unregister_current(request)
    [(_, seconds)] = request.records
    assert 0.004 <= seconds < 0.008


def test_an_implausible_tail_credits_nothing(sampler: AlwaysOnSampler) -> None:
    request = _seen_running(sampler, 1.0)  # ticks long stopped
    request.left_app_at = sampler.last_tick + 0.5
    sampler.unregister_current(request)
    assert request.records == []


def _ignore(*args: Any) -> None:
    return None


def test_the_wsgi_adapter_marks_the_app_return(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set when the app's call returns or raises, before its body is iterated."""
    monkeypatch.setenv("OTELPROF_MODE", "always_on")
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        request = current_request.get()
        assert request is not None
        seen["request"], seen["during_call"] = request, request.left_app_at
        if environ["PATH_INFO"] == "/raise":
            raise RuntimeError("the app failed")
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body() -> Iterator[bytes]:
            seen["during_body"] = request.left_app_at
            yield b"ok"

        return body()

    provider = make_provider()[0]
    middleware = WSGIProfilingMiddleware(app, tracer_provider=provider, profile_store=MemoryStore())
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
    }
    start_response: Any = _ignore
    before = time.perf_counter()
    body = middleware(dict(environ), start_response)
    assert b"".join(body) == b"ok"
    body.close()  # type: ignore[attr-defined]
    assert seen["during_call"] is None
    assert before < seen["during_body"] < time.perf_counter()
    with pytest.raises(RuntimeError):
        middleware(dict(environ, PATH_INFO="/raise"), start_response)
    assert seen["request"].left_app_at is not None
