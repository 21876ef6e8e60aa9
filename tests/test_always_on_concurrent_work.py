"""A request whose work runs in several places at once (fan-out to worker threads, the
event loop busy while a worker runs) gets every place's time, in both modes.

The always-on sampler kept one state per request at each tick: with two of its jobs on worker
threads, the job registered last hid the other (a 100 ms job showed a few ms), and a
worker job hid the request's own CPU work on the event loop meanwhile.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Iterator

import anyio
import pytest
from pyinstrument.session import Session
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from otelprof_middleware import ProfilingMiddleware, testing
from otelprof_middleware.stores import MemoryStore

from .helpers import make_provider, marker_alpha, marker_beta, until_it_holds

WORK = 0.1  # seconds each marker spins (wall clock)


@pytest.fixture(autouse=True)
def _own_sampler() -> Iterator[None]:
    testing.reset()
    yield
    testing.reset()


def _seconds_under(session: Session, function: str) -> float:
    """The time of the samples whose stack holds ``function``."""
    return sum(
        seconds
        for stack, seconds in session.frame_records
        if any(frame.split("\x00", 1)[0] == function for frame in stack)
    )


async def fan_out(request: Request) -> JSONResponse:
    """Two jobs on worker threads at once."""
    await asyncio.gather(
        asyncio.to_thread(marker_alpha, WORK), run_in_threadpool(marker_beta, WORK)
    )
    return JSONResponse({"ok": True})


async def loop_and_worker(request: Request) -> JSONResponse:
    """CPU work on the event loop while a job runs on a worker thread."""

    async def on_loop() -> None:
        await asyncio.sleep(0.001)  # (the worker's job starts first)
        marker_alpha(WORK)

    async with anyio.create_task_group() as group:
        group.start_soon(anyio.to_thread.run_sync, marker_beta, WORK)
        group.start_soon(on_loop)
    return JSONResponse({"ok": True})


def _median_seconds_under_markers(path: str, mode: str) -> dict[str, float]:
    """Five profiled requests to ``path``: each marker's median seconds in their profiles."""
    testing.reset()
    store = MemoryStore()
    middleware = ProfilingMiddleware(
        Starlette(routes=[Route("/fan-out", fan_out), Route("/loop-and-worker", loop_and_worker)]),
        tracer_provider=make_provider()[0],
        profile_store=store,
        mode=mode,
        min_duration_ms=0,
    )
    try:
        with TestClient(middleware) as client:
            for _ in range(5):
                assert client.get(path).json() == {"ok": True}
        assert middleware.core.writer.flush(10)
        summaries = store.list()
        assert len(summaries) == 5
        sessions = [store.get(summary.trace_id)[0].session() for summary in summaries]
        return {
            function: statistics.median(_seconds_under(session, function) for session in sessions)
            for function in ("marker_alpha", "marker_beta")
        }
    finally:
        middleware.core.writer.close()


@pytest.mark.parametrize("mode", ["always_on", "hook"])
@pytest.mark.parametrize("path", ["/fan-out", "/loop-and-worker"])
def test_every_place_a_request_runs_at_once_is_credited(path: str, mode: str) -> None:
    # Each marker spun WORK seconds of wall clock: about that is seen, and the hidden place
    # got 0-37% in every run before the fix. Two threads spinning at once starve the
    # sampler thread of the GIL (CPython hands it between the two; ticks 30-230 ms apart
    # where 5 ms were asked), and a tick credits at most 2 intervals of its GIL wait at a
    # change of state: so now and then one run of five sees much less of the loop's work
    # (a median of 23% once in a CI run, the same before and after the last sampler
    # changes). The hidden place fails every run.

    def attempt() -> str | None:
        seen = _median_seconds_under_markers(path, mode)
        short = {function: seconds for function, seconds in seen.items() if seconds <= 0.4 * WORK}
        return f"medians under 40% of {WORK} s: {short}" if short else None

    until_it_holds(attempt)


async def gathered_jobs(request: Request) -> JSONResponse:
    await asyncio.gather(
        asyncio.to_thread(marker_alpha, 0.03), asyncio.to_thread(marker_beta, 0.03)
    )
    return JSONResponse({"ok": True})


def test_jobs_a_child_task_submits_are_under_the_stack_that_created_it() -> None:
    """Hook mode puts a child task's frames under the stack that created it (here the
    endpoint's ``gather``); the jobs the child submits to worker threads went under the
    child's bare frames instead (the loop's, then the hook's), apart from the endpoint."""
    session = _hook_profile_of_one_request(Starlette(routes=[Route("/gathered", gathered_jobs)]))
    for function in ("marker_alpha", "marker_beta"):
        stacks = _stacks_holding(session, function)
        assert stacks, function
        for names in stacks:
            assert "gathered_jobs" in names, names


def _hook_profile_of_one_request(app: Starlette) -> Session:
    """The hook-mode profile of one ``GET /gathered`` to ``app``."""
    store = MemoryStore()
    middleware = ProfilingMiddleware(
        app,
        tracer_provider=make_provider()[0],
        profile_store=store,
        mode="hook",
        min_duration_ms=0,
    )
    try:
        with TestClient(middleware) as client:
            assert client.get("/gathered").json() == {"ok": True}
        assert middleware.core.writer.flush(10)
        [summary] = store.list()
        return store.get(summary.trace_id)[0].session()
    finally:
        middleware.core.writer.close()


def _stacks_holding(session: Session, function: str) -> list[list[str]]:
    """The function names of each sampled stack that holds ``function``, root first."""
    stacks = ([frame.split("\x00", 1)[0] for frame in stack] for stack, _ in session.frame_records)
    return [names for names in stacks if function in names]


class _Passing(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)


async def gathered_on_the_loop(request: Request) -> JSONResponse:
    async def child() -> None:
        marker_alpha(0.02)

    await asyncio.gather(child(), asyncio.to_thread(marker_beta, 0.02))
    return JSONResponse({"ok": True})


def test_a_grandchild_task_is_under_the_stack_that_created_it() -> None:
    """With a ``BaseHTTPMiddleware`` inside ours, the app runs in a child task of the
    request (``call_next``); the tasks the endpoint creates there are grandchildren.
    Their creation stack was taken from the child's bare frames (the loop's, then the
    hook's), so the endpoint's work formed a tree apart from the request's, with no
    middleware above it."""
    session = _hook_profile_of_one_request(
        Starlette(
            routes=[Route("/gathered", gathered_on_the_loop)],
            middleware=[Middleware(_Passing)],
        )
    )
    for function in ("marker_alpha", "marker_beta"):
        stacks = _stacks_holding(session, function)
        assert stacks, function
        for names in stacks:
            assert {"dispatch", "gathered_on_the_loop"} <= set(names), names
