from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from pyinstrument.session import Session
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from otelprof_middleware import Config, ProfilingMiddleware, testing
from otelprof_middleware._identifiers import is_thread_root
from otelprof_middleware._request import RequestFacts
from otelprof_middleware.profiling._start_policy import StartPolicy
from otelprof_middleware.profiling.always_on import always_on_sampler
from otelprof_middleware.stores import MemoryStore

from .helpers import (
    OWN_AND_OTHER,
    get_alpha_and_beta_at_once,
    make_provider,
    marker_alpha,
    marker_beta,
    text_of,
    until_it_holds,
)


def test_mode_setting_is_validated() -> None:
    assert Config.load({"OTELPROF_MODE": "always-on"}).mode == "always_on"
    assert Config.load({}).mode == "always_on"  # the default
    assert Config.load({"OTELPROF_MODE": "hook"}).mode == "hook"
    with pytest.raises(ValueError, match="OTELPROF_MODE"):
        Config.load({"OTELPROF_MODE": "sometimes"})
    with pytest.raises(ValueError, match="OTELPROF_HOOK_SAMPLE_RATE"):
        Config.load({"OTELPROF_HOOK_SAMPLE_RATE": "2"})


def test_one_profiler_per_request_hook_first() -> None:
    sampler = StartPolicy(
        Config.load({}, mode="always_on", sample_rate=1.0, hook_sample_rate=0.25, debug_route=True)
    )
    rng = random.Random(5)
    kinds = [sampler.choose(rng.getrandbits(128), True, None, None) for _ in range(4000)]
    assert set(kinds) == {"hook", "always_on"}
    assert 0.22 < kinds.count("hook") / len(kinds) < 0.28
    assert sampler.choose(1, True, b"1", "127.0.0.1") == "hook"  # a trigger gets the hook
    assert sampler.choose(1, False, None, None) is None
    hook_only = StartPolicy(Config.load({}, sample_rate=1.0, hook_sample_rate=1.0))
    assert hook_only.choose(7, True, None, None) == "hook"  # ignored outside always_on


@pytest.fixture(autouse=True)
def _own_sampler() -> Iterator[None]:
    """Each test's middleware gets the always-on sampler its settings ask for (a process
    has one: an earlier test's would otherwise be in force)."""
    testing.reset()
    yield
    testing.reset()


@pytest.fixture
def app() -> Iterator[tuple[ProfilingMiddleware, MemoryStore]]:
    async def alpha(request: Request) -> JSONResponse:
        await asyncio.sleep(0.005)
        marker_alpha(0.04)
        await asyncio.sleep(0.005)
        return JSONResponse({"endpoint": "alpha"})

    async def beta(request: Request) -> JSONResponse:
        await run_in_threadpool(marker_beta, 0.04)
        await asyncio.sleep(0.005)
        return JSONResponse({"endpoint": "beta"})

    store = MemoryStore()
    middleware = ProfilingMiddleware(
        Starlette(routes=[Route("/alpha", alpha), Route("/beta", beta)]),
        tracer_provider=make_provider()[0],
        profile_store=store,
        sample_rate=1.0,
        mode="always_on",
        always_on_interval_ms=2,
    )
    yield middleware, store
    middleware.core.writer.close()


def test_reset_leaves_no_thread_of_ours_and_the_kept_profile_written(
    app: tuple[ProfilingMiddleware, MemoryStore],
) -> None:
    """A user's test that checks for leaked threads (those alive after it that were not
    before) saw ``otelprof-sampler`` and ``otelprof-writer`` with the middleware on, and
    ``testing.reset()`` ended only the sampler. It ends the writers too, after writing what
    they hold; the next profile starts them again."""
    middleware, store = app

    def ours() -> set[str]:
        return {t.name for t in threading.enumerate() if t.name.startswith("otelprof")}

    with TestClient(middleware) as client:
        assert client.get("/alpha").status_code == 200
    assert ours()  # (the sampler's thread and the writer's, at this moment)
    testing.reset()
    assert ours() == set()
    assert len(store.list()) == 1  # written before its thread ended
    with TestClient(middleware) as client:
        assert client.get("/alpha").status_code == 200
    middleware.core.writer.flush()
    assert len(store.list()) == 2


@pytest.mark.anyio
async def test_concurrent_loop_and_worker_requests_never_mix(
    app: tuple[ProfilingMiddleware, MemoryStore],
) -> None:
    middleware, store = app
    responses = await get_alpha_and_beta_at_once(middleware, 16)
    assert all(r.status_code == 200 for r in responses)
    middleware.core.writer.flush()
    summaries = store.list()
    assert len(summaries) == 16
    found_own = 0
    for summary in summaries:
        assert summary.mode == "always_on"
        assert summary.interval_ms == 2
        session = store.get(summary.trace_id)[0].session()
        text = text_of(session)
        assert "always-on sampler, interval 2 ms" in session.target_description
        own, other = OWN_AND_OTHER[summary.route]
        assert other not in text, text
        found_own += own in text
    assert found_own >= 12  # statistical: a 40 ms marker is almost always sampled


def test_wsgi_style_threads_are_attributed_by_thread() -> None:
    from otelprof_middleware.profiling._engine import ProfilerCore

    provider, _ = make_provider()
    tracer = provider.get_tracer("t")
    store = MemoryStore()
    core = ProfilerCore(
        Config.load({}, sample_rate=1.0, mode="always_on", always_on_interval_ms=2),
        store=store,
    )

    def request(work: Any) -> None:
        with tracer.start_as_current_span("GET") as span:
            active = core.start(span, span.get_span_context(), RequestFacts(method="GET"))
            assert active is not None and active.hook is None
            work(0.05)
            core.finish(active, status_code=200, route=work.__name__)
            core.detach(active)

    threads = [
        threading.Thread(target=request, args=(marker_alpha if i % 2 else marker_beta,))
        for i in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    core.writer.close()
    for summary in store.list():
        text = text_of(store.get(summary.trace_id)[0].session())
        other = "marker_beta" if summary.route == "marker_alpha" else "marker_alpha"
        assert other not in text


def test_a_thread_request_after_a_pause_is_sampled_from_its_start() -> None:
    """Between requests the sampler thread naps in watch mode (four to eight intervals, so
    that back-to-back requests need not wake it). A WSGI request registered during that
    nap must wake it: it did not, and the first 20-40 ms of a request that came after a
    quiet moment went unsampled (a 25 ms first phase was missing from a third of the
    profiles under gunicorn gthread, its time partly credited to the next phase)."""
    until_it_holds(_first_phases_after_pauses_are_sampled)


def _first_phases_after_pauses_are_sampled() -> str | None:
    """Eight WSGI-style requests after pauses: None when their first phases were seen."""
    from otelprof_middleware.profiling._engine import ProfilerCore

    testing.reset()
    provider, _ = make_provider()
    tracer = provider.get_tracer("t")
    store = MemoryStore()
    core = ProfilerCore(
        Config.load({}, sample_rate=1.0, mode="always_on", always_on_interval_ms=5),
        store=store,
    )

    def request() -> None:
        with tracer.start_as_current_span("GET") as span:
            active = core.start(span, span.get_span_context(), RequestFacts(method="GET"))
            assert active is not None and active.hook is None
            marker_alpha(0.025)
            marker_beta(0.025)
            core.finish(active, status_code=200, route="/ab")
            core.detach(active)

    request()  # starts the sampler thread
    for _ in range(8):
        time.sleep(0.15)  # the thread is napping in watch mode, not idle
        worker = threading.Thread(target=request)
        worker.start()
        worker.join()
    core.writer.close()
    summaries = store.list(limit=20)
    assert len(summaries) == 9
    first_phase = []
    for summary in summaries[:8]:
        session = store.get(summary.trace_id)[0].session()
        first_phase.append(
            sum(t for stack, t in session.frame_records if any("marker_alpha" in f for f in stack))
        )
    # 25 ms of CPU at a 5 ms interval: the profiles see most of it. (Before: five of eight
    # saw none, every run. Two misses are allowed in a run; on a loaded machine the sampler
    # thread may not be scheduled in time for most of a run: at a load average of 12 on
    # 2 cores, six of eight saw none, as many before the fix as after.)
    shown = [round(t * 1000, 1) for t in first_phase]
    if sum(t < 0.010 for t in first_phase) > 2 or sorted(first_phase)[4] <= 0.015:
        return f"first phases seen (ms): {shown}"
    return None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sampler_thread_restarts_in_a_forked_child() -> None:
    sampler = always_on_sampler(0.005)
    sampler.thread.ensure()
    assert sampler.thread.alive
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the parent's thread is gone; the sampler starts its own
        try:
            sampler.thread.ensure()
            ok = sampler.thread.alive
            ended = sampler.stop()
            os.write(write, b"1" if ok and ended and not sampler.thread.started else b"0")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    os.close(read)
    os.close(write)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_every_new_loop_gets_the_task_factory_even_at_a_reused_address() -> None:
    # The factory was once remembered by id(loop): a later loop at a freed loop's
    # address then went without it, and its requests' child tasks were not attributed.
    from otelprof_middleware.profiling._request_profile import RequestProfile, current_request
    from otelprof_middleware.profiling.always_on import AlwaysOnSampler

    sampler = AlwaysOnSampler(0.005, sigprof=False)

    async def request() -> bool:
        profile = RequestProfile(
            interval=0.005, max_samples=100, start_call_stack=[], continuous=True
        )
        token = current_request.set(profile)
        sampler.register_current(profile)
        try:
            child = asyncio.ensure_future(asyncio.sleep(0))
            attributed = sampler.registry.tasks.get(child) is profile
            await child
            return attributed
        finally:
            profile.closed = True
            sampler.unregister_current(profile)
            current_request.reset(token)

    try:
        results = [asyncio.run(request()) for _ in range(12)]
    finally:
        sampler.stop()
    assert all(results), results


def _keeping_every_profile(app: Starlette) -> tuple[ProfilingMiddleware, MemoryStore]:
    """``app`` under an always-on middleware that keeps every profile in a memory store."""
    store = MemoryStore()
    middleware = ProfilingMiddleware(
        app,
        tracer_provider=make_provider()[0],
        profile_store=store,
        mode="always_on",
        min_duration_ms=0,
    )
    return middleware, store


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory: 3.12+")
def test_an_eager_loop_of_the_test_client_still_streams() -> None:
    """An app that makes its loop eager in its lifespan, under Starlette's ``TestClient``
    (a loop the sampler thread ticks, whose task factory records the requests' tasks):
    anyio still recognises the eager factory, and StreamingResponse's task group works
    (it failed at the first request, and the client's portal with it)."""

    async def body() -> AsyncIterator[bytes]:
        for chunk in (b"a", b"b"):
            await asyncio.sleep(0)
            yield chunk

    async def stream(request: Request) -> StreamingResponse:
        return StreamingResponse(body())

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]
        yield

    middleware, store = _keeping_every_profile(
        Starlette(routes=[Route("/stream", stream)], lifespan=lifespan)
    )
    try:
        with TestClient(middleware) as client:
            for _ in range(2):
                assert client.get("/stream").text == "ab"
        assert middleware.core.writer.flush(10)
        assert len(store.list()) == 2
    finally:
        middleware.core.writer.close()


def test_a_task_factory_the_app_sets_later_still_records_child_tasks() -> None:
    """On a loop the sampler thread ticks (``TestClient``'s), child tasks are mapped to
    their request by our task factory. An app that sets a task factory of its own after
    the first request replaced ours: a later request's child tasks went unrecorded, and
    the CPU time of its ``gather`` child was missing from its profile."""

    async def child() -> None:
        marker_alpha(0.1)

    async def work(request: Request) -> JSONResponse:
        await asyncio.gather(child(), asyncio.sleep(0))
        return JSONResponse({"ok": True})

    async def set_factory(request: Request) -> JSONResponse:
        asyncio.get_running_loop().set_task_factory(
            lambda loop, coro, **kwargs: asyncio.Task(coro, loop=loop, **kwargs)
        )
        return JSONResponse({"ok": True})

    middleware, store = _keeping_every_profile(
        Starlette(routes=[Route("/work", work), Route("/set", set_factory)])
    )
    try:
        with TestClient(middleware) as client:
            assert client.get("/set").json() == {"ok": True}  # after our first request
            assert client.get("/work").json() == {"ok": True}
        assert middleware.core.writer.flush(10)
        [summary] = [s for s in store.list() if s.route == "/work"]
        [record] = store.get(summary.trace_id)
        assert "marker_alpha" in text_of(record.session())
    finally:
        middleware.core.writer.close()


_EVERY_PROFILE_SAMPLED_EVERY_2_MS: dict[str, Any] = {
    "sample_rate": 1.0,
    "mode": "always_on",
    "min_duration_ms": 0,
    "always_on_interval_ms": 2,
}
"""The settings of the asgiref round-trip tests below (ASGI and WSGI)."""


async def _profile_of_one_request(endpoint: Any, mode: str = "always_on") -> Session:
    """The always-on profile (every 2 ms, kept) of one request to ``endpoint``, served
    in this test's own loop through httpx's ASGI transport."""
    store = MemoryStore()
    middleware = ProfilingMiddleware(
        Starlette(routes=[Route("/endpoint", endpoint)]),
        tracer_provider=make_provider()[0],
        profile_store=store,
        **{**_EVERY_PROFILE_SAMPLED_EVERY_2_MS, "mode": mode},
    )
    try:
        transport = httpx.ASGITransport(app=middleware, client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/endpoint")).status_code == 200
        middleware.core.writer.flush()
        (summary,) = store.list()
        return store.get(summary.trace_id)[0].session()
    finally:
        middleware.core.writer.close()


async def wait_for_the_next_event() -> None:
    await asyncio.sleep(0.04)


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["always_on", "hook"])
async def test_a_stream_waiting_in_its_async_generator_shows_where_it_waits(mode: str) -> None:
    # A Server-Sent Events body: an async generator that waits for each event. Its task
    # waits in Starlette's ``async for`` over the generator, and the always-on profile
    # showed the whole stream as one ``[await]`` in ``stream_response`` (a 30 s stream:
    # 30 s there, and not a frame of the app's own code).
    async def events() -> AsyncIterator[str]:
        for number in range(6):
            await wait_for_the_next_event()
            yield f"data: {number}\n\n"

    async def endpoint(request: Request) -> StreamingResponse:
        return StreamingResponse(events(), media_type="text/event-stream")

    session = await _profile_of_one_request(endpoint, mode)
    text = text_of(session)
    under_the_wait = sum(
        seconds
        for stack, seconds in session.frame_records
        if any(frame.startswith("wait_for_the_next_event\x00") for frame in stack)
    )
    assert under_the_wait >= 0.5 * session.duration, text
    assert "events" in text, text


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["always_on", "hook"])
async def test_loop_work_a_worker_job_waits_for_is_the_requests(mode: str) -> None:
    # Django under ASGI with a sync-only middleware (DjangoInstrumentor's, most third-party
    # ones) runs an async view as: the request's task hands the sync chain to a worker
    # thread (sync_to_async), which hands the view back to the loop (async_to_sync) and
    # waits. The view's work runs on the loop while the request's worker job blocks:
    # the samples are the loop's, not the waiting worker's.
    from asgiref.sync import async_to_sync, sync_to_async

    async def view() -> None:
        await asyncio.sleep(0.002)
        marker_alpha(0.15)

    def sync_chain() -> None:
        async_to_sync(view)()

    async def endpoint(request: Request) -> JSONResponse:
        await sync_to_async(sync_chain)()
        return JSONResponse({})

    session = await _profile_of_one_request(endpoint, mode)
    text = text_of(session)
    assert "marker_alpha" in text, text
    # The worker job's wait is not credited a second time beside the loop's work.
    root = session.root_frame()
    assert root is not None and root.time <= 1.25 * session.duration, text


@pytest.mark.anyio
async def test_a_first_request_with_a_worker_job_is_one_tree() -> None:
    # The first request on a loop (a quiet server's): it waits, then its ``def`` work
    # runs on a worker thread. Its waits and its job go under the loop thread's root,
    # as its own samples: the profile is one tree (it had a root for the job's stack,
    # one for the waits, and one for the loop's samples).
    async def endpoint(request: Request) -> JSONResponse:
        await asyncio.sleep(0.03)
        await run_in_threadpool(marker_beta, 0.06)
        await asyncio.sleep(0.03)
        return JSONResponse({})

    session = await _profile_of_one_request(endpoint)
    text = text_of(session)
    assert "marker_beta" in text, text
    roots = {stack[0] for stack, _ in session.frame_records}
    assert len(roots) == 1 and is_thread_root(roots.pop()), text


def test_a_wsgi_request_waiting_for_its_async_view_shows_the_view() -> None:
    # Django under WSGI runs an async view through ``async_to_sync``: a new event loop on
    # a worker thread (a job of the request) runs the view while the request's own
    # thread waits for it. The worker's stack is the request's, not that wait.
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        _async_view_through_async_to_sync()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    text = text_of(_wsgi_profile_of_one_request(app))
    assert "marker_alpha" in text, text


def _wsgi_profile_of_one_request(app: Any, mode: str = "always_on") -> Session:
    """The profile (kept; always-on every 2 ms, or the hook's) of one request to the
    WSGI ``app``."""
    from werkzeug.test import Client

    from otelprof_middleware import WSGIProfilingMiddleware

    store = MemoryStore()
    middleware = WSGIProfilingMiddleware(
        app,
        tracer_provider=make_provider()[0],
        profile_store=store,
        **{**_EVERY_PROFILE_SAMPLED_EVERY_2_MS, "mode": mode},
    )
    try:
        response = Client(middleware).get(
            "/", environ_base={"REMOTE_ADDR": "127.0.0.1"}, buffered=False
        )
        assert response.status_code == 200
        for _chunk in response.response:  # (the whole body, as a server sends it)
            pass
        response.close()  # the profile ends at the body's close()
        middleware.core.writer.flush()
        (summary,) = store.list()
        return store.get(summary.trace_id)[0].session()
    finally:
        middleware.core.writer.close()


def test_a_wsgi_stream_sleeping_between_events_keeps_a_record_per_stretch_not_per_tick() -> None:
    # A Flask stream (Server-Sent Events) sleeps between its events: every tick finds its
    # thread in the same call, and each tick added a record. A minute's stream held about
    # 11,000 records (4.5 MiB per 20,000) and one of 105 s reached ``max_samples``, whose
    # cap then dropped the rest of the stream. Equal stacks in a row are one record now.
    events = 12
    sent: list[int] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        for number in range(events):
            time.sleep(0.05)  # waiting for the next event
            sent.append(number)
            yield f"data: {number}\n\n".encode()

    session = _wsgi_profile_of_one_request(app)
    assert len(sent) == events
    text = text_of(session)
    assert len(session.frame_records) <= 3 * events, text
    # ... and each tick still counts as a sample (about 300 at 2 ms over 0.6 s)
    assert session.sample_count >= 4 * len(session.frame_records), text
    under_app = sum(
        seconds
        for stack, seconds in session.frame_records
        if any(frame.startswith("app\x00") for frame in stack)
    )
    assert under_app >= 0.5 * session.duration, text


def _async_view_through_async_to_sync() -> None:
    from asgiref.sync import async_to_sync

    async def view() -> None:
        await asyncio.sleep(0.002)
        marker_alpha(0.15)

    async_to_sync(view)()


def _job_on_an_executor() -> None:
    with ThreadPoolExecutor(max_workers=1) as executor:
        executor.submit(marker_alpha, 0.15).result()


@pytest.mark.parametrize("mode", ["always_on", "hook"])
@pytest.mark.parametrize(
    "work", [_async_view_through_async_to_sync, _job_on_an_executor], ids=["asgiref", "future"]
)
def test_a_wsgi_thread_waiting_for_its_job_is_not_credited_beside_it(
    work: Callable[[], None], mode: str
) -> None:
    # Django under WSGI runs an async view through ``async_to_sync`` (a new loop on a
    # worker thread) while the request's own thread blocks on a condition; a view may
    # also wait on an executor's future. The thread's wait was credited as well as the
    # job: a profile of 0.36 s held 0.49 s (Django under gunicorn gthread), half of it
    # ``Condition.wait`` beside the view's marker. The hook did the same (its sample at
    # the wait's end held the whole wait).
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        work()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    session = _wsgi_profile_of_one_request(app, mode)
    text = text_of(session)
    assert "marker_alpha" in text, text
    root = session.root_frame()
    assert root is not None and root.time <= 1.25 * session.duration, text


def test_a_request_that_wakes_the_sampler_thread_is_ticked_at_once() -> None:
    """The sampler thread, started or woken from its nap by a thread's request, ticks at
    once instead of sleeping an interval first. The wake-up itself waits its turn for the
    GIL (about 40 ms behind 8 busy gunicorn threads), and the sleep added a second such
    wait: 8 concurrent 30 ms requests after a pause mostly ended before the first tick.
    Here an interval of 0.3 s (sleeps of 0.15-0.45 s) makes the difference plain.
    (A wake-up within an interval of the last tick, between two requests of a busy
    server, keeps the usual schedule: a tick per request cost WSGI /tiny its CPU.)"""
    from otelprof_middleware.profiling._request_profile import RequestProfile
    from otelprof_middleware.profiling.always_on._sampler import AlwaysOnSampler

    def attempt() -> str | None:
        sampler = AlwaysOnSampler(0.3, sigprof=False)
        seen: list[int] = []

        def request() -> None:
            profile = RequestProfile(0.3, 1000, None, continuous=True)
            ticks = sampler.samples
            sampler.register_current(profile)
            deadline = time.perf_counter() + 0.1
            while sampler.samples == ticks and time.perf_counter() < deadline:
                time.sleep(0.002)  # (sits still: the tick finds it here)
            seen.append(sampler.samples - ticks)
            sampler.unregister_current(profile)

        try:
            for _ in range(3):  # the first starts the thread; the others wake it
                worker = threading.Thread(target=request)
                worker.start()
                worker.join()
                deadline = time.perf_counter() + 2.0
                while not sampler.thread._idle and time.perf_counter() < deadline:
                    time.sleep(0.01)  # until the thread naps (in watch mode) or idles
                time.sleep(0.35)  # (and an interval has passed since its last tick)
        finally:
            sampler.stop()
        if all(seen[1:]):  # (the first started the thread: it sleeps an interval first)
            return None
        return f"ticks within 0.1 s of each registration: {seen}"

    until_it_holds(attempt)


def test_an_idle_sampler_thread_with_no_event_loop_waits_to_be_woken() -> None:
    """With no SIGPROF-driven loop in the process (WSGI), only a registration can bring
    the sampler thread work, and a registration wakes it: once idle it waits with no
    timeout, never waking (and taking the GIL) on its own. It napped 20 ms at a time for
    a second after each request, then looked every second: under uWSGI, which forks its
    workers from C, a thread running at the fork left a worker's GIL held for good."""
    from otelprof_middleware.profiling._request_profile import RequestProfile
    from otelprof_middleware.profiling.always_on._sampler import AlwaysOnSampler

    sampler = AlwaysOnSampler(0.005, sigprof=False)
    try:
        profile = RequestProfile(0.005, 1000, None, continuous=True)
        sampler.register_current(profile)  # (this thread: no event loop runs here)
        time.sleep(0.02)
        sampler.unregister_current(profile)
        thread = sampler.thread._thread
        assert thread is not None and thread.ident is not None
        timeouts = []
        for _ in range(20):
            time.sleep(0.05)
            frame = sys._current_frames().get(thread.ident)
            while frame is not None and frame.f_code.co_name != "wait":
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename == threading.__file__:
                timeouts.append(frame.f_locals.get("timeout"))
        assert timeouts and all(timeout is None for timeout in timeouts), timeouts
        # ...and a request still wakes it: ticked at once.
        ticks = sampler.samples
        sampler.register_current(profile)
        deadline = time.perf_counter() + 1.0
        while sampler.samples == ticks and time.perf_counter() < deadline:
            time.sleep(0.002)
        sampler.unregister_current(profile)
        assert sampler.samples > ticks
    finally:
        sampler.stop()
