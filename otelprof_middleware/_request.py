"""What the engine knows about a request: described once by the adapter, never asked again.

An adapter (ASGI, WSGI) translates its framework's request into a :class:`RequestFacts`
when the request starts and hands it to the engine with the server span; at the end it
says how the request ended (status, route when known, whether the app raised). The
engine works out everything else itself (the sampling decision, the profile's link and
base URL, the keep decision) and never calls back into the adapter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["RequestFacts", "app_path", "normalise_method"]

_KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)


@dataclass(slots=True)
class RequestFacts:
    """A request as the engine sees it (framework-free, taken once at its start).

    Attributes:
        method: the HTTP method as sent.
        scheme: ``http`` or ``https``, as the server saw it.
        host: the ``Host`` header as sent, when the adapter has it at hand (checked by the
            engine before any use).
        headers: the raw request headers (ASGI), where the engine finds the ``Host``
            header when ``host`` is None and a link is made: most requests never need it.
        server: the server's own host and port, used when the Host is missing or unusable.
        root_path: the middleware's mount point (ASGI ``root_path``, WSGI ``SCRIPT_NAME``).
        client_host: the peer's address (the trigger header is honoured from loopback).
        trigger: the trigger header's value, when present and triggers are allowed.

    Not frozen: a frozen dataclass costs three times as much to build, on every request.
    The adapters pass the fields in order, not by name: a class called with keyword
    arguments builds a dict of them first, and that costs more than the rest of the call.
    """

    method: str
    scheme: str = "http"
    host: str | None = None
    headers: Sequence[tuple[bytes, bytes]] = ()
    server: tuple[str, int | str | None] | None = None
    root_path: str = ""
    client_host: str | None = None
    trigger: bytes | None = None

    def host_header(self) -> str | None:
        """The ``Host`` header as sent (from ``host``, else from ``headers``)."""
        if self.host is not None:
            return self.host
        for name, value in self.headers:
            if name == b"host":
                return value.decode("latin-1")
        return None

    def server_address(self) -> str | None:
        """The server's ``host:port``."""
        if not self.server:
            return None
        host, port = self.server
        return f"{host}:{port}" if port is not None else host


def app_path(scope: Mapping[str, Any]) -> str:
    """The request path below the app's mount point (``root_path``), as Starlette reads it.

    Servers differ: uvicorn's ``--root-path`` and ``FastAPI(root_path=...)`` put the
    prefix in ``root_path`` and keep it in ``path`` too (the ASGI spec's reading), older
    set-ups leave it out of ``path``. Both give the same answer here.
    """
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        if len(path) == len(root_path):
            return "/"
        if path[len(root_path)] == "/":
            return path[len(root_path) :]
    return path


def normalise_method(method: str) -> str:
    """The request method, or ``_OTHER`` as OTel's semantic conventions spell unknown ones."""
    return method if method in _KNOWN_METHODS else "_OTHER"
