"""FastAPI app for the honest-profiles tests: every way a request's work can run.

Each response reports how long its marker actually ran (``elapsed``, seconds: in the JSON
body, per chunk of a streamed body, and in the 500 response of the raising endpoint): the
known time a profile is checked against.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

import anyio.to_thread
from fastapi import BackgroundTasks, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from demo_app.telemetry import configure_tracing
from otelprof_middleware import ProfilingMiddleware

from .markers import MARKERS

configure_tracing("otelprof-e2e-honest")
app = FastAPI()
app.add_middleware(ProfilingMiddleware, sample_rate=1.0, debug_route=True, max_concurrent=128)


def _seconds(ms: float) -> float:
    return min(ms, 500.0) / 1000.0


@app.get("/async/{n}")
async def on_loop(n: int, ms: float = 30) -> dict[str, float]:
    await asyncio.sleep(0.002)
    elapsed = MARKERS[n](_seconds(ms))
    await asyncio.sleep(0.002)
    return {"elapsed": elapsed}


@app.get("/def/{n}")
def def_endpoint(n: int, ms: float = 30) -> dict[str, float]:
    return {"elapsed": MARKERS[n](_seconds(ms))}


def sync_dependency(n: int, ms: float = 30) -> float:
    return MARKERS[n](_seconds(ms))


@app.get("/dep/{n}")
async def with_sync_dependency(
    elapsed: Annotated[float, Depends(sync_dependency)],
) -> dict[str, float]:
    return {"elapsed": elapsed}


@app.get("/threadpool/{n}")
async def threadpool(n: int, ms: float = 30) -> dict[str, float]:
    return {"elapsed": await run_in_threadpool(MARKERS[n], _seconds(ms))}


@app.get("/anyio/{n}")
async def anyio_thread(n: int, ms: float = 30) -> dict[str, float]:
    return {"elapsed": await anyio.to_thread.run_sync(MARKERS[n], _seconds(ms))}


@app.get("/executor/{n}")
async def executor(n: int, ms: float = 30) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    return {"elapsed": await loop.run_in_executor(None, MARKERS[n], _seconds(ms))}


@app.get("/to-thread/{n}")
async def to_thread(n: int, ms: float = 30) -> dict[str, float]:
    return {"elapsed": await asyncio.to_thread(MARKERS[n], _seconds(ms))}


@app.get("/stream-async/{n}")
async def stream_async(n: int, ms: float = 30) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        for index in range(3):
            elapsed = MARKERS[n](_seconds(ms) / 3)
            await asyncio.sleep(0.001)
            yield f"chunk {index} {elapsed}\n"

    return StreamingResponse(body(), media_type="text/plain")


@app.get("/stream-sync/{n}")
def stream_sync(n: int, ms: float = 30) -> StreamingResponse:
    def body() -> Iterator[str]:
        for index in range(3):
            elapsed = MARKERS[n](_seconds(ms) / 3)
            yield f"chunk {index} {elapsed}\n"

    return StreamingResponse(body(), media_type="text/plain")


class MarkerFailure(RuntimeError):
    def __init__(self, n: int, elapsed: float) -> None:
        super().__init__(f"marker {n} failed on purpose")
        self.elapsed = elapsed


@app.get("/raise/{n}")
async def raises(n: int, ms: float = 30) -> None:
    raise MarkerFailure(n, MARKERS[n](_seconds(ms)))


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette's outermost ServerErrorMiddleware sends this 500 and re-raises: the
    # exception still goes through the profiling middleware and out to the server.
    return JSONResponse({"elapsed": getattr(exc, "elapsed", None)}, status_code=500)


app.add_exception_handler(Exception, _server_error)


@app.get("/background/{n}")
async def background(n: int, background_tasks: BackgroundTasks, ms: float = 30) -> dict[str, float]:
    # The background task runs after the response is sent, with marker n + 32.
    background_tasks.add_task(MARKERS[n + 32], _seconds(ms))
    return {"elapsed": MARKERS[n](_seconds(ms))}


@app.get("/short")
async def short() -> dict[str, bool]:
    return {"ok": True}
