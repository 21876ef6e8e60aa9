"""The viewer's HTTP vocabulary: requests, responses, the abort that ends a handler early,
and the headers every answer carries (content type, Content-Security-Policy, nosniff, ...).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DATA_CSP",
    "FRAME_CSP",
    "PAGE_CSP",
    "PROFILE_CSP",
    "Abort",
    "ViewerRequest",
    "ViewerResponse",
    "framable",
    "html_response",
    "json_response",
    "plain",
    "response",
]

PAGE_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
"""Our own pages: our markup and styles, no script, nothing fetched."""

DATA_CSP = (
    "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; sandbox"
)
"""Text, JSON and error bodies: nothing may load or run, even if a browser renders them."""

FRAME_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""The frame around a profile: our markup, no script, and pyinstrument's page of the same
origin in an ``<iframe>``."""

PROFILE_CSP = (
    "default-src 'none'; script-src {scripts}; style-src 'unsafe-inline'; img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
)
"""pyinstrument's page: its two inline scripts, allowed by hash (``{scripts}``), so nothing
injected can run; inline styles (its app sets style attributes); its data: images. Nothing
external (``render()`` removes its web-font link). Framed by our own pages only."""

TEXT = "text/plain; charset=utf-8"
HTML = "text/html; charset=utf-8"
JSON = "application/json; charset=utf-8"


@dataclass(frozen=True)
class ViewerRequest:
    """What the viewer needs of one HTTP request.

    Args:
        method: the HTTP method, e.g. ``"GET"``.
        path: the URL path, percent-decoded (ASGI's ``scope["path"]``).
        query_string: the raw query string, without ``?``.
        headers: request headers; names in lowercase.
        client_host: the peer's IP address (ASGI ``scope["client"][0]``,
            WSGI ``REMOTE_ADDR``), ``None`` when unknown.
        scheme: ``"http"`` or ``"https"``; used for absolute links.
        host: the ``Host`` the client used (with port); default: the ``host`` header.
        root_path: the prefix the app is mounted under (ASGI ``root_path``, WSGI
            ``SCRIPT_NAME``), put before every link; ``path`` is below it.
    """

    method: str
    path: str
    query_string: bytes
    headers: Mapping[str, str]
    client_host: str | None
    scheme: str = "http"
    host: str | None = None
    root_path: str = ""

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (any case), ``None`` when absent."""
        return lower_headers(self.headers).get(name)


@dataclass(frozen=True)
class ViewerResponse:
    """The viewer's answer, ready to send.

    Args:
        status: HTTP status code.
        headers: ``(name, value)`` pairs, names in lowercase; includes
            ``content-type`` and ``content-length``.
        body: the body (empty for ``HEAD``).
    """

    status: int
    headers: list[tuple[str, str]]
    body: bytes


class Abort(Exception):
    """Stop handling and answer ``status`` with a plain-text ``message``."""

    def __init__(self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)

    def response(self) -> ViewerResponse:
        """This abort as the plain-text answer to send."""
        return plain(self.status, self.message, self.headers)


def lower_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` with lowercase names."""
    return {name.lower(): value for name, value in headers.items()}


def response(
    status: int,
    content_type: str,
    body: bytes,
    csp: str,
    extra: Sequence[tuple[str, str]] = (),
) -> ViewerResponse:
    """An answer with the headers every viewer answer carries, then ``extra``.

    ``X-Frame-Options: DENY`` unless ``extra`` sets its own.
    """
    headers = [
        ("content-type", content_type),
        ("content-length", str(len(body))),
        ("content-security-policy", csp),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
        *extra,
    ]
    if not any(name == "x-frame-options" for name, _ in extra):
        headers.append(("x-frame-options", "DENY"))
    return ViewerResponse(status, headers, body)


def plain(status: int, message: str, extra: Sequence[tuple[str, str]] = ()) -> ViewerResponse:
    """A plain-text answer (errors, refusals)."""
    return response(status, TEXT, message.encode("utf-8"), DATA_CSP, extra)


def framable(answer: ViewerResponse) -> ViewerResponse:
    """``answer`` (an error) allowed in a frame of our own origin, as pyinstrument's page.

    An error of a page our frames show (a corrupt profile's ``.../flame``) must be
    readable there: with ``frame-ancestors 'none'`` the browser shows a blocked frame
    ("refused to connect") instead of the message. Still ``sandbox``: nothing runs.
    """
    headers = []
    for name, value in answer.headers:
        if name == "content-security-policy":
            value = value.replace("frame-ancestors 'none'", "frame-ancestors 'self'")
        elif name == "x-frame-options":
            value = "SAMEORIGIN"
        headers.append((name, value))
    return ViewerResponse(answer.status, headers, answer.body)


def html_response(page: str, csp: str = PAGE_CSP) -> ViewerResponse:
    """A 200 with one of our pages (``csp``: :data:`PAGE_CSP`, or :data:`FRAME_CSP`)."""
    return response(200, HTML, page.encode("utf-8"), csp)


def json_response(document: Any) -> ViewerResponse:
    """A 200 with ``document`` as indented JSON."""
    body = json.dumps(document, indent=1) + "\n"
    return response(200, JSON, body.encode("utf-8"), DATA_CSP)
