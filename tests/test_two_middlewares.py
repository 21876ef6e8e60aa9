"""Two middlewares in one process with different always-on settings: the first one's are
in force, the conflict is logged naming both, and profiles record the interval used."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from otelprof_middleware import ProfilingMiddleware, testing
from otelprof_middleware.profiling.always_on import always_on_sampler
from otelprof_middleware.stores import MemoryStore

from .helpers import make_provider, marker_alpha


@pytest.fixture(autouse=True)
def _clean_process() -> Iterator[None]:
    testing.reset()
    yield
    testing.reset()


async def work(request: Request) -> PlainTextResponse:
    marker_alpha(0.03)
    return PlainTextResponse("ok")


def _app(interval_ms: float, store: MemoryStore) -> ProfilingMiddleware:
    return ProfilingMiddleware(
        Starlette(routes=[Route("/work", work)]),
        tracer_provider=make_provider()[0],
        profile_store=store,
        mode="always_on",
        sample_rate=1.0,
        min_duration_ms=0,
        always_on_interval_ms=interval_ms,
        always_on_sigprof=False,
    )


def test_the_first_settings_are_in_force_and_the_conflict_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first_store, second_store = MemoryStore(), MemoryStore()
    first = _app(2.0, first_store)
    with TestClient(first) as client:
        assert client.get("/work").text == "ok"
    assert first.core.writer.flush(10)
    assert always_on_sampler(1.0).interval == pytest.approx(0.002)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="otelprof_middleware"):
        second = _app(7.0, second_store)  # logged when built, not at a request
    [warning] = [r for r in caplog.records if "always-on settings" in r.getMessage()]
    message = warning.getMessage()
    assert "always_on_interval_ms=2, always_on_sigprof=False is in force" in message
    assert "always_on_interval_ms=7, always_on_sigprof=False is ignored" in message
    with TestClient(second) as client:
        assert client.get("/work").text == "ok"
    assert second.core.writer.flush(10)
    [summary] = second_store.list()
    assert summary.interval_ms == pytest.approx(2.0)  # the interval actually used
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="otelprof_middleware"):
        _app(7.0, MemoryStore())  # the same conflict again: logged once
        _app(2.0, MemoryStore())  # the settings in force: nothing to say
    assert not [r for r in caplog.records if "always-on settings" in r.getMessage()]
    for app in (first, second):
        app.core.writer.close()


def test_reset_gives_the_next_middleware_its_own_settings() -> None:
    _app(2.0, MemoryStore())
    with TestClient(_app(2.0, MemoryStore())) as client:
        client.get("/work")
    assert always_on_sampler(1.0).interval == pytest.approx(0.002)
    testing.reset()
    store = MemoryStore()
    app = _app(4.0, store)
    with TestClient(app) as client:
        assert client.get("/work").text == "ok"
    assert app.core.writer.flush(10)
    [summary] = store.list()
    assert summary.interval_ms == pytest.approx(4.0)
    app.core.writer.close()


def test_always_on_status_shows_the_process_sampler_and_its_reset() -> None:
    assert testing.always_on_status() == testing.AlwaysOnStatus(
        exists=False,
        interval_ms=None,
        ticks=0,
        sigprof_handler_is_ours=False,
        timer_armed=False,
        thread_alive=False,
        main_loop_driven=False,
    )
    store = MemoryStore()
    app = _app(2.0, store)
    with TestClient(app) as client:  # the app's loop runs on the client's thread
        assert client.get("/work").text == "ok"
    status = testing.always_on_status()
    assert status.exists and status.interval_ms == pytest.approx(2.0)
    assert status.ticks > 0  # 30 ms of work at a 2 ms interval
    assert status.thread_alive  # always_on_sigprof=False: the sampler thread ticks
    assert not (status.sigprof_handler_is_ours or status.timer_armed or status.main_loop_driven)
    assert app.core.writer.flush(10)
    app.core.writer.close()
    testing.reset()
    assert not testing.always_on_status().exists
