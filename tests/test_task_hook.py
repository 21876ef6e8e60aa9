"""Hook mode on an event loop: the hook runs only in the profiled request's own steps.

Concurrent requests share one event loop here (httpx's ASGI transport runs the app in
the test's loop), as they do under uvicorn.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pyinstrument.frame import Frame
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from otelprof_middleware import ProfilingMiddleware, counters
from otelprof_middleware.stores import MemoryStore

from .helpers import marker_alpha, marker_beta


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def hooked(
    otel: tuple[TracerProvider, InMemorySpanExporter],
    store: MemoryStore,
    closing: list[ProfilingMiddleware],
) -> Callable[..., ProfilingMiddleware]:
    """Wraps an app in hook mode, every request profiled and kept, into ``store``."""

    def wrap(app: Any, **settings: Any) -> ProfilingMiddleware:
        settings = {"mode": "hook", "sample_rate": 1.0, "min_duration_ms": 0, **settings}
        middleware = ProfilingMiddleware(
            app, tracer_provider=otel[0], profile_store=store, **settings
        )
        closing.append(middleware)
        return middleware

    return wrap


def _client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


def _session_of(store: MemoryStore, app: ProfilingMiddleware, route: str) -> Frame:
    assert app.core.writer.flush(10)
    [summary] = [s for s in store.list() if s.route == route]
    [record] = store.get(summary.trace_id)
    root = record.session().root_frame()
    assert root is not None
    return root


def _frames(root: Frame, function: str) -> list[Frame]:
    found = [root] if root.function == function else []
    for child in root.children:
        found.extend(_frames(child, function))
    return found


def _ancestors(frame: Frame) -> list[str]:
    names = []
    parent = frame.parent
    while parent is not None:
        names.append(parent.function)
        parent = parent.parent
    return names


@pytest.mark.anyio
async def test_an_unprofiled_request_runs_without_the_hook(
    hooked: Callable[..., ProfilingMiddleware], store: MemoryStore
) -> None:
    """While a profiled request is in flight on the loop, the others run hook-free."""
    profiled_waits = asyncio.Event()
    others_done = asyncio.Event()
    hooks_seen: list[object] = []

    async def slow(request: Request) -> JSONResponse:
        marker_alpha(0.01)
        profiled_waits.set()
        await others_done.wait()  # in flight while the other requests run
        marker_alpha(0.01)
        return JSONResponse({"slow": True})

    async def plain(request: Request) -> JSONResponse:
        await profiled_waits.wait()
        for _ in range(3):
            hooks_seen.append(sys.getprofile())
            marker_beta(0.002)
            await asyncio.sleep(0)
        return JSONResponse({"plain": True})

    app = hooked(
        Starlette(routes=[Route("/slow", slow), Route("/plain", plain)]), exclude_paths=["/plain"]
    )
    async with _client(app) as client:
        slow_call = asyncio.ensure_future(client.get("/slow"))
        plain_calls = [asyncio.ensure_future(client.get("/plain")) for _ in range(4)]
        for response in await asyncio.gather(*plain_calls):
            assert response.json() == {"plain": True}
        others_done.set()
        assert (await slow_call).json() == {"slow": True}
    assert len(hooks_seen) == 12
    assert hooks_seen == [None] * 12, "an unprofiled request ran under the profiler's hook"
    root = _session_of(store, app, "/slow")
    alpha = sum(f.time for f in _frames(root, "marker_alpha"))
    assert alpha >= 0.015, alpha
    assert not _frames(root, "marker_beta"), "another request's work is in the profile"
    # Its wait for the others is an [await] under its own endpoint.
    waits = [f for f in _frames(root, "[await]") if "slow" in _ancestors(f)]
    assert sum(f.time for f in waits) > 0.005


@pytest.mark.anyio
async def test_gather_children_and_their_waits_stay_under_the_endpoint(
    hooked: Callable[..., ProfilingMiddleware], store: MemoryStore
) -> None:
    """asyncio.gather: the children's work and the wait both sit under the endpoint."""

    async def child() -> None:
        marker_beta(0.01)
        await asyncio.sleep(0.03)

    async def fan_out(request: Request) -> JSONResponse:
        await asyncio.gather(child(), child())
        return JSONResponse({"ok": True})

    app = hooked(Starlette(routes=[Route("/fan-out", fan_out)]))
    async with _client(app) as client:
        assert (await client.get("/fan-out")).json() == {"ok": True}
    root = _session_of(store, app, "/fan-out")
    markers = _frames(root, "marker_beta")
    assert sum(f.time for f in markers) >= 0.015
    assert all("fan_out" in _ancestors(f) for f in markers), "child work not under endpoint"
    waits = _frames(root, "[await]")
    under = sum(f.time for f in waits if "fan_out" in _ancestors(f))
    elsewhere = sum(f.time for f in waits if "fan_out" not in _ancestors(f))
    assert under >= 0.025, (under, elsewhere)  # ~30 ms: the sleeps, less the markers
    assert elsewhere < 0.005, (under, elsewhere)
    # Nothing counted twice: the tree holds no more time than the request took.
    [summary] = store.list()
    assert root.time <= summary.duration_ms / 1000 * 1.05, (root.time, summary.duration_ms)


@pytest.mark.anyio
async def test_base_http_middleware_child_task_is_profiled(
    hooked: Callable[..., ProfilingMiddleware], store: MemoryStore
) -> None:
    """Starlette's BaseHTTPMiddleware runs the endpoint in a task of its own."""

    class Passing(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
            return await call_next(request)

    async def work(request: Request) -> JSONResponse:
        marker_alpha(0.02)
        await asyncio.sleep(0.01)
        return JSONResponse({"ok": True})

    app = hooked(Starlette(routes=[Route("/work", work)], middleware=[Middleware(Passing)]))
    async with _client(app) as client:
        for _ in range(3):
            assert (await client.get("/work")).json() == {"ok": True}
    assert app.core.writer.flush(10)
    for summary in store.list():
        [record] = store.get(summary.trace_id)
        root = record.session().root_frame()
        assert root is not None
        alpha = sum(f.time for f in _frames(root, "marker_alpha"))
        assert alpha >= 0.015, alpha
        assert all("work" in _ancestors(f) for f in _frames(root, "marker_alpha"))
    assert counters().get("failed.sample", 0) == 0


@pytest.mark.anyio
async def test_another_profilers_hook_is_left_alone(
    hooked: Callable[..., ProfilingMiddleware], store: MemoryStore
) -> None:
    """A hook that is not ours (a debugger, another profiler) is neither replaced nor
    removed by the request's steps."""
    calls: list[str] = []

    def theirs(frame: Any, event: str, arg: Any) -> None:
        calls.append(event)

    async def endpoint(request: Request) -> JSONResponse:
        marker_alpha(0.002)
        await asyncio.sleep(0)
        return JSONResponse({"ok": True})

    app = hooked(Starlette(routes=[Route("/x", endpoint)]))
    async with _client(app) as client:
        sys.setprofile(theirs)
        try:
            response = await client.get("/x")
            still_theirs = sys.getprofile() is theirs
        finally:
            sys.setprofile(None)
    assert response.json() == {"ok": True}
    assert still_theirs
    assert calls, "the other profiler stopped seeing events"
    assert counters().get("skipped.foreign_hook", 0) >= 1


@pytest.mark.anyio
@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory: 3.12+")
async def test_eager_child_tasks_are_profiled_under_the_endpoint(
    hooked: Callable[..., ProfilingMiddleware], store: MemoryStore
) -> None:
    """With eager tasks a child's first step runs inside its parent's step."""
    loop = asyncio.get_running_loop()
    previous = loop.get_task_factory()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]

    async def child() -> None:
        marker_beta(0.01)  # runs eagerly, inside the parent's step
        await asyncio.sleep(0.01)
        marker_beta(0.005)  # a later step of its own

    async def fan_out(request: Request) -> JSONResponse:
        await asyncio.gather(child(), child())
        return JSONResponse({"ok": True})

    app = hooked(Starlette(routes=[Route("/fan-out", fan_out)]))
    try:
        async with _client(app) as client:
            assert (await client.get("/fan-out")).json() == {"ok": True}
    finally:
        loop.set_task_factory(previous)
    root = _session_of(store, app, "/fan-out")
    markers = _frames(root, "marker_beta")
    assert sum(f.time for f in markers) >= 0.022
    assert all("fan_out" in _ancestors(f) for f in markers)


@pytest.mark.anyio
async def test_a_profiler_of_every_thread_is_left_alone(
    hooked: Callable[..., ProfilingMiddleware], store: MemoryStore
) -> None:
    """yappi and memray profile every thread through ``threading.setprofile`` and a C
    profile function that ``sys.getprofile()`` does not show: while such a tool runs, no
    step (and no worker-thread job) installs a hook of ours, which would replace theirs and
    then remove it."""
    hooks: list[object] = []

    def job() -> None:
        hooks.append(sys.getprofile())

    async def endpoint(request: Request) -> JSONResponse:
        hooks.append(sys.getprofile())
        await asyncio.sleep(0)
        await asyncio.get_running_loop().run_in_executor(None, job)
        return JSONResponse({"ok": True})

    app = hooked(Starlette(routes=[Route("/x", endpoint)]))
    async with _client(app) as client:
        threading.setprofile(_every_thread)
        try:
            response = await client.get("/x")
        finally:
            threading.setprofile(None)  # type: ignore[arg-type]
    assert response.json() == {"ok": True}
    assert hooks == [None, None], "a hook was installed over the other profiler's"
    assert counters().get("skipped.foreign_hook", 0) >= 1


def _every_thread(frame: Any, event: str, arg: Any) -> None:
    sys.setprofile(None)  # (as yappi's does, handing over to a C function)


def _streaming_app() -> Starlette:
    async def body() -> AsyncIterator[bytes]:
        for chunk in (b"a", b"b"):
            await asyncio.sleep(0)
            marker_beta(0.005)
            yield chunk

    async def stream(request: Request) -> StreamingResponse:
        return StreamingResponse(body())  # streams from an anyio task group's child task

    return Starlette(routes=[Route("/stream", stream)])


@pytest.mark.anyio
@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory: 3.12+")
async def test_anyio_task_groups_work_on_an_eager_loop(
    hooked: Callable[..., ProfilingMiddleware], store: MemoryStore
) -> None:
    """anyio recognises asyncio's eager task factory by its code, and creates its task
    group's tasks lazily with the constructor it closes over; wrapped in a factory it
    does not recognise, they start eagerly and Starlette's StreamingResponse failed
    ("Attempted to exit a cancel scope that isn't the current tasks's current cancel
    scope"). The loop's factory keeps that shape with ours inside."""
    loop = asyncio.get_running_loop()
    previous = loop.get_task_factory()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]
    app = hooked(_streaming_app())
    try:
        async with _client(app) as client:
            for _ in range(2):
                response = await client.get("/stream")
                assert response.text == "ab"
        factory = loop.get_task_factory()
        assert getattr(factory, "__code__", None) is asyncio.eager_task_factory.__code__  # type: ignore[attr-defined,unused-ignore]
    finally:
        loop.set_task_factory(previous)
    assert app.core.writer.flush(10)
    summaries = [s for s in store.list() if s.route == "/stream"]
    assert len(summaries) == 2
    [record] = store.get(summaries[0].trace_id)
    root = record.session().root_frame()
    assert root is not None and _frames(root, "marker_beta")  # the child task's, hooked
