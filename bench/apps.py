"""The benchmark apps: one Starlette (ASGI) and one Flask (WSGI) app per variant.

The variant comes from ``OTELPROF_BENCH_VARIANT`` (read once, at import):

* ``bare``: the app alone, no OpenTelemetry, no profiler.
* ``otel``: OTel SDK (``BatchSpanProcessor`` into an exporter that drops every span)
  and opentelemetry-instrumentation-asgi / -wsgi outermost.
* ``reference``: ``otel`` plus the hand-written "one pyinstrument ``Profiler`` per
  request" middleware users write today (the session is dropped).
* ``floor``: ``otel`` plus the yardstick of :mod:`bench.floor`: the least per-request
  work an always-on profiling layer does (no profile).
* ``lean``: ``otel`` plus the yardstick of :mod:`bench.lean`: our always-on parts (span
  read, sampler registration and ticks, keep policy) with none of the package's layering.
* ``ours_off``: ``otel`` plus our middleware with ``enabled=False``.
* ``ours_defaults``: ``otel`` plus ours with no arguments (always-on, the keep policy).
* ``ours_defaults_otlp``: ``ours_defaults`` plus the OTLP profiles export, sending the kept
  profiles to ``bench.otlp_sink`` (``OTEL_EXPORTER_OTLP_ENDPOINT``, set by ``bench.run``).
* ``ours_1pct``: ``otel`` plus ours in hook mode with ``sample_rate=0.01``.
* ``ours_all``: ``otel`` plus ours in hook mode with ``sample_rate=1.0``, keeping every
  profile (``min_duration_ms=0``), and the default embedded
  SQLite store under ``OTELPROF_STATE_DIR`` (store and writer exercised),
  ``max_concurrent=256``.
* ``pyroscope_otel``: ``otel`` plus Grafana's span profiles as their docs set them up:
  ``pyroscope.configure`` (pyroscope-io's agent, 100 Hz) and pyroscope-otel's
  ``PyroscopeSpanProcessor``, pushing to ``bench.otlp_sink`` (``OTELPROF_BENCH_SINK``).
* ``sentry_continuous``: ``otel`` plus sentry-sdk's continuous profiler
  (``profile_session_sample_rate=1.0``, ``profile_lifecycle="manual"``, started; no Sentry
  tracing: OTel traces) with its default integrations, sending to ``bench.otlp_sink``.

Ours and the reference sit *inside* the OTel middleware, so they join its server span.

Endpoints (both apps): ``/tiny`` (``{"ok": true}``), ``/cpu`` (~5 ms of call-heavy pure
Python: recursive ``fib``), ``/io`` (a 20 ms sleep: ``asyncio.sleep`` / ``time.sleep``) and
the bench-only ``/_bench/counters`` (our failure/drop counters and store stats).

The ``/cpu`` work is ``CPU_ITERATIONS`` calls of ``fib(FIB_N)``. ``bench.run`` calibrates
the count once and passes it to every server in ``OTELPROF_BENCH_CPU_ITERATIONS``, so all
variants do exactly the same work; without it, the count is calibrated here at import.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable
from typing import Any

from flask import Flask
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware as OTelASGIMiddleware
from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware as OTelWSGIMiddleware
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from pyinstrument import Profiler
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

import otelprof_middleware
from bench.common import COMPETITOR_VARIANTS, VARIANTS, DroppingExporter, cpu_work
from bench.floor import FloorASGIMiddleware, FloorWSGIMiddleware
from bench.lean import LeanASGIMiddleware, LeanWSGIMiddleware
from otelprof_middleware import ProfilingMiddleware, WSGIProfilingMiddleware

__all__ = [
    "CPU_ITERATIONS",
    "ReferenceASGIMiddleware",
    "ReferenceWSGIMiddleware",
    "asgi_app",
    "calibrate",
    "wsgi_app",
]

REFERENCE_INTERVAL = 0.001
"""The reference profiler's interval: the same 1 ms as our default ``interval_ms``."""
IO_SECONDS = 0.02


def calibrate(target_seconds: float = 0.005, *, probe: int = 50, repeats: int = 7) -> int:
    """The number of ``fib(FIB_N)`` calls that take ``target_seconds`` unprofiled.

    Uses the fastest of ``repeats`` timed probes: on a shared machine the minimum is the
    closest to the undisturbed cost.
    """
    cpu_work(probe)  # warm up
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        cpu_work(probe)
        best = min(best, time.perf_counter() - began)
    return max(1, round(target_seconds / (best / probe)))


def _cpu_iterations() -> int:
    text = os.environ.get("OTELPROF_BENCH_CPU_ITERATIONS", "").strip()
    return int(text) if text else calibrate()


VARIANT = os.environ.get("OTELPROF_BENCH_VARIANT", "bare")
if VARIANT not in VARIANTS:
    raise ValueError(f"OTELPROF_BENCH_VARIANT must be one of {VARIANTS}, got {VARIANT!r}")
CPU_ITERATIONS = _cpu_iterations()


def _tracer_provider() -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "otelprof-bench"}))
    provider.add_span_processor(BatchSpanProcessor(DroppingExporter()))
    trace.set_tracer_provider(provider)
    return provider


class ReferenceASGIMiddleware:
    """What users hand-write today: a fresh pyinstrument ``Profiler`` per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        profiler = Profiler(async_mode="enabled", interval=REFERENCE_INTERVAL)
        profiler.start()
        try:
            await self.app(scope, receive, send)
        finally:
            profiler.stop()  # the session is dropped: the profiling cost alone


class ReferenceWSGIMiddleware:
    """The WSGI twin of :class:`ReferenceASGIMiddleware`, around the app call."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        profiler = Profiler(interval=REFERENCE_INTERVAL)
        profiler.start()
        try:
            result: Iterable[bytes] = self.app(environ, start_response)
            return result
        finally:
            profiler.stop()


def _ours_settings() -> dict[str, Any]:
    # Every variant but ``ours_defaults`` spells out its mode and keep rule, so it keeps
    # its meaning whatever the package's defaults are.
    if VARIANT == "ours_off":
        return {"enabled": False}
    if VARIANT == "ours_defaults":  # the one line with no arguments
        return {}
    if VARIANT == "ours_defaults_otlp":  # and the OTLP profiles export (bench.otlp_sink)
        return {"otlp_profiles": True}
    if VARIANT == "ours_1pct":
        return {"sample_rate": 0.01, "mode": "hook", "min_duration_ms": 0}
    if VARIANT == "ours_always_on":
        return {"sample_rate": 1.0, "mode": "always_on", "min_duration_ms": 0}
    if VARIANT == "ours_always_on_slow":  # a threshold of the user's own
        return {"sample_rate": 1.0, "mode": "always_on", "min_duration_ms": 100}
    return {"sample_rate": 1.0, "mode": "hook", "min_duration_ms": 0, "max_concurrent": 256}


_ours: ProfilingMiddleware | WSGIProfilingMiddleware | None = None


def _counters() -> dict[str, Any]:
    """Our counters, plus the store's ``(count, bytes)`` when ours keeps profiles."""
    data: dict[str, Any] = {
        "variant": VARIANT,
        "pid": os.getpid(),
        "package_path": os.path.dirname(otelprof_middleware.__file__ or ""),
        "counters": otelprof_middleware.counters(),
    }
    if _ours is not None and VARIANT in (
        "ours_defaults",
        "ours_defaults_otlp",
        "ours_1pct",
        "ours_all",
        "ours_always_on",
        "ours_always_on_slow",
    ):
        try:
            _ours.core.writer.flush(timeout=5.0)
            profiles, size = _ours.core.get_store().stats()
            data["store"] = {"profiles": profiles, "bytes": size}
        except Exception as exc:  # report, never break the bench
            data["store_error"] = f"{type(exc).__name__}: {exc}"
    return data


# --- ASGI: Starlette ---------------------------------------------------------------


async def _tiny(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


async def _cpu(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True, "sum": cpu_work(CPU_ITERATIONS)})


async def _io(request: Request) -> JSONResponse:
    await asyncio.sleep(IO_SECONDS)
    return JSONResponse({"ok": True})


async def _bench_counters(request: Request) -> JSONResponse:
    return JSONResponse(_counters())


def _build_asgi() -> ASGIApp:
    global _ours
    app: ASGIApp = Starlette(
        routes=[
            Route("/tiny", _tiny),
            Route("/cpu", _cpu),
            Route("/io", _io),
            Route("/_bench/counters", _bench_counters),
        ]
    )
    if VARIANT == "bare":
        return app
    provider = _tracer_provider()
    if VARIANT == "reference":
        app = ReferenceASGIMiddleware(app)
    elif VARIANT == "floor":
        app = FloorASGIMiddleware(app)
    elif VARIANT == "lean":
        app = LeanASGIMiddleware(app)
    elif VARIANT.startswith("ours_"):
        _ours = ProfilingMiddleware(app, tracer_provider=provider, **_ours_settings())
        app = _ours
    elif VARIANT == "pyroscope_otel":
        _start_pyroscope(provider)
    return OTelASGIMiddleware(app, tracer_provider=provider)


# --- WSGI: Flask -------------------------------------------------------------------


def _build_wsgi() -> Flask:
    global _ours
    flask_app = Flask("otelprof_bench")

    @flask_app.get("/tiny")
    def tiny() -> dict[str, Any]:
        return {"ok": True}

    @flask_app.get("/cpu")
    def cpu() -> dict[str, Any]:
        return {"ok": True, "sum": cpu_work(CPU_ITERATIONS)}

    @flask_app.get("/io")
    def io() -> dict[str, Any]:
        time.sleep(IO_SECONDS)
        return {"ok": True}

    @flask_app.get("/_bench/counters")
    def bench_counters() -> dict[str, Any]:
        return _counters()

    if VARIANT == "bare":
        return flask_app
    provider = _tracer_provider()
    inner: Any = flask_app.wsgi_app
    if VARIANT == "reference":
        inner = ReferenceWSGIMiddleware(inner)
    elif VARIANT == "floor":
        inner = FloorWSGIMiddleware(inner)
    elif VARIANT == "lean":
        inner = LeanWSGIMiddleware(inner)
    elif VARIANT.startswith("ours_"):
        _ours = WSGIProfilingMiddleware(inner, tracer_provider=provider, **_ours_settings())
        inner = _ours
    elif VARIANT == "pyroscope_otel":
        _start_pyroscope(provider)
    flask_app.wsgi_app = OTelWSGIMiddleware(inner, tracer_provider=provider)  # type: ignore[method-assign]
    return flask_app


def _start_sentry() -> None:
    """sentry-sdk's continuous profiler, before the apps exist (its integrations patch
    Starlette and Flask when it is initialised)."""
    import sentry_sdk

    sink = os.environ["OTELPROF_BENCH_SINK"].removeprefix("http://")
    sentry_sdk.init(
        dsn=f"http://public@{sink}/1",
        profile_session_sample_rate=1.0,
        profile_lifecycle="manual",
    )
    sentry_sdk.profiler.start_profiler()


def _start_pyroscope(provider: TracerProvider) -> None:
    """Grafana's span profiles: pyroscope-io's agent and pyroscope-otel's processor."""
    import pyroscope  # type: ignore[import-untyped]
    from pyroscope.otel import PyroscopeSpanProcessor  # type: ignore[import-untyped]

    pyroscope.configure(
        application_name="otelprof-bench", server_address=os.environ["OTELPROF_BENCH_SINK"]
    )
    provider.add_span_processor(PyroscopeSpanProcessor())


def _build() -> tuple[ASGIApp, Flask]:
    if VARIANT in COMPETITOR_VARIANTS and not os.environ.get("OTELPROF_BENCH_SINK"):
        raise RuntimeError(f"{VARIANT} sends profiles to OTELPROF_BENCH_SINK (set by bench.run)")
    if VARIANT == "sentry_continuous":
        _start_sentry()
    server = os.environ.get("OTELPROF_BENCH_SERVER", "")
    # Each server process builds only its own app, so only one middleware (one core,
    # one writer, one store) exists per process.
    asgi = _build_asgi() if server != "wsgi" else _unused_asgi
    wsgi = _build_wsgi() if server != "asgi" else Flask("otelprof_bench_unused")
    return asgi, wsgi


async def _unused_asgi(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("bench.apps was imported for the WSGI server (OTELPROF_BENCH_SERVER)")


asgi_app, wsgi_app = _build()
