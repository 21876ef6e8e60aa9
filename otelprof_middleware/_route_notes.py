"""Route templates that frameworks keep where the adapters cannot read them, copied out.

The adapters read a request's route template from the ASGI scope or WSGI environ when the
response starts. Some frameworks keep it elsewhere, and a hook of ours copies it into the
scope / environ under :data:`~.profiling._span.ROUTE_KEY` once routing has matched:

* Falcon, on its request object (``req.uri_template``): a Falcon middleware of ours;
* Quart, on its request, in a task of its own: its ``request_started`` signal;
* Flask, for a request whose error Flask propagates: its ``got_request_exception`` signal
  (any other Flask request is read from the environ when the response starts), and for
  a ``BaseException``, which has no signal, :func:`flask_rule_in_traceback`;
* Pyramid, on its request object (``request.matched_route.pattern``): a ``ContextFound``
  subscriber of ours.

Imports nothing: each is used only when its framework is already imported.
"""

from __future__ import annotations

import sys
from typing import Any

from ._failsafe import log_failure
from .profiling._span import ROUTE_KEY

__all__ = [
    "flask_rule_in_traceback",
    "note_falcon_routes",
    "note_flask_routes_on_errors",
    "note_pyramid_routes",
    "note_quart_routes",
]


def note_falcon_routes(app: object) -> None:
    """When ``app`` is a Falcon app (WSGI or ASGI), add :class:`_FalconRouteNote` to its
    middleware (Falcon prepares its list again)."""
    falcon_app = sys.modules.get("falcon.app")  # (FalconInstrumentor replaces falcon.App)
    if falcon_app is None or not isinstance(app, falcon_app.App):
        return
    try:
        app.add_middleware(_FalconRouteNote())
    except Exception as exc:
        log_failure("adapter", exc)


class _FalconRouteNote:
    """Copies ``req.uri_template`` into the environ (WSGI) or scope (ASGI) once the route
    is matched (``process_resource`` runs only then)."""

    def process_resource(self, req: Any, resp: Any, resource: object, params: object) -> None:
        _note(req.env, req)

    async def process_resource_async(
        self, req: Any, resp: Any, resource: object, params: object
    ) -> None:
        _note(req.scope, req)


def _note(carrier: dict[str, Any], req: Any) -> None:
    try:
        _keep(carrier, req.uri_template)
    except Exception as exc:
        log_failure("adapter", exc)


def note_pyramid_routes(app: object) -> None:
    """When ``app`` is a Pyramid app (its router): note each request's matched route
    pattern (``/items/{item_id}``) in its environ. Pyramid keeps it on its request object
    only, which the environ does not reach; its ``ContextFound`` event comes once the route
    is matched, before the view runs."""
    router = sys.modules.get("pyramid.router")
    interfaces = sys.modules.get("pyramid.interfaces")
    if router is None or interfaces is None or not isinstance(app, router.Router):
        return
    try:
        app.registry.registerHandler(_note_pyramid_route, (interfaces.IContextFound,))
    except Exception as exc:
        log_failure("adapter", exc)


def _note_pyramid_route(event: Any) -> None:
    """Pyramid's ``ContextFound`` subscriber."""
    try:
        request = event.request
        _keep(request.environ, getattr(request.matched_route, "pattern", None))
    except Exception as exc:
        log_failure("adapter", exc)


def note_quart_routes(app: object) -> None:
    """When ``app`` is a Quart app (or its ``asgi_app``): note each request's matched rule
    in its scope. Quart's ``request_started`` signal comes once the rule is matched, with
    the request current."""
    quart = sys.modules.get("quart")
    if quart is None:
        return
    owner = app if isinstance(app, quart.Quart) else getattr(app, "__self__", None)
    try:
        if isinstance(owner, quart.Quart):
            quart.request_started.connect(_note_quart_route, owner, weak=False)
    except Exception as exc:
        log_failure("adapter", exc)


async def _note_quart_route(sender: object, **extra: object) -> None:
    """Quart's ``request_started`` receiver (a coroutine: Quart would run a plain
    function in a worker thread)."""
    _note_rule(sys.modules["quart"], "scope")


def note_flask_routes_on_errors(app: object) -> None:
    """When ``app`` is a Flask app's ``wsgi_app``: note the matched rule of a request
    whose error Flask propagates (``PROPAGATE_EXCEPTIONS``, on under ``flask run
    --debug`` and in tests). Such a request never calls ``start_response``, where the
    route is read otherwise, and Flask clears ``werkzeug.request`` from the environ as
    the app returns; its ``got_request_exception`` signal comes while the request is
    still there."""
    flask = sys.modules.get("flask")
    if flask is None:
        return
    owner = getattr(app, "__self__", None)
    try:
        if isinstance(owner, flask.Flask):
            flask.got_request_exception.connect(_note_flask_route, owner, weak=False)
    except Exception as exc:
        log_failure("adapter", exc)


def _note_flask_route(sender: object, **extra: object) -> None:
    """Flask's ``got_request_exception`` receiver."""
    _note_rule(sys.modules["flask"], "environ")


def flask_rule_in_traceback(error: BaseException) -> str | None:
    """The matched URL rule of the Flask request that ``error`` ended, read from the
    request context in Flask's ``wsgi_app`` frame of the error's traceback.

    For a ``BaseException``, which Flask never handles and sends no signal for: the
    ``SystemExit`` that gunicorn's sync worker raises in the view when the request
    outlives ``--timeout`` (the profile wanted most), a ``KeyboardInterrupt``. By the time
    it reaches us Flask has cleared its request from the environ, but the finished frame
    of ``wsgi_app`` still holds its request context (``ctx``, the name since Flask 0.x).
    Read only on that error path: Flask's ``request_tearing_down`` signal would carry the
    error too, but costs every request about 1 µs.
    """
    flask_app = sys.modules.get("flask.app")
    if flask_app is None:
        return None
    wsgi_app_code = flask_app.Flask.wsgi_app.__code__
    traceback = error.__traceback__
    while traceback is not None:
        frame = traceback.tb_frame
        if frame.f_code is wsgi_app_code:
            request = getattr(frame.f_locals.get("ctx"), "request", None)
            rule = getattr(getattr(request, "url_rule", None), "rule", None)
            return rule if isinstance(rule, str) and rule else None
        traceback = traceback.tb_next
    return None


def _note_rule(framework: Any, carrier: str) -> None:
    """The current request's matched URL rule (Flask's, Quart's), into its ``carrier``
    (``environ`` or ``scope``)."""
    try:
        request = framework.request
        _keep(getattr(request, carrier), getattr(request.url_rule, "rule", None))
    except Exception as exc:
        log_failure("adapter", exc)


def _keep(carrier: dict[str, Any], template: object) -> None:
    """``template`` under :data:`ROUTE_KEY` unless one is there already."""
    if isinstance(template, str) and template:
        carrier.setdefault(ROUTE_KEY, template)
