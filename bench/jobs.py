"""In-process cost of worker-thread jobs: a request that runs N thread-pool jobs.

FastAPI runs a ``def`` endpoint, and a sync ``yield`` dependency's enter and exit, through
``anyio.to_thread.run_sync``: three jobs a request for a typical database endpoint. In the
default mode every job of a profiled request goes through the job wrapper
(``profiling._worker_threads``). This measures a trivial ASGI app that runs ``--jobs`` such
jobs per request, behind OTel alone, OTel + the ``floor`` yardstick and OTel + ours with no
arguments, interleaved, and prints the medians (µs per request) and the difference to OTel::

    taskset -c 0 python -m bench.jobs --jobs 3
    taskset -c 0 python -m bench.jobs --jobs 0     # the same request with no job
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import anyio.to_thread
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from starlette.types import Receive, Scope, Send

from bench import overhead
from bench.common import DroppingExporter
from otelprof_middleware import ProfilingMiddleware

__all__ = ["main"]


def _job() -> int:
    return sum(range(50))


def _app_with_jobs(jobs: int) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        for _ in range(jobs):
            await anyio.to_thread.run_sync(_job)
        await send({"type": "http.response.start", "status": 200, "headers": overhead._HEADERS})
        await send({"type": "http.response.body", "body": overhead._BODY})

    return app


async def _measure(stacks: dict[str, Any], rounds: int) -> dict[str, list[float]]:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    samples: dict[str, list[float]] = {name: [] for name in stacks}
    for round_number in range(rounds + 20):  # the first 20: warm-up
        for name, app in stacks.items():
            began = time.perf_counter_ns()
            for _ in range(overhead.CHUNK):
                await app(overhead._asgi_scope(), receive, send)
            if round_number >= 20:
                samples[name].append((time.perf_counter_ns() - began) / overhead.CHUNK / 1000)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3, help="thread-pool jobs per request")
    parser.add_argument("--rounds", type=int, default=200, help="chunks per stack")
    args = parser.parse_args()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DroppingExporter()))
    stacks = overhead._adapter_stacks(
        OpenTelemetryMiddleware,
        ProfilingMiddleware,
        _app_with_jobs(args.jobs),
        provider,
    )
    stacks = {name: stacks[name] for name in ("otel", "floor", "ours_defaults")}
    try:
        samples = asyncio.run(_measure(stacks, args.rounds))
    finally:
        provider.shutdown()
    base = statistics.median(samples["otel"])
    print(f"{args.jobs} jobs per request, medians of {args.rounds} chunks of {overhead.CHUNK}:")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"  {name:14s} {median:8.1f} µs/request   +{median - base:6.1f} µs over otel")


if __name__ == "__main__":
    main()
