"""Serving the viewer over ASGI and WSGI: what the middlewares and ``otelprof serve`` share.

Each function translates its protocol's request into a :class:`ViewerRequest` once, asks
:meth:`Viewer.handle`, and sends the :class:`ViewerResponse` back unchanged. A
``?token=`` in the URL is blanked in the attributes of the current span first (an OTel
server span opened around the viewer would otherwise export it).
"""

from __future__ import annotations

from collections.abc import Iterable

import anyio.to_thread
from opentelemetry import trace

from .._net import safe_host
from .._request import app_path
from .._types import Receive, Scope, Send, StartResponse, WSGIEnvironment
from ..profiling._span import redact_viewer_token
from ._http import ViewerRequest, ViewerResponse, plain
from ._viewer import Viewer

__all__ = ["ViewerApp", "serve_asgi", "serve_wsgi"]


async def serve_asgi(
    viewer: Viewer, scope: Scope, send: Send, *, scheme: str | None = None
) -> None:
    """Answer an ASGI HTTP request with ``viewer`` (the middleware and ``otelprof serve``).

    The viewer reads the store synchronously, so it runs in a worker thread. The Host
    header is passed on as is: the viewer validates it before using it in links.

    Args:
        viewer: the viewer.
        scope: the request's ASGI scope (type ``http``).
        send: the ASGI ``send``.
        scheme: the scheme users reach the app with, when not the connection's own.
    """

    if b"token=" in scope.get("query_string", b""):
        redact_viewer_token(trace.get_current_span())
    headers = {
        name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]
    }
    client = scope.get("client")
    request = ViewerRequest(
        method=scope["method"],
        path=app_path(scope),
        query_string=scope.get("query_string", b""),
        headers=headers,
        client_host=client[0] if client else None,
        scheme=scheme or scope.get("scheme", "http"),
        root_path=scope.get("root_path", ""),
    )
    response = await anyio.to_thread.run_sync(viewer.handle, request)
    await _send_asgi(send, response)


async def _send_asgi(send: Send, response: ViewerResponse) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": [
                (name.lower().encode("latin-1"), value.encode("latin-1"))
                for name, value in response.headers
            ],
        }
    )
    await send({"type": "http.response.body", "body": response.body})


def serve_wsgi(
    viewer: Viewer, environ: WSGIEnvironment, start_response: StartResponse
) -> Iterable[bytes]:
    """Answer a WSGI request with ``viewer`` (the WSGI middleware).

    Args:
        viewer: the viewer.
        environ: the request's WSGI environ.
        start_response: the WSGI ``start_response``.

    Returns:
        The body, as one chunk.
    """
    if "token=" in str(environ.get("QUERY_STRING", "")):
        redact_viewer_token(trace.get_current_span())
    headers = {
        key[5:].replace("_", "-").lower(): str(value)
        for key, value in environ.items()
        if key.startswith("HTTP_")
    }
    request = ViewerRequest(
        method=environ.get("REQUEST_METHOD", "GET"),
        path=environ.get("PATH_INFO", ""),
        query_string=str(environ.get("QUERY_STRING", "")).encode("latin-1", "replace"),
        headers=headers,
        client_host=environ.get("REMOTE_ADDR"),
        scheme=environ.get("wsgi.url_scheme", "http"),
        host=safe_host(headers.get("host")),
        root_path=str(environ.get("SCRIPT_NAME", "")),
    )
    response = viewer.handle(request)
    start_response(f"{response.status} {_reason(response.status)}", list(response.headers))
    return [response.body]


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    422: "Unprocessable Content",  # RFC 9110's name (Python 3.11 still says "Entity")
    503: "Service Unavailable",
}


def _reason(status: int) -> str:
    return _REASONS.get(status, "Unknown")


class ViewerApp:
    """A pure ASGI app serving only the viewer's routes (what ``otelprof serve`` runs).

    ``/`` redirects to the viewer; every other path is answered by
    :meth:`Viewer.handle` (404 outside its prefix). Lifespan and websocket scopes are
    accepted and ignored.

    Args:
        viewer: the viewer to serve.
        scheme: the scheme users reach this app with, when a TLS-terminating proxy
            stands in front (``"https"`` makes the token cookie ``Secure``); default:
            the connection's own. Forwarding headers are never read.

    Example::

        app = ViewerApp(Viewer(open_store("redis://cache:6379/0"), token="s3cret"))
        # uvicorn.run(app, host="127.0.0.1", port=8089)
    """

    def __init__(self, viewer: Viewer, *, scheme: str | None = None) -> None:
        self.viewer = viewer
        self.scheme = scheme

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1003})
            return
        if app_path(scope) == "/":
            location = scope.get("root_path", "").rstrip("/") + self.viewer.prefix
            # With the headers of every viewer answer (CSP, nosniff, no-store, ...).
            await _send_asgi(send, plain(307, "", [("location", location)]))
            return
        await serve_asgi(self.viewer, scope, send, scheme=self.scheme)
