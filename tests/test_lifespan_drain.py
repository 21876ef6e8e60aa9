"""At the end of the ASGI lifespan, what the writer holds is written before the server
is told the app has shut down (uvicorn then re-raises SIGTERM: no atexit runs)."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Sequence
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from otelprof_middleware import ProfileRecord, ProfilingMiddleware, testing
from otelprof_middleware._failsafe import snapshot
from otelprof_middleware.stores import MemoryStore

from .helpers import drive, http_scope, make_provider, marker_alpha, slow_writes


async def work(request: Request) -> PlainTextResponse:
    marker_alpha(0.005)
    return PlainTextResponse("done")


def keeping_every_profile(store: MemoryStore) -> ProfilingMiddleware:
    """``/work`` behind the middleware, every request profiled and kept into ``store``."""
    return ProfilingMiddleware(
        Starlette(routes=[Route("/work", work)]),
        tracer_provider=make_provider()[0],
        profile_store=store,
        sample_rate=1.0,
        min_duration_ms=0,
    )


@pytest.mark.anyio
async def test_queued_profiles_are_written_before_shutdown_completes() -> None:
    store = slow_writes(MemoryStore)()  # writes take 0.3 s
    app = keeping_every_profile(store)
    lifespan_in: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    lifespan_out: list[dict[str, Any]] = []
    stored_when_done: list[int] = []

    async def lifespan_send(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.shutdown.complete":
            stored_when_done.append(len(store.list()))
        lifespan_out.append(message)

    lifespan = asyncio.ensure_future(
        app({"type": "lifespan", "asgi": {"version": "3.0"}}, lifespan_in.get, lifespan_send)
    )
    await lifespan_in.put({"type": "lifespan.startup"})
    for _ in range(3):  # three kept profiles, queued behind the slow store
        scope = http_scope("/work", client=("127.0.0.1", 1234), server=("127.0.0.1", 8000))
        sent = await drive(app, scope)
        assert sent[-1]["body"] == b"done"
    assert len(store.list()) < 3  # the writer is still busy
    await lifespan_in.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(lifespan, 10)
    assert [m["type"] for m in lifespan_out] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert stored_when_done == [3], "profiles were still queued when the app reported shutdown"
    app.core.writer.close()


class StuckStore(MemoryStore):
    """A real memory store whose writes wait until ``release`` is set (a locked file)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def put(self, record: ProfileRecord) -> None:
        self.release.wait(10)
        super().put(record)

    def put_many(self, records: Sequence[ProfileRecord]) -> None:
        self.release.wait(10)
        super().put_many(records)


@pytest.mark.anyio
async def test_profiles_a_stuck_store_holds_at_shutdown_are_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # uvicorn ends the process right after the lifespan: profiles still waiting for the
    # store are lost then, and must not be lost without a word.
    testing.reset()
    store = StuckStore()
    app = keeping_every_profile(store)
    lifespan_in: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def lifespan_send(message: dict[str, Any]) -> None:
        return None

    lifespan = asyncio.ensure_future(
        app({"type": "lifespan", "asgi": {"version": "3.0"}}, lifespan_in.get, lifespan_send)
    )
    await lifespan_in.put({"type": "lifespan.startup"})
    for _ in range(4):  # the first is taken by the writer (stuck in put), three wait
        scope = http_scope("/work", client=("127.0.0.1", 1234), server=("127.0.0.1", 8000))
        await drive(app, scope)
        await asyncio.sleep(0.05)
    try:
        with caplog.at_level(logging.WARNING, logger="otelprof_middleware"):
            await lifespan_in.put({"type": "lifespan.shutdown"})
            await asyncio.wait_for(lifespan, 10)
        assert snapshot().get("unwritten.shutdown") == 3
        assert "at shutdown, 3 profiles were still waiting for the store" in caplog.text
    finally:
        store.release.set()
    app.core.writer.close()
    assert len(store.list()) == 4  # still queued: a process that goes on writes them


@pytest.mark.anyio
async def test_the_always_on_timer_stops_when_the_lifespan_ends(package_defaults: None) -> None:
    """The loop closes right after the lifespan ends, and asyncio closes its self-pipe
    before it hands back the signal wakeup fd: a SIGPROF in between is reported as an
    unraisable exception. So the timer stops at the lifespan's end, not after the loop's
    idle ticks (which a closed loop never runs)."""
    previous = signal.getsignal(signal.SIGPROF)  # (an earlier test's may be there)
    testing.reset()  # the process's sampler afresh, its timer disarmed
    signal.setitimer(signal.ITIMER_PROF, 0)
    signal.signal(signal.SIGPROF, signal.SIG_DFL)  # free for the sampler to take
    app = ProfilingMiddleware(
        Starlette(routes=[Route("/work", work)]),
        tracer_provider=make_provider()[0],
        profile_store=MemoryStore(),
    )
    lifespan_in: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    lifespan_out: list[dict[str, Any]] = []

    async def lifespan_send(message: dict[str, Any]) -> None:
        lifespan_out.append(message)

    lifespan = asyncio.ensure_future(
        app({"type": "lifespan", "asgi": {"version": "3.0"}}, lifespan_in.get, lifespan_send)
    )
    await lifespan_in.put({"type": "lifespan.startup"})
    try:
        scope = http_scope("/work", client=("127.0.0.1", 1234), server=("127.0.0.1", 8000))
        assert (await drive(app, scope))[-1]["body"] == b"done"
        status = testing.always_on_status()
        if not status.sigprof_handler_is_ours:
            pytest.skip(f"SIGPROF is not free in this process: {status}")
        assert status.main_loop_driven and status.timer_armed, status  # (idle ticks to go)
        await lifespan_in.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(lifespan, 10)
        assert [m["type"] for m in lifespan_out][-1] == "lifespan.shutdown.complete"
        assert not testing.always_on_status().timer_armed
    finally:
        app.core.writer.close()
        testing.reset()
        signal.signal(signal.SIGPROF, previous if previous is not None else signal.SIG_DFL)
