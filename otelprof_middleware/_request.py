"""What the engine knows about a request: described once by the adapter, never asked again.

An adapter (ASGI, WSGI) translates its framework's request into a :class:`RequestFacts`
when the request starts and hands it to the engine with the server span; at the end it
says how the request ended (status, route when known, whether the app raised). The
engine works out everything else itself (the sampling decision, the profile's link and
base URL, the keep decision) and never calls back into the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RequestFacts"]


@dataclass(slots=True, frozen=True)
class RequestFacts:
    """A request as the engine sees it (framework-free, read once at its start).

    Attributes:
        method: the HTTP method as sent.
        scheme: ``http`` or ``https``, as the server saw it.
        host: the ``Host`` header as sent (checked by the engine before any use).
        server: the server's own ``host:port``, used when ``host`` is missing or unusable.
        root_path: the middleware's mount point (ASGI ``root_path``, WSGI ``SCRIPT_NAME``).
        client_host: the peer's address (the trigger header is honoured from loopback).
        trigger: the trigger header's value, when present and triggers are allowed.
    """

    method: str
    scheme: str = "http"
    host: str | None = None
    server: str | None = None
    root_path: str = ""
    client_host: str | None = None
    trigger: bytes | None = None
