"""In-process cost of starting and stopping one request's profile, in microseconds.

Compares, per request, in plain sync code and inside a running asyncio task:

* ``nothing``: an empty timed block (the timer's own cost);
* ``pyinstrument``: ``Profiler(interval=0.001)`` created, ``start()``, ``stop()``
  (what the reference middleware does);
* ``ours_unsampled``: our core's ``start()`` on a request the sampler turns down
  (``sample_rate=0``): the cost every unprofiled request pays;
* ``ours``: our core's ``start()`` / ``finish()`` / ``detach()`` at ``sample_rate=1``
  with a :class:`MemoryStore` (hand-off to the writer included; the writer's own work
  runs after the timed block: the queue is flushed between repeats, untimed).

Also the background writer's work per kept profile (``writer``): serialising and
compressing the session (``ProfileRecord.from_session``) and ``SQLiteStore.put`` (at
the default 1000-profile bound, so eviction is included), for an empty profile and for
one of ~1 ms of call-heavy work. It runs off the request path, but in the same process.

And the whole unprofiled request through the adapters (``adapters``): a trivial ASGI and
WSGI app behind the OTel middleware alone, and behind OTel + ours with ``enabled=False``
and with ``sample_rate=0`` (the path of every unsampled request), driven in-process with
a fake server. This is the budget's "not profiled" cost without server-process noise.
``ours_defaults`` is the no-argument line (every request profiled by the always-on
sampler; a trivial request's profile is never kept): the per-request cost of the defaults.
``floor`` is a yardstick, not a product: the least per-request work any always-on layer
has to do (a record, a contextvar, the task or thread registered, the status noted, the
duration recorded; no profile), so ``ours_defaults`` minus ``floor`` is what our design
costs above that minimum.

And what an installed hook costs code that is not being profiled (``hook``): the same
work with and without a pyinstrument ``setstatprofile`` hook that never takes a sample,
as every request on a thread pays while another request on it is profiled.

Each figure is the median (and 90th percentile) of many repeats. Run it pinned to one
core: ``taskset -c 0 python -m bench.overhead``; prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware as OTelASGIMiddleware
from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware as OTelWSGIMiddleware
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from pyinstrument import Profiler
from pyinstrument.low_level.stat_profile import setstatprofile
from starlette.types import Receive, Scope, Send

from bench.common import DroppingExporter, cpu_work
from bench.floor import FloorASGIMiddleware, FloorWSGIMiddleware
from bench.lean import LeanASGIMiddleware, LeanWSGIMiddleware
from otelprof_middleware import (
    Config,
    ProfileRecord,
    ProfileSummary,
    ProfilingMiddleware,
    WSGIProfilingMiddleware,
    open_store,
)
from otelprof_middleware._request import RequestFacts
from otelprof_middleware.profiling._engine import ProfilerCore
from otelprof_middleware.stores.memory import MemoryStore

FACTS = RequestFacts(method="GET")

__all__ = ["measure"]

INTERVAL = 0.001

Case = Callable[[], int]
"""One repeat: does the work and returns the nanoseconds its timed part took."""


def _summary(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    return {
        "median_us": statistics.median(ordered) / 1000.0,
        "p90_us": ordered[int(len(ordered) * 0.9)] / 1000.0,
        "min_us": ordered[0] / 1000.0,
        "repeats": len(ordered),
    }


def _cases(async_mode: bool) -> tuple[dict[str, Case], Callable[[], None]]:
    provider = TracerProvider()
    tracer = provider.get_tracer("otelprof-bench")
    profiled = ProfilerCore(
        Config.load({}, sample_rate=1.0, mode="hook", min_duration_ms=0), store=MemoryStore()
    )
    unsampled = ProfilerCore(Config.load({}, sample_rate=0.0, mode="hook"), store=MemoryStore())
    clock = time.perf_counter_ns

    def nothing() -> int:
        began = clock()
        return clock() - began

    def pyinstrument() -> int:
        began = clock()
        profiler = Profiler(interval=INTERVAL, async_mode="enabled" if async_mode else "disabled")
        profiler.start()
        profiler.stop()
        return clock() - began

    def ours_unsampled() -> int:
        span = tracer.start_span("GET /x")
        began = clock()
        active = unsampled.start(span, span.get_span_context(), FACTS)
        elapsed = clock() - began
        span.end()
        if active is not None:
            raise RuntimeError("sample_rate=0 started a profile")
        return elapsed

    def ours() -> int:
        span = tracer.start_span("GET /x")
        began = clock()
        active = profiled.start(span, span.get_span_context(), FACTS)
        if active is None:
            raise RuntimeError("sample_rate=1 did not start a profile")
        profiled.finish(active, status_code=200, route="/x")
        profiled.detach(active)
        elapsed = clock() - began
        span.end()
        profiled.writer.flush(timeout=5.0)  # the writer's work stays out of the next repeat
        return elapsed

    def close() -> None:
        profiled.writer.close(2.0)
        unsampled.writer.close(2.0)
        provider.shutdown()

    return {
        "nothing": nothing,
        "pyinstrument": pyinstrument,
        "ours_unsampled": ours_unsampled,
        "ours": ours,
    }, close


def _run(cases: dict[str, Case], repeats: int) -> dict[str, dict[str, float]]:
    for case in cases.values():  # warm up
        for _ in range(min(50, repeats)):
            case()
    samples: dict[str, list[int]] = {name: [] for name in cases}
    # Interleave the cases so drift on a shared machine hits all of them alike.
    for _ in range(repeats):
        for name, case in cases.items():
            samples[name].append(case())
    if sys.getprofile() is not None:
        raise RuntimeError("a profiler hook was left installed")
    return {name: _summary(values) for name, values in samples.items()}


class _Captured:
    """Stands in for the core's writer: keeps what ``finish()`` hands over."""

    def __init__(self) -> None:
        self.items: list[tuple[ProfileSummary, Any]] = []

    def submit(self, summary: ProfileSummary, session: Any) -> bool:
        self.items.append((summary, session))
        return True


def _profile_of(work_iterations: int) -> tuple[ProfileSummary, Any]:
    """A real (summary, session) from our core, around ``cpu_work(work_iterations)``."""
    provider = TracerProvider()
    core = ProfilerCore(
        Config.load({}, sample_rate=1.0, mode="hook", min_duration_ms=0), store=MemoryStore()
    )
    captured = _Captured()
    core.keeper.writer = captured  # type: ignore[assignment]  # only submit() is used
    span = provider.get_tracer("otelprof-bench").start_span("GET /x")
    active = core.start(span, span.get_span_context(), FACTS)
    if active is None:
        raise RuntimeError("sample_rate=1 did not start a profile")
    cpu_work(work_iterations)
    core.finish(active, status_code=200, route="/x")
    core.detach(active)
    span.end()
    provider.shutdown()
    return captured.items[0]


def measure_writer(repeats: int) -> dict[str, dict[str, float]]:
    """Per kept profile: serialise+compress, then SQLite put; empty and ~1 ms profiles."""
    results: dict[str, dict[str, float]] = {}
    clock = time.perf_counter_ns
    with tempfile.TemporaryDirectory(prefix="otelprof-bench-") as tmp:
        for label, iterations in (("empty", 0), ("1ms", 60)):
            summary, session = _profile_of(iterations)
            store = open_store("sqlite:///" + str(Path(tmp) / f"{label}.db"))
            encode: list[int] = []
            put: list[int] = []
            size = 0
            try:
                for number in range(repeats + 1000):  # the first 1000 fill the store
                    began = clock()
                    record = ProfileRecord.from_session(summary, session)
                    encoded = clock()
                    unique = dataclasses.replace(summary, trace_id=f"{number + 1:032x}")
                    store.put(dataclasses.replace(record, summary=unique))
                    stored = clock()
                    if number >= 1000:
                        encode.append(encoded - began)
                        put.append(stored - encoded)
                        size = record.size
            finally:
                store.close()
            results[f"encode_{label}"] = _summary(encode)
            results[f"sqlite_put_{label}"] = _summary(put)
            results[f"payload_bytes_{label}"] = {"median_us": float(size), "repeats": 1}
            results[f"samples_{label}"] = {
                "median_us": float(summary.sample_count),
                "repeats": 1,
            }
    return results


_BODY = b'{"ok":true}'
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"11")]
CHUNK = 20
"""Requests per timed chunk; the chunks of the stacks are interleaved."""


async def _asgi_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _BODY})


def _wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "11")])
    return [_BODY]


def _asgi_scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/tiny",
        "raw_path": b"/tiny",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"wrk")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


def _wsgi_environ() -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/tiny",
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "127.0.0.1:8000",
        "HTTP_USER_AGENT": "wrk",
        "wsgi.url_scheme": "http",
        "wsgi.input": None,
        "wsgi.errors": sys.stderr,
    }


def _adapter_stacks(otel: Any, ours: Any, app: Any, provider: TracerProvider) -> dict[str, Any]:
    """The stacks measured per API: OTel alone, OTel around the ``floor`` and ``lean``
    yardsticks, and OTel around ours off, unsampled or with the defaults."""
    floor = FloorASGIMiddleware if otel is OTelASGIMiddleware else FloorWSGIMiddleware
    lean = LeanASGIMiddleware if otel is OTelASGIMiddleware else LeanWSGIMiddleware
    return {
        "otel": otel(app, tracer_provider=provider),
        "floor": otel(floor(app), tracer_provider=provider),
        "lean": otel(lean(app), tracer_provider=provider),
        "ours_off": otel(
            ours(app, tracer_provider=provider, enabled=False), tracer_provider=provider
        ),
        "ours_unsampled": otel(
            ours(app, tracer_provider=provider, sample_rate=0.0), tracer_provider=provider
        ),
        # The no-argument line: every request profiled by the always-on sampler, none kept
        # (a trivial request is never slow for its route).
        "ours_defaults": otel(
            ours(app, tracer_provider=provider, profile_store=MemoryStore()),
            tracer_provider=provider,
        ),
    }


def measure_adapters(repeats: int) -> dict[str, dict[str, float]]:
    """Per-request µs of a trivial app behind OTel alone and behind OTel + ours, unprofiled.

    ``repeats`` chunks of ``CHUNK`` requests per stack, interleaved; per-request figures
    are chunk means, summarised by median and 90th percentile.
    """
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DroppingExporter()))
    asgi_stacks = _adapter_stacks(OTelASGIMiddleware, ProfilingMiddleware, _asgi_app, provider)
    wsgi_stacks = _adapter_stacks(OTelWSGIMiddleware, WSGIProfilingMiddleware, _wsgi_app, provider)
    clock = time.perf_counter_ns
    results: dict[str, dict[str, float]] = {}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    async def asgi_chunk(app: Any) -> int:
        began = clock()
        for _ in range(CHUNK):
            await app(_asgi_scope(), receive, send)
        return clock() - began

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        return None

    def wsgi_chunk(app: Any) -> int:
        began = clock()
        for _ in range(CHUNK):
            body = app(_wsgi_environ(), start_response)
            for _chunk in body:
                pass
            close = getattr(body, "close", None)
            if close is not None:
                close()
        return clock() - began

    async def run_asgi() -> dict[str, list[int]]:
        samples: dict[str, list[int]] = {name: [] for name in asgi_stacks}
        for _ in range(10):  # warm up
            for app in asgi_stacks.values():
                await asgi_chunk(app)
        for _ in range(repeats):
            for name, app in asgi_stacks.items():
                samples[name].append(await asgi_chunk(app) // CHUNK)
        return samples

    try:
        for name, values in asyncio.run(run_asgi()).items():
            results[f"asgi_{name}"] = _summary(values)
        samples: dict[str, list[int]] = {name: [] for name in wsgi_stacks}
        for _ in range(10):
            for app in wsgi_stacks.values():
                wsgi_chunk(app)
        for _ in range(repeats):
            for name, app in wsgi_stacks.items():
                samples[name].append(wsgi_chunk(app) // CHUNK)
        for name, values in samples.items():
            results[f"wsgi_{name}"] = _summary(values)
    finally:
        provider.shutdown()
    return results


def _plain_loop() -> int:
    """A loop with few Python calls: arithmetic and a dict per iteration."""
    total = 0
    for number in range(2000):
        total += len({"n": number, "odd": number % 2}) + number % 7
    return total


def measure_hook(repeats: int) -> dict[str, dict[str, float]]:
    """Work timed without and with a ``setstatprofile`` hook that never samples."""
    clock = time.perf_counter_ns
    works: dict[str, Callable[[], int]] = {
        "fib": lambda: cpu_work(20),
        "loop": _plain_loop,
    }
    samples: dict[str, list[int]] = {}
    for name, work in works.items():
        for state in ("off", "on"):
            samples[f"{name}_{state}"] = []
        for _ in range(repeats):
            began = clock()
            work()
            samples[f"{name}_off"].append(clock() - began)
            setstatprofile(target=lambda *args: None, interval=3600.0)
            try:
                began = clock()
                work()
                samples[f"{name}_on"].append(clock() - began)
            finally:
                setstatprofile(None)
    return {name: _summary(values) for name, values in samples.items()}


def measure(repeats: int = 2000) -> dict[str, dict[str, dict[str, float]]]:
    """``{"sync": {case: stats}, "async": {...}, "writer": {...}}``; times in microseconds."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    cases, close = _cases(async_mode=False)
    try:
        results["sync"] = _run(cases, repeats)
    finally:
        close()

    async def in_task() -> dict[str, dict[str, float]]:
        cases, close = _cases(async_mode=True)
        try:
            return _run(cases, repeats)
        finally:
            close()

    results["async"] = asyncio.run(in_task())
    results["writer"] = measure_writer(max(100, repeats // 4))
    results["adapters"] = measure_adapters(max(50, repeats // 2))
    results["hook"] = measure_hook(max(20, repeats // 10))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    print(json.dumps(measure(args.repeats)))


if __name__ == "__main__":
    main()
