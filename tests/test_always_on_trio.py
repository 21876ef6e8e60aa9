"""Always-on mode under trio (hypercorn ``-k trio``, anyio's trio backend).

The always-on registry tells concurrent requests apart by their asyncio task, or else by
their thread. trio runs every task of a loop on one thread, so requests registered by
thread overwrote one another: under ``hypercorn -k trio``, request A (a 300 ms marker
after a short sleep) had no sample of it, and request B, started while A slept, had all of
A's marker in its profile. trio requests are now not profiled in always-on mode (logged
and counted once); triggered and ``hook_sample_rate`` requests still get the hook, whose
profiles do not mix.
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from otelprof_middleware import Config, ProfilingMiddleware, counters, testing
from otelprof_middleware._request import RequestFacts
from otelprof_middleware.profiling._engine import ProfilerCore
from otelprof_middleware.stores import MemoryStore

from .helpers import make_provider, marker_alpha, marker_beta, text_of


@pytest.fixture(autouse=True)
def _own_sampler() -> Iterator[None]:
    testing.reset()
    yield
    testing.reset()


def _fake_trio(in_task: bool) -> types.ModuleType:
    """A ``trio`` module whose ``lowlevel.current_task()`` says whether a task runs here."""

    def current_task() -> object:
        if not in_task:
            raise RuntimeError("must be called from async context")
        return object()

    trio = types.ModuleType("trio")
    trio.lowlevel = types.SimpleNamespace(current_task=current_task)  # type: ignore[attr-defined]
    return trio


def _start_one(core: ProfilerCore) -> object:
    tracer = make_provider()[0].get_tracer("t")
    with tracer.start_as_current_span("GET") as span:
        active = core.start(span, span.get_span_context(), RequestFacts(method="GET"))
        if active is not None:
            core.finish(active, status_code=200, route="/r")
            core.detach(active)
        return active


def test_a_request_in_a_trio_task_gets_no_always_on_profile(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    core = ProfilerCore(Config.load({}, mode="always_on"), store=MemoryStore())
    monkeypatch.setitem(sys.modules, "trio", _fake_trio(in_task=True))
    with caplog.at_level(logging.WARNING, logger="otelprof_middleware"):
        assert _start_one(core) is None
        assert _start_one(core) is None
    assert counters().get("disabled.always_on_trio") == 1
    warnings = [r for r in caplog.records if "trio" in r.getMessage()]
    assert len(warnings) == 1 and "mode='hook'" in warnings[0].getMessage()
    core.writer.close()


def test_the_trio_warning_is_said_once_per_process_not_per_middleware(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A test suite that builds an app per test (FastAPI's own did: 211 warnings) hears
    # it once; each middleware still counts that it profiles nothing here.
    cores = [ProfilerCore(Config.load({}, mode="always_on"), store=MemoryStore()) for _ in "ab"]
    monkeypatch.setitem(sys.modules, "trio", _fake_trio(in_task=True))
    with caplog.at_level(logging.WARNING, logger="otelprof_middleware"):
        for core in cores:
            assert _start_one(core) is None
    assert counters().get("disabled.always_on_trio") == 2
    assert len([r for r in caplog.records if "trio" in r.getMessage()]) == 1
    for core in cores:
        core.writer.close()


@pytest.mark.parametrize("patcher", ["gevent", "eventlet"])
def test_the_green_threads_warning_is_said_once_per_process(
    patcher: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # (A stand-in for the patcher's "is threading patched?" question: monkey-patching
    # this process for real would turn every later test's threads into greenlets;
    # tests/e2e/test_green_threads.py runs real gevent workers.)
    module, check = {
        "gevent": ("gevent.monkey", "is_module_patched"),
        "eventlet": ("eventlet.patcher", "is_monkey_patched"),
    }[patcher]
    monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(**{check: lambda target: True}))
    cores = [ProfilerCore(Config.load({}, mode="always_on"), store=MemoryStore()) for _ in "ab"]
    with caplog.at_level(logging.WARNING, logger="otelprof_middleware"):
        for core in cores:
            assert _start_one(core) is None
            assert _start_one(core) is None
    assert counters().get("disabled.always_on_green_threads") == 2
    said = [r for r in caplog.records if "monkey-patched threading" in r.getMessage()]
    assert len(said) == 1 and said[0].getMessage().startswith(f"otelprof: {patcher} ")
    for core in cores:
        core.writer.close()


def test_trio_imported_but_not_running_here_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    core = ProfilerCore(Config.load({}, mode="always_on"), store=MemoryStore())
    monkeypatch.setitem(sys.modules, "trio", _fake_trio(in_task=False))
    assert _start_one(core) is not None
    assert "disabled.always_on_trio" not in counters()
    core.writer.close()


def _app(mode: str) -> tuple[ProfilingMiddleware, MemoryStore]:
    import anyio

    async def alpha(request: Request) -> JSONResponse:
        await anyio.sleep(0.05)  # beta starts meanwhile
        marker_alpha(0.15)
        return JSONResponse({"endpoint": "alpha"})

    async def beta(request: Request) -> JSONResponse:
        await anyio.sleep(0.3)  # alpha runs its marker meanwhile
        marker_beta(0.02)
        return JSONResponse({"endpoint": "beta"})

    store = MemoryStore()
    middleware = ProfilingMiddleware(
        Starlette(routes=[Route("/alpha", alpha), Route("/beta", beta)]),
        tracer_provider=make_provider()[0],
        profile_store=store,
        mode=mode,
        min_duration_ms=0,
    )
    return middleware, store


async def _alpha_then_beta(app: Any) -> list[int]:
    import anyio
    import httpx

    statuses: list[int] = []
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

        async def get(path: str) -> None:
            statuses.append((await client.get(path)).status_code)

        async with anyio.create_task_group() as group:
            group.start_soon(get, "/alpha")
            await anyio.sleep(0.01)
            group.start_soon(get, "/beta")
    return statuses


@pytest.mark.parametrize("mode", ["always_on", "hook"])
def test_concurrent_trio_requests_never_mix(mode: str) -> None:
    pytest.importorskip("trio")
    import anyio

    middleware, store = _app(mode)
    statuses = anyio.run(_alpha_then_beta, middleware, backend="trio")
    assert statuses == [200, 200]
    middleware.core.writer.flush()
    summaries = store.list()
    for summary in summaries:
        text = text_of(store.get(summary.trace_id)[0].session())
        other = "marker_beta" if summary.route == "/alpha" else "marker_alpha"
        assert other not in text, text
    if mode == "always_on":
        assert summaries == []
        assert counters().get("disabled.always_on_trio") == 1
    else:
        assert sorted(s.route for s in summaries) == ["/alpha", "/beta"]
        alpha = next(s for s in summaries if s.route == "/alpha")
        assert "marker_alpha" in text_of(store.get(alpha.trace_id)[0].session())
    middleware.core.writer.close()
