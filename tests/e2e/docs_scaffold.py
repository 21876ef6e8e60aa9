"""What a reader of the docs already has when a code block starts: an app, routes, tracing.

``tests/e2e/test_docs_examples.py`` runs every fenced block of README.md and docs/*.md.
Many are fragments (``app.add_middleware(ProfilingMiddleware)``): they get an app from here
when they use one without making it, tracing when they do not set it up themselves (the
quickstart asks for a TracerProvider first), and a probe route (``/items/{item_id}``) on
the app they end with, so every served block answers the same question.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI
from flask import Flask, jsonify
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from demo_app.telemetry import configure_tracing

PROBE_PATH = "/items/42"


def _work() -> None:
    end = time.perf_counter() + 0.002
    while time.perf_counter() < end:
        sum(range(50))


def tracing() -> None:
    """An SDK TracerProvider whose spans the test reads (``$OTELPROF_DEMO_SPANS_DIR``)."""
    configure_tracing("docs-examples")


def fastapi_app() -> FastAPI:
    """``app`` for a FastAPI fragment that uses one without making it."""
    return FastAPI()


def flask_app() -> Flask:
    """``app`` for a Flask (WSGI) fragment that uses one without making it."""
    return Flask("docs_example")


async def _starlette_item(request: Request) -> JSONResponse:
    _work()
    return JSONResponse({"item_id": request.path_params["item_id"]})


# ``routes`` for a Starlette fragment (``Starlette(routes=routes, ...)``).
routes = [Route("/items/{item_id:int}", _starlette_item)]


def add_probe_route(app: Any) -> None:
    """Give the block's app ``/items/{item_id}`` unless it has one (FastAPI, Starlette, Flask)."""
    if isinstance(app, FastAPI):
        if not any(getattr(r, "path", "") == "/items/{item_id}" for r in app.router.routes):

            @app.get("/items/{item_id}")
            async def item(item_id: int) -> dict[str, int]:
                _work()
                return {"item_id": item_id}

    elif isinstance(app, Starlette):
        if not any(getattr(r, "path", "").startswith("/items/") for r in app.router.routes):
            app.router.routes.extend(routes)
    elif isinstance(app, Flask) and not any(
        r.rule.startswith("/items/") for r in app.url_map.iter_rules()
    ):

        def flask_item(item_id: int) -> Any:
            _work()
            return jsonify(item_id=item_id)

        app.add_url_rule("/items/<int:item_id>", view_func=flask_item)


DJANGO_SETTINGS = '''\
"""A minimal Django project for the docs' Django blocks (``mysite.settings``)."""

SECRET_KEY = "docs-examples-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "mysite.urls"
INSTALLED_APPS = []
MIDDLEWARE = []
DATABASES = {}
USE_TZ = True

# The docs' own settings blocks follow.
'''

DJANGO_URLS = """\
from django.http import JsonResponse
from django.urls import path


def item(request, item_id):
    return JsonResponse({"item_id": item_id})


urlpatterns = [path("items/<int:item_id>/", item)]
"""
