"""Who may look: loopback clients without a token; with one, whoever presents it.

The token is compared in constant time (``hmac.compare_digest``) and never written into
a page, a link or a JSON body; the only place it is sent back is the ``Set-Cookie`` of a
``?token=`` visit.
"""

from __future__ import annotations

import hmac
from urllib.parse import quote, unquote

from .._failsafe import count
from .._net import is_loopback
from ._http import Abort, ViewerRequest
from ._query import Query, parse_query

__all__ = ["TOKEN_COOKIE", "Access"]

TOKEN_COOKIE = "otelprof_token"
"""Name of the cookie that carries the debug token after a ``?token=`` visit."""


class Access:
    """The access rule of one viewer.

    Args:
        token: the debug token; ``None``: loopback clients only.
    """

    def __init__(self, token: str | None) -> None:
        self._token = token.encode("utf-8") if token is not None else None

    def authorize(self, request: ViewerRequest, links: str) -> str | None:
        """Raise 401/403 unless the client may look; return a ``Set-Cookie`` value or None.

        Args:
            request: the request.
            links: where the viewer's pages are (the cookie's ``Path``).
        """
        if self._token is None:
            if is_loopback(request.client_host):
                return None
            count("viewer.refused")
            raise Abort(
                403,
                "the profile viewer answers loopback clients only; configure a debug "
                "token (OTELPROF_DEBUG_TOKEN) to open it to other clients.\n",
            )
        authorization = request.header("authorization") or ""
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and self._is_token(credentials.strip()):
            return None
        query_tokens = _query_values(request.query_string, "token")
        if len(query_tokens) == 1 and self._is_token(query_tokens[0]):
            return self._cookie(request, links)
        for cookie in _cookies(request.header("cookie") or "", TOKEN_COOKIE):
            if self._is_token(cookie):
                return None
        count("viewer.refused")
        raise Abort(
            401,
            "a debug token is required: send 'Authorization: Bearer <token>', or open "
            f"{links}?token=<token> once in a browser.\n",
            [("www-authenticate", 'Bearer realm="otelprof"')],
        )

    def _is_token(self, candidate: str) -> bool:
        token = self._token
        return token is not None and hmac.compare_digest(
            candidate.encode("utf-8", "surrogatepass"), token
        )

    def _cookie(self, request: ViewerRequest, links: str) -> str:
        value = quote((self._token or b"").decode("utf-8"), safe="")
        cookie = f"{TOKEN_COOKIE}={value}; Path={links}; HttpOnly; SameSite=Lax"
        if request.scheme == "https":
            cookie += "; Secure"
        return cookie


def _query_values(query_string: bytes, name: str) -> list[str]:
    query: Query
    try:
        query = parse_query(query_string)
    except Abort:
        return []
    return query.get(name, [])


def _cookies(header: str, name: str) -> list[str]:
    found = []
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            found.append(unquote(value.strip().strip('"')))
    return found
