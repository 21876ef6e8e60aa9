"""The realistic FastAPI app: ``uvicorn bench.realistic_apps.fastapi_app:app``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from pydantic import BaseModel
from sqlalchemy.orm import Session

from bench.realistic_apps.common import (
    TEMPLATES,
    UPSTREAM_URL,
    VARIANT,
    ProductOut,
    category_page,
    category_products,
    engine,
    gc_stats,
    setup_telemetry,
)
from otelprof_middleware import ProfilingMiddleware

db = engine()
provider = setup_telemetry("realapp-fastapi", db)
HTTPXClientInstrumentor().instrument(tracer_provider=provider)
templates = Jinja2Templates(directory=str(TEMPLATES))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with httpx.AsyncClient(timeout=5.0) as client:
        app.state.client = client
        yield


app = FastAPI(lifespan=lifespan)


def get_session() -> Iterator[Session]:
    with Session(db) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


class Quote(BaseModel):
    currency: str
    rates: dict[str, float]
    source: str
    best: str


class Waited(BaseModel):
    waited_ms: float
    ok: bool


@app.get("/items/{category_id}", response_model=list[ProductOut])
def items(category_id: int, session: SessionDep) -> Any:
    return category_products(session, category_id)


@app.get("/page/{category_id}", response_class=HTMLResponse)
def page(request: Request, category_id: int, session: SessionDep) -> Any:
    products, stats = category_page(session, category_id)
    return templates.TemplateResponse(
        request,
        "category.html",
        {"title": f"Category {category_id}", "products": products, "stats": stats},
    )


@app.get("/upstream", response_model=Quote)
async def upstream(request: Request) -> Any:
    response = await request.app.state.client.get(UPSTREAM_URL)
    response.raise_for_status()
    data = response.json()
    return Quote(**data, best=max(data["rates"], key=data["rates"].__getitem__))


@app.get("/_bench/gc")
def bench_gc() -> Any:
    return gc_stats()


@app.get("/sleep", response_model=Waited)
async def sleep() -> Any:
    await asyncio.sleep(0.005)
    return Waited(waited_ms=5.0, ok=True)


FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
if VARIANT == "ours":
    app.add_middleware(ProfilingMiddleware)
