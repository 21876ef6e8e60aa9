"""Django integration: tell otelprof (and the server span) which URL pattern matched.

Django resolves the URL pattern inside its own request handling, after the ASGI or WSGI
middleware has started; the pattern ends up on ``request.resolver_match.route``
(``"items/<int:item_id>/"``), nowhere the middleware can see. :class:`RouteMiddleware`
copies it out, as ``/items/<int:item_id>/``:

* into the ASGI scope / WSGI environ under ``"otelprof.route"``, which
  :class:`~otelprof_middleware.ProfilingMiddleware` and
  :class:`~otelprof_middleware.WSGIProfilingMiddleware` read for the profile index;
* onto the current OTel span as ``http.route`` when that span is recording and has no
  ``http.route`` yet (the server span our middleware opened, for instance), as the
  semantic conventions want; the adapters also fall back to that attribute.

This module imports nothing from Django (only asgiref, which Django depends on); add
the dotted path to ``MIDDLEWARE``::

    MIDDLEWARE = [
        "otelprof_middleware.django.RouteMiddleware",
        ...
    ]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from opentelemetry import trace

from ._failsafe import fail_open
from ._inner_join import JOINER_KEY, InnerJoiner
from .profiling._span import ROUTE_KEY

__all__ = ["RouteMiddleware", "record_route", "route_template"]

_HTTP_ROUTE = "http.route"


def route_template(request: Any) -> str | None:
    """The matched URL pattern of a Django request, with a leading ``/``.

    Path-converter routes (``path()``) give e.g. ``/items/<int:item_id>/``; regex routes
    (``re_path()``) are returned as their pattern (``^items/(?P<pk>[0-9]+)/$``).

    Args:
        request: a Django ``HttpRequest`` after URL resolution.

    Returns:
        The template, or None when nothing matched (404) or it is unreadable.
    """
    match = getattr(request, "resolver_match", None)
    route = getattr(match, "route", None)
    if not isinstance(route, str) or not route:
        return None
    if route.startswith(("^", "/")):
        return route
    return "/" + route


class RouteMiddleware:
    """Django middleware copying the matched route to otelprof and the server span.

    Under WSGI with ``DjangoInstrumentor`` (listed before it, as the instrumentor puts its
    own first), it also profiles each request under the instrumentor's span, for our
    WSGI middleware outside Django, which then opens no span of its own: see
    :mod:`otelprof_middleware._inner_join`.

    Sync and async capable: under ASGI it runs as a coroutine on the event loop (no
    thread hop), under WSGI as a plain call. It acts after the inner handlers returned
    (Django has resolved the URL by then, and has turned view exceptions into a
    response), before the response goes out and before the server span ends; also when
    they raised, or Django cancelled the view because its client left (ASGI).

    Example::

        # settings.py
        MIDDLEWARE = ["otelprof_middleware.django.RouteMiddleware", ...]

    Args:
        get_response: the next handler, as Django passes it.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self._is_async = iscoroutinefunction(get_response)
        if self._is_async:
            markcoroutinefunction(self)  # Django then awaits __call__'s result

    def __call__(self, request: Any) -> Any:
        if self._is_async:
            return self._acall(request)
        carrier, joiner = _joiner_of(request)
        if joiner is None:
            try:
                return self.get_response(request)
            finally:  # (also when it raised: DEBUG_PROPAGATE_EXCEPTIONS)
                record_route(request)
        active = joiner.begin(carrier)
        try:
            response = self.get_response(request)
        except BaseException:
            joiner.end(active, status_code=500, route=route_template(request), failed=True)
            raise
        route = record_route(request)
        joiner.end(active, status_code=_status_of(response), route=route, failed=False)
        return response

    async def _acall(self, request: Any) -> Any:
        try:
            return await self.get_response(request)
        finally:  # also when Django cancelled the view (its client went away)
            record_route(request)


def _joiner_of(request: Any) -> tuple[Any, InnerJoiner | None]:
    """The request's WSGI environ, and the joiner our WSGI middleware put there when
    ``DjangoInstrumentor`` opens the server span (None: the middleware outside opened or
    joined a span itself, or is not there)."""
    carrier = getattr(request, "environ", None)
    if isinstance(carrier, dict):
        joiner = carrier.get(JOINER_KEY)
        return carrier, joiner if isinstance(joiner, InnerJoiner) else None
    return None, None


def _status_of(response: Any) -> int:
    status = getattr(response, "status_code", 500)
    return status if isinstance(status, int) else 500


def record_route(request: Any) -> str | None:
    """Copy ``request``'s route template to the scope/environ and the current span, and
    return it.

    Fail-open: never raises. Does nothing (and returns None) when no URL pattern matched.
    """
    route = None
    with fail_open("django.route"):
        route = route_template(request)
        if route is None:
            return None
        # ASGIRequest.scope / WSGIRequest.environ are the very dicts the server handed
        # to the app, so the adapters see the key.
        for carrier in (getattr(request, "scope", None), getattr(request, "environ", None)):
            if isinstance(carrier, dict):
                carrier[ROUTE_KEY] = route
        span = trace.get_current_span()
        if span.is_recording():
            attributes: Mapping[str, Any] | None = getattr(span, "attributes", None)
            if not attributes or _HTTP_ROUTE not in attributes:
                span.set_attribute(_HTTP_ROUTE, route)
    return route
