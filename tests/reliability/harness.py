"""In-process harness for the fault matrix: one app, profiled and plain, ASGI or WSGI.

Each :class:`Harness` serves the same small app twice: wrapped in the profiling
middleware (real SDK ``TracerProvider`` + ``InMemorySpanExporter``, ``sample_rate=1``)
and unwrapped (the "plain twin"). A fault test sends a batch through both and compares
status, headers and body byte for byte.

Requests run where a real server would run them: the ASGI app on one event loop thread
(like uvicorn), the WSGI app on one server thread (like a gthread worker). Every call
waits with a timeout, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, TypeVar

import httpx
import pytest
from flask import Flask, Response, jsonify
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route
from werkzeug.test import Client

from otelprof_middleware import (
    ProfileRecord,
    ProfilingMiddleware,
    WSGIProfilingMiddleware,
    counters,
)
from otelprof_middleware._record import ProfileSummary
from otelprof_middleware._types import ASGIApp, Receive, Scope, Send, StartResponse, WSGIEnvironment
from otelprof_middleware.profiling._engine import ProfilerCore
from otelprof_middleware.profiling._span import PROFILE_URL
from otelprof_middleware.stores import MemoryStore, ProfileStore

from ..helpers import make_provider, marker_alpha, marker_beta, server_spans, text_of

__all__ = [
    "BATCH",
    "LEDGER",
    "Boom",
    "FaultyStore",
    "Gate",
    "Harness",
    "Kind",
    "Reply",
    "assert_profiling_resumes",
    "logged_stages",
    "make_harness",
    "send_batch",
]

T = TypeVar("T")
Kind: TypeAlias = Literal["asgi", "wsgi"]

LOOPBACK = ("127.0.0.1", 50000)
REQUEST_TIMEOUT = 15.0
"""One request may take this long before the test calls it a hang."""
BATCH_TIMEOUT = 30.0
"""A whole batch must finish within this (typically it takes well under a second)."""
BLOCK_SECONDS = 30.0
"""``/block`` gives up waiting after this, so a failed test never leaves a thread behind."""

BATCH: tuple[str, ...] = ("/cpu", "/items/7", "/stream", "/sync") * 5
"""The 20 requests of every fault: async/sync work, a path parameter, a streamed body and
worker-thread work (FastAPI-style ``def`` endpoint / ``ThreadPoolExecutor``)."""

# which marker function each path's profile must show once profiling works again
MARKERS = {"/cpu": "marker_alpha", "/sync": "marker_beta", "/stream": "marker_beta"}

LEDGER: list[dict[str, Any]] = []
"""What each fault test sent and saw; written to test-artifacts/ by conftest.py."""


class Boom(RuntimeError):
    """The app's own exception."""


@dataclass
class Gate:
    """Holds ``/block`` (a worker thread that does not return) until ``release`` is set."""

    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def wait(self) -> str:
        self.entered.set()
        return "released\n" if self.release.wait(BLOCK_SECONDS) else "gave up\n"


@dataclass(frozen=True)
class Reply:
    """What a client sees: compared byte for byte between the profiled app and its twin."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


# -- the apps -------------------------------------------------------------------


def make_asgi_app(gate: Gate) -> ASGIApp:
    """The Starlette app, behind a raw ASGI layer whose ``/crash`` raises before any
    response (no framework turns it into a 500)."""
    starlette = _make_starlette(gate)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/crash":
            marker_alpha(0.002)
            raise Boom("the app crashed before responding")
        await starlette(scope, receive, send)

    return app


def _make_starlette(gate: Gate) -> Starlette:
    async def cpu(request: Request) -> JSONResponse:
        await asyncio.sleep(0)
        marker_alpha(0.003)
        return JSONResponse({"endpoint": "cpu"})

    async def item(request: Request) -> JSONResponse:
        return JSONResponse({"id": request.path_params["item_id"]})

    async def stream(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for index in range(4):
                marker_beta(0.001)
                yield f"chunk{index}\n".encode()

        return StreamingResponse(body(), media_type="text/plain")

    def sync(request: Request) -> JSONResponse:  # Starlette runs it on a worker thread
        marker_beta(0.003)
        return JSONResponse({"endpoint": "sync"})

    async def fail(request: Request) -> JSONResponse:
        marker_alpha(0.002)
        raise Boom("the app failed on purpose")

    def block(request: Request) -> PlainTextResponse:  # a worker thread that hangs
        return PlainTextResponse(gate.wait())

    return Starlette(
        routes=[
            Route("/cpu", cpu),
            Route("/items/{item_id}", item),
            Route("/stream", stream),
            Route("/sync", sync),
            Route("/fail", fail),
            Route("/block", block),
        ]
    )


def make_flask_app(gate: Gate, pool: ThreadPoolExecutor) -> Flask:
    """The Flask app; its ``wsgi_app`` answers ``/crash`` by raising before any response."""
    app = Flask("reliability")

    @app.get("/cpu")
    def cpu() -> Response:
        marker_alpha(0.003)
        return jsonify(endpoint="cpu")

    @app.get("/items/<int:item_id>")
    def item(item_id: int) -> Response:
        return jsonify(id=item_id)

    @app.get("/stream")
    def stream() -> Response:
        def body() -> Iterator[str]:
            for index in range(4):
                marker_beta(0.001)
                yield f"chunk{index}\n"

        return Response(body(), mimetype="text/plain")

    @app.get("/sync")
    def sync() -> Response:  # work handed to a worker thread, waited for
        done = pool.submit(marker_beta, 0.003).result(REQUEST_TIMEOUT) > 0
        return jsonify(endpoint="sync", done=done)

    @app.get("/fail")
    def fail() -> Response:
        marker_alpha(0.002)
        raise Boom("the app failed on purpose")

    @app.get("/block")
    def block() -> Response:
        return Response(gate.wait(), mimetype="text/plain")

    flask_wsgi_app = app.wsgi_app

    def crash_or_flask(environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        if environ.get("PATH_INFO") == "/crash":  # raises before any response
            marker_alpha(0.002)
            raise Boom("the app crashed before responding")
        return flask_wsgi_app(environ, start_response)

    app.wsgi_app = crash_or_flask  # type: ignore[method-assign]
    return app


# -- a store whose faults can be switched on and off ------------------------------


class FaultyStore:
    """A :class:`ProfileStore` around a real one, with switchable faults.

    ``failing`` names the operations that raise ``OSError`` (``put``, ``get``,
    ``list``); ``put_gate``, when set, holds every ``put`` until the event is set (a
    store that blocks); ``corrupt`` makes ``get`` return undecodable payloads.
    """

    def __init__(self, inner: ProfileStore | None = None) -> None:
        self.inner: ProfileStore = inner if inner is not None else MemoryStore()
        self.failing: set[str] = set()
        self.put_gate: threading.Event | None = None
        self.corrupt = False

    @property
    def url(self) -> str:
        return self.inner.url

    def _check(self, operation: str) -> None:
        if operation in self.failing:
            raise OSError(f"injected {operation} failure")

    def put(self, record: ProfileRecord) -> None:
        gate = self.put_gate
        if gate is not None:
            gate.wait(BLOCK_SECONDS)
        self._check("put")
        self.inner.put(record)

    def get(self, trace_id: str, span_id: str | None = None) -> Sequence[ProfileRecord]:
        self._check("get")
        records = self.inner.get(trace_id, span_id)
        if self.corrupt:
            return [ProfileRecord(r.summary, b"not a zlib stream") for r in records]
        return records

    def list(
        self,
        *,
        limit: int = 100,
        route: str | None = None,
        min_duration_ms: float | None = None,
        since: float | None = None,
        until: float | None = None,
        order: str = "newest",
    ) -> Sequence[ProfileSummary]:
        self._check("list")
        return self.inner.list(
            limit=limit,
            route=route,
            min_duration_ms=min_duration_ms,
            since=since,
            until=until,
            order=order,
        )

    def delete(self, trace_id: str, span_id: str | None = None) -> int:
        return self.inner.delete(trace_id, span_id)

    def stats(self) -> tuple[int, int]:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()


# -- harnesses -----------------------------------------------------------------------


class _LoopThread:
    """An asyncio event loop on its own thread, like a uvicorn worker's."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, name="asgi-server", daemon=True)
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the event loop thread did not start")

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)


class Harness:
    """The profiled app and its plain twin, served the way a real server would."""

    kind: Kind
    middleware: ProfilingMiddleware | WSGIProfilingMiddleware
    exporter: InMemorySpanExporter
    store: ProfileStore | None
    gate: Gate
    plain_gate: Gate

    @property
    def core(self) -> ProfilerCore:
        return self.middleware.core

    def current_store(self) -> ProfileStore:
        """The store profiles go to (the injected one, or the one the core opened)."""
        return self.store if self.store is not None else self.core.get_store()

    def submit(self, path: str, *, raise_app_exceptions: bool = False) -> Future[Reply]:
        raise NotImplementedError

    def submit_plain(self, path: str, *, raise_app_exceptions: bool = False) -> Future[Reply]:
        raise NotImplementedError

    def hook_left(self) -> bool:
        """Whether a profiling hook is installed on the thread that serves requests."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def get(self, path: str, *, timeout: float = REQUEST_TIMEOUT) -> Reply:
        return _result(self.submit(path), timeout, path)

    def plain(self, path: str, *, timeout: float = REQUEST_TIMEOUT) -> Reply:
        return _result(self.submit_plain(path), timeout, path)


def _result(future: Future[T], timeout: float, what: str) -> T:
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        raise AssertionError(f"{what}: no answer within {timeout:.0f} s (a hang)") from None


class AsgiHarness(Harness):
    kind: Kind = "asgi"

    def __init__(self, store: ProfileStore | None, settings: dict[str, Any]) -> None:
        provider, self.exporter = make_provider()
        self.store = store
        self.gate, self.plain_gate = Gate(), Gate()
        self.middleware = ProfilingMiddleware(
            make_asgi_app(self.gate), tracer_provider=provider, profile_store=store, **settings
        )
        self.plain_app = make_asgi_app(self.plain_gate)
        self._loop = _LoopThread()

    @staticmethod
    async def _call(app: Any, path: str, raise_app_exceptions: bool) -> Reply:
        transport = httpx.ASGITransport(
            app=app, client=LOOPBACK, raise_app_exceptions=raise_app_exceptions
        )
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            response = await client.get(path)
        return Reply(response.status_code, tuple(response.headers.raw), response.content)

    def submit(self, path: str, *, raise_app_exceptions: bool = False) -> Future[Reply]:
        return self._loop.submit(self._call(self.middleware, path, raise_app_exceptions))

    def submit_plain(self, path: str, *, raise_app_exceptions: bool = False) -> Future[Reply]:
        return self._loop.submit(self._call(self.plain_app, path, raise_app_exceptions))

    def hook_left(self) -> bool:
        async def probe() -> bool:
            return sys.getprofile() is not None

        return _result(self._loop.submit(probe()), REQUEST_TIMEOUT, "hook probe")

    def close(self) -> None:
        self.gate.release.set()
        self.plain_gate.release.set()
        self.core.writer.close()
        self._loop.close()


class WsgiHarness(Harness):
    kind: Kind = "wsgi"

    def __init__(self, store: ProfileStore | None, settings: dict[str, Any]) -> None:
        provider, self.exporter = make_provider()
        self.store = store
        self.gate, self.plain_gate = Gate(), Gate()
        self._pools = [ThreadPoolExecutor(2, thread_name_prefix="app-pool") for _ in range(2)]
        self.app = make_flask_app(self.gate, self._pools[0])
        self.middleware = WSGIProfilingMiddleware(
            self.app.wsgi_app, tracer_provider=provider, profile_store=store, **settings
        )
        self.app.wsgi_app = self.middleware  # type: ignore[method-assign]
        self.plain_app = make_flask_app(self.plain_gate, self._pools[1])
        # One server thread for ordinary requests (its hook state is checked), and
        # more for requests that must run alongside (the blocked one).
        self._server = ThreadPoolExecutor(1, thread_name_prefix="wsgi-server")
        self._extra = ThreadPoolExecutor(4, thread_name_prefix="wsgi-extra")

    @staticmethod
    def _call(app: Any, path: str) -> Reply:
        response = Client(app).get(path, environ_base={"REMOTE_ADDR": LOOPBACK[0]}, buffered=True)
        headers = tuple(
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in response.headers.to_wsgi_list()
        )
        return Reply(response.status_code, headers, response.get_data())

    def _executor(self, path: str) -> ThreadPoolExecutor:
        return self._extra if path == "/block" else self._server

    def submit(self, path: str, *, raise_app_exceptions: bool = False) -> Future[Reply]:
        return self._executor(path).submit(self._call, self.app, path)

    def submit_plain(self, path: str, *, raise_app_exceptions: bool = False) -> Future[Reply]:
        return self._executor(path).submit(self._call, self.plain_app, path)

    def hook_left(self) -> bool:
        probe = self._server.submit(lambda: sys.getprofile() is not None)
        return _result(probe, REQUEST_TIMEOUT, "hook probe")

    def close(self) -> None:
        self.gate.release.set()
        self.plain_gate.release.set()
        self.core.writer.close()
        for executor in (self._server, self._extra, *self._pools):
            executor.shutdown(wait=True)


def make_harness(kind: Kind, store: ProfileStore | None = None, **settings: Any) -> Harness:
    """A harness whose middleware profiles every request and serves the viewer."""
    settings.setdefault("sample_rate", 1.0)
    settings.setdefault("debug_route", True)
    if kind == "asgi":
        return AsgiHarness(store, settings)
    return WsgiHarness(store, settings)


# -- checks -----------------------------------------------------------------------


@dataclass
class BatchResult:
    """What a batch showed: mismatching or failed requests and the time both sides took."""

    sent: int
    failures: list[str]
    seconds_profiled: float
    seconds_plain: float


def send_batch(
    harness: Harness, paths: Sequence[str] = BATCH, *, timeout: float = BATCH_TIMEOUT
) -> BatchResult:
    """Send ``paths`` to the profiled app and to its plain twin, one after another.

    A request fails when it raises, or its status, headers or body differ from the
    twin's. The whole batch must finish within ``timeout`` (no hang).
    """
    deadline = time.monotonic() + timeout
    failures: list[str] = []
    profiled = plain = 0.0
    for path in paths:
        remaining = max(deadline - time.monotonic(), 0.1)
        started = time.perf_counter()
        try:
            ours = harness.get(path, timeout=remaining)
        except AssertionError:
            raise
        except Exception as exc:
            failures.append(f"{path}: raised {exc!r}")
            continue
        profiled += time.perf_counter() - started
        started = time.perf_counter()
        theirs = harness.plain(path)
        plain += time.perf_counter() - started
        if ours != theirs:
            failures.append(f"{path}: {ours!r} != {theirs!r}")
    return BatchResult(len(paths), failures, profiled, plain)


def logged_stages(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The stages named by the middleware's warnings, one entry per warning."""
    stages = []
    for record in caplog.records:
        if record.name == "otelprof_middleware" and record.levelno >= logging.WARNING:
            message = record.getMessage()
            if message.startswith("otelprof: ") and " failed " in message:
                stages.append(message.removeprefix("otelprof: ").split(" failed ", 1)[0])
    return stages


def assert_profiling_resumes(
    harness: Harness, paths: Sequence[str] = BATCH[:4], *, one_at_a_time: bool = False
) -> None:
    """Once the fault is gone, every request is profiled, linked and stored again.

    ``one_at_a_time``: let the writer drain after each request (a tiny writer queue
    would otherwise drop profiles, as it should).
    """
    harness.exporter.clear()
    batches = [[path] for path in paths] if one_at_a_time else [list(paths)]
    for batch in batches:
        result = send_batch(harness, batch)
        assert result.failures == []
        assert harness.core.writer.flush(10), "the writer did not drain"
    spans = server_spans(harness.exporter)
    assert len(spans) == len(paths)
    store = harness.current_store()
    for span, path in zip(sorted(spans, key=lambda s: s.start_time or 0), paths, strict=True):
        assert span.attributes is not None and PROFILE_URL in span.attributes, path
        records = store.get(
            format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")
        )
        assert len(records) == 1, path
        if path in MARKERS:
            assert MARKERS[path] in text_of(records[0].session()), path
    assert not harness.hook_left(), "a profiling hook stayed on the server thread"


def record(fault: str, harness: Harness, result: BatchResult, counters: dict[str, int]) -> None:
    LEDGER.append(
        {
            "fault": fault,
            "adapter": harness.kind,
            "requests": result.sent,
            "failed": len(result.failures),
            "seconds_profiled": round(result.seconds_profiled, 3),
            "seconds_plain": round(result.seconds_plain, 3),
            "counters": {k: v for k, v in sorted(counters.items()) if k != "written"},
        }
    )


def check_batch(
    fault: str,
    harness: Harness,
    *,
    counter: str,
    expected: int,
    at_least: bool = False,
    flush_timeout: float = 10,
) -> dict[str, int]:
    """Send the batch under the fault and record it: 0 failures, ``counter`` at
    ``expected`` (or more, ``at_least``) once the writer drained. Returns the counters."""
    result = send_batch(harness)
    assert harness.core.writer.flush(flush_timeout), "the writer did not drain"
    seen = counters()
    record(fault, harness, result, seen)
    assert result.failures == [], result.failures
    if at_least:
        assert seen.get(counter, 0) >= expected, seen
    else:
        assert seen.get(counter, 0) == expected, seen
    return seen
