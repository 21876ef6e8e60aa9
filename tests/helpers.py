"""Test helpers: real OTel SDK providers with in-memory exporters, marker work, renders,
sessions (profiled or built by hand) and the stored summaries and records of tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pyinstrument import Profiler
from pyinstrument.renderers import ConsoleRenderer
from pyinstrument.session import Session

import otelprof_middleware
from otelprof_middleware._record import ProfileRecord, ProfileSummary


def make_provider(
    resource: dict[str, str] | None = None,
) -> tuple[TracerProvider, InMemorySpanExporter]:
    """A provider (with ``resource``'s attributes, if any) that exports to memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create(resource or {}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def server_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on (once this returns, until someone binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def spin(seconds: float) -> int:
    end = time.perf_counter() + seconds
    total = 0
    while time.perf_counter() < end:
        total += sum(range(50))
    return total


def spin_cpu(cpu_seconds: float, wall_limit: float = 2.0) -> int:
    """Burn ``cpu_seconds`` of this thread's CPU time (``wall_limit`` of wall time at most)."""
    start = time.thread_time()
    deadline = time.perf_counter() + wall_limit
    total = 0
    while time.thread_time() - start < cpu_seconds and time.perf_counter() < deadline:
        total += sum(range(50))
    return total


def marker_alpha(seconds: float = 0.02) -> int:
    return spin(seconds)


def marker_beta(seconds: float = 0.02) -> int:
    return spin(seconds)


def slow_writes(store_class: type[Any], seconds: float = 0.3) -> type[Any]:
    """A subclass of the real store ``store_class`` whose writes first sleep ``seconds``
    (a busy disk, a far Redis)."""

    class SlowWrites(store_class):  # type: ignore[misc,valid-type]
        def put(self, record: ProfileRecord) -> None:
            time.sleep(seconds)
            super().put(record)

        def put_many(self, records: Sequence[ProfileRecord]) -> None:
            time.sleep(seconds)
            super().put_many(records)

    return SlowWrites


def stalled_store() -> tuple[Any, threading.Event, Callable[[], Any]]:
    """A memory store, an event, and a store getter that waits (10 s at most) until the
    event is set: a writer given the getter is stalled until then."""
    from otelprof_middleware.stores import MemoryStore

    store, release = MemoryStore(), threading.Event()

    def get() -> MemoryStore:
        release.wait(10)
        return store

    return store, release, get


def until_it_holds(attempt: Callable[[], str | None], attempts: int = 3) -> None:
    """Run ``attempt`` until it returns None (its claim held), ``attempts`` times at most;
    else fail, with the shortfall each run described.

    For a claim about what a sampler sees in time, on a shared machine: a run the
    scheduler starved (a sampler thread not scheduled, or without the GIL, for tens of
    ms) can fall short once, where the bug the test guards against fails every run.
    """
    shortfalls = []
    for _ in range(attempts):
        shortfall = attempt()
        if shortfall is None:
            return
        shortfalls.append(shortfall)
    raise AssertionError(f"short in all {attempts} runs: {shortfalls}")


def text_of(session: Session) -> str:
    return ConsoleRenderer(unicode=False, color=False, show_all=True).render(session)


def profile(work: Callable[[], object], interval: float = 0.0001) -> Session:
    """A real pyinstrument session of ``work()`` (run on this thread)."""
    profiler = Profiler(interval=interval, async_mode="disabled")
    profiler.start()
    try:
        work()
    finally:
        profiler.stop()
    session = profiler.last_session
    assert session is not None
    return session


def make_session(
    frame_records: list[tuple[list[str], float]],
    *,
    start_time: float = 0.0,
    duration: float | None = None,
    interval: float = 0.001,
    sample_count: int | None = None,
    target_description: str = "t",
    cpu_time: float = 0.0,
    sys_path: Sequence[str] = (),
    start_call_stack: Sequence[str] = (),
) -> Session:
    """A session built by hand from ``(stack, seconds)`` records; by default it lasts
    as long as its records and has one sample per record."""
    return Session(
        frame_records=frame_records,
        start_time=start_time,
        duration=sum(s for _, s in frame_records) if duration is None else duration,
        min_interval=interval,
        max_interval=interval,
        sample_count=len(frame_records) if sample_count is None else sample_count,
        start_call_stack=list(start_call_stack),
        target_description=target_description,
        cpu_time=cpu_time,
        sys_path=list(sys_path),
        sys_prefixes=[],
    )


def make_summary(n: int = 0, **fields: object) -> ProfileSummary:
    """Summary number ``n``: trace and span ids ``n + 1`` in hex, started at
    1_700_000_000 + ``n``, GET /items/{item_id} answered 200 in 10 ms; any field given
    by name instead."""
    values: dict[str, object] = {
        "trace_id": f"{n + 1:032x}",
        "span_id": f"{n + 1:016x}",
        "method": "GET",
        "route": "/items/{item_id}",
        "status_code": 200,
        "duration_ms": 10.0,
        "start_time": 1_700_000_000.0 + n,
    }
    values.update(fields)
    return ProfileSummary(**values)  # type: ignore[arg-type]


def make_record(n: int = 0, payload: bytes = b"p" * 100, **fields: object) -> ProfileRecord:
    """:func:`make_summary` with an opaque ``payload`` (100 bytes by default)."""
    return ProfileRecord(summary=make_summary(n, **fields), payload=payload)


def summary_numbers(summaries: object) -> list[int]:
    """The ``n`` of :func:`make_summary` of each summary (from its span id), in order."""
    assert isinstance(summaries, list)
    return [int(s.span_id, 16) - 1 for s in summaries]


def package_env() -> dict[str, str]:
    """This process's environment with the package's checkout first on ``PYTHONPATH``,
    for subprocesses that import it."""
    env = dict(os.environ)
    root = str(Path(next(iter(otelprof_middleware.__path__))).parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def in_threads(
    work: Callable[[int], object], count: int = 8, timeout: float | None = None
) -> list[BaseException]:
    """Run ``work(0)`` ... ``work(count - 1)`` at once, one thread each; wait for them
    (``timeout`` each at most) and return what they raised."""
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            work(index)
        except BaseException as exc:  # pragma: no cover - returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return errors


def http_scope(path: str = "/hello", **fields: Any) -> dict[str, Any]:
    """The ASGI scope of ``GET path`` from 127.0.0.1, as a server presents it; any key
    given by name instead."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }
    scope.update(fields)
    return scope


async def drive(app: Any, scope: dict[str, Any]) -> list[dict[str, Any]]:
    """Run one ASGI request with an empty body through ``app``; return what it sent."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def wait_answering(
    url: str,
    process: subprocess.Popen[Any],
    log: Callable[[], str],
    *,
    what: str = "the server",
    timeout: float = 30.0,
) -> None:
    """Wait until ``url`` answers at all (any status); raise with ``log()`` if
    ``process`` exits first or nothing answers within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited:\n{log()}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start:\n{log()}") from None
            time.sleep(0.1)


def stop_group(process: subprocess.Popen[Any], grace: float = 15.0) -> None:
    """End the process group ``process`` leads (started with ``start_new_session``):
    SIGTERM, then SIGKILL if it is still running after ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


# Of a request to /alpha (marker_alpha) or /beta (marker_beta): its own marker, and the
# other one, which its profile must never hold.
OWN_AND_OTHER = {
    "/alpha": ("marker_alpha", "marker_beta"),
    "/beta": ("marker_beta", "marker_alpha"),
}


async def get_alpha_and_beta_at_once(app: Any, count: int) -> list[httpx.Response]:
    """``count`` GETs of /alpha and /beta in turn, all at once, through the ASGI ``app``."""
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await asyncio.gather(
            *[client.get("/alpha" if i % 2 else "/beta") for i in range(count)]
        )
