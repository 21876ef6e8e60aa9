"""The realistic Flask app: ``gunicorn -k gthread bench.realistic_apps.flask_app:app``."""

from __future__ import annotations

import threading
import time
from typing import Any

import requests
from flask import Flask, render_template
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.instrumentation.requests import RequestsInstrumentor
from pydantic import BaseModel
from sqlalchemy.orm import Session

from bench.realistic_apps.common import (
    TEMPLATES,
    UPSTREAM_URL,
    VARIANT,
    category_page,
    category_products,
    engine,
    gc_stats,
    setup_telemetry,
)
from otelprof_middleware import WSGIProfilingMiddleware

db = engine()
provider = setup_telemetry("realapp-flask", db)
RequestsInstrumentor().instrument(tracer_provider=provider)
app = Flask(__name__, template_folder=str(TEMPLATES))
_local = threading.local()


def _http() -> requests.Session:
    """One ``requests.Session`` per thread (keep-alive to the upstream)."""
    session: requests.Session | None = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
    return session


class Waited(BaseModel):
    waited_ms: float
    ok: bool


@app.get("/items/<int:category_id>")
def items(category_id: int) -> Any:
    with Session(db) as session:
        products = category_products(session, category_id)
    return app.response_class(
        "[" + ",".join(p.model_dump_json() for p in products) + "]",
        mimetype="application/json",
    )


@app.get("/page/<int:category_id>")
def page(category_id: int) -> Any:
    with Session(db) as session:
        products, stats = category_page(session, category_id)
    return render_template(
        "category.html", title=f"Category {category_id}", products=products, stats=stats
    )


@app.get("/upstream")
def upstream() -> Any:
    response = _http().get(UPSTREAM_URL, timeout=5.0)
    response.raise_for_status()
    data = response.json()
    return {**data, "best": max(data["rates"], key=data["rates"].__getitem__)}


@app.get("/_bench/gc")
def bench_gc() -> Any:
    return gc_stats()


@app.get("/sleep")
def sleep() -> Any:
    time.sleep(0.005)
    return Waited(waited_ms=5.0, ok=True).model_dump()


FlaskInstrumentor().instrument_app(app, tracer_provider=provider)
if VARIANT == "ours":
    app.wsgi_app = WSGIProfilingMiddleware(app.wsgi_app)  # type: ignore[method-assign]
