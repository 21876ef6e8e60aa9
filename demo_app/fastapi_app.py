"""The FastAPI demo: ``python -m demo_app`` or ``uvicorn demo_app.fastapi_app:app``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse

from otelprof_middleware import ProfilingMiddleware

from .settings import demo_settings
from .telemetry import configure_tracing
from .work import DemoFailure, crunch_numbers, hash_report, load_settings, render_chunk

configure_tracing("otelprof-demo-fastapi")

app = FastAPI(title="otelprof demo (FastAPI)")
# The package's defaults (every request profiled by the always-on sampler), plus the demo's:
# keep every profile and serve the viewer to loopback clients (demo_app/settings.py).
app.add_middleware(
    ProfilingMiddleware,
    **demo_settings(),
)


@app.get("/cpu")
async def cpu(ms: float = 30.0) -> dict[str, int]:
    """Async endpoint doing CPU work on the event loop."""
    return {"result": crunch_numbers(min(ms, 2000.0))}


@app.get("/io")
async def io(ms: float = 20.0) -> dict[str, float]:
    """Async endpoint waiting on I/O (a sleep stands in for a database call)."""
    await asyncio.sleep(min(ms, 5000.0) / 1000.0)
    return {"waited_ms": ms}


@app.get("/sync")
def sync_report(rows: int = 2000) -> dict[str, str]:
    """A ``def`` endpoint: FastAPI runs it on a worker thread."""
    return {"digest": hash_report(min(rows, 200_000))}


@app.get("/items/{item_id}")
async def item(
    item_id: int, settings: Annotated[dict[str, str], Depends(load_settings)]
) -> dict[str, object]:
    """An endpoint with a sync dependency and a path parameter (route template in the index)."""
    return {"item_id": item_id, "region": settings["region"]}


@app.get("/stream")
async def stream(chunks: int = 20) -> StreamingResponse:
    """A streaming response from an async generator."""

    async def body() -> AsyncIterator[str]:
        for index in range(min(chunks, 1000)):
            yield render_chunk(index)
            await asyncio.sleep(0.001)

    return StreamingResponse(body(), media_type="text/plain")


@app.get("/stream-sync")
def stream_sync(chunks: int = 20) -> StreamingResponse:
    """A streaming response from a sync generator (iterated on worker threads)."""

    def body() -> Iterator[str]:
        for index in range(min(chunks, 1000)):
            yield render_chunk(index)

    return StreamingResponse(body(), media_type="text/plain")


@app.get("/fail")
async def fail() -> None:
    """An endpoint that raises: the profile is kept and the span records the error."""
    crunch_numbers(5)
    raise DemoFailure("the demo endpoint failed on purpose")
