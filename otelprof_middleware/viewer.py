"""Framework-free handler of the ``/debug/profile`` routes.

The ASGI and WSGI adapters and ``otelprof serve`` translate their request into a
:class:`ViewerRequest`, call :meth:`Viewer.handle` (synchronous: run it in a worker
thread from async code) and send the :class:`ViewerResponse` back unchanged.

Routes, under ``prefix`` (default ``/debug/profile``):

- ``GET {prefix}``: recent profiles, newest first, as HTML; ``?format=json`` gives
  ``{"profiles": [{"trace_id", "span_id", "method", "route", "status_code",
  "duration_ms", "start_time", "sample_count", "mode", "interval_ms", "kept_reason",
  "service", "url"}, ...]}`` (``kept_reason``: why the profile was kept; ``service``: the
  ``service.name`` that served it; each ``""`` when stored by an older version). Filters:
  ``route=``,
  ``min_duration_ms=``, ``order=newest|slowest``, ``limit=`` (1..1000, default 100).
  The HTML index adds, per route, a histogram of the listed profiles' durations.
- ``GET {prefix}/{trace_id}`` (HTML): the trace page, every profiled span of the trace
  the store holds, from every service sharing it, as a waterfall in start order.
- ``GET {prefix}/{trace_id}?span_id=``: that span's profile. As HTML, a page with the
  request's facts and links around pyinstrument's flame graph (drawn in an
  ``<iframe>`` of ``{prefix}/{trace_id}/flame?span_id=``, pyinstrument's own page);
  ``?format=speedscope|text|json|folded`` give the other formats. Without ``span_id``
  these formats give the trace's one profile, or the list when it has several.
- ``GET {prefix}/{trace_id}/diff?span_id=``: the request against its route's baseline,
  as a differential flame graph and a function table (``?format=json``: the table).
- ``GET {prefix}/route?route=``: the route's baseline (recent profiles combined), framed
  like a profile (``{prefix}/route/flame?route=`` is pyinstrument's page of it).
- ``HEAD`` like ``GET`` without a body; other methods answer 405.

Every answer carries a Content-Security-Policy, ``nosniff``, ``no-referrer`` and
``no-store``. Nothing here answers 500 or shows a stack trace: a failing store gives
503, a profile that cannot be decoded or rendered gives 422, each logged and counted
through :mod:`otelprof_middleware._failsafe`.

Access: without a token, loopback clients only (``X-Forwarded-For`` is never
trusted). With a token, everyone must present it: ``Authorization: Bearer <token>``,
``?token=<token>`` (which also sets an ``HttpOnly`` cookie scoped to ``prefix``, so
the links in the pages work), or that cookie. The token is never written into a
page, a link or a JSON body.
"""

from __future__ import annotations

import hmac
import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import parse_qsl, quote, unquote, urlencode

from pyinstrument.session import Session

from . import _svg, baseline
from ._config import DEBUG_PREFIX
from ._failsafe import count, log_failure
from ._net import is_loopback
from ._record import ProfileRecord, ProfileSummary, is_span_id, is_trace_id
from .render import FORMATS, inline_script_hashes, render
from .stores._base import ProfileStore

__all__ = [
    "INDEX_FORMATS",
    "MAX_LIMIT",
    "ORDERS",
    "TOKEN_COOKIE",
    "Viewer",
    "ViewerRequest",
    "ViewerResponse",
]

TOKEN_COOKIE = "otelprof_token"
"""Name of the cookie that carries the debug token after a ``?token=`` visit."""

INDEX_FORMATS = ("html", "json")
"""Formats of the index and of a trace's list of profiles."""

ORDERS = ("newest", "slowest")
"""Sort orders of the index."""

MAX_LIMIT = 1000
"""Most rows the index shows at once."""

DEFAULT_LIMIT = 100

BASELINE_LIMIT = 20
"""Recent profiles of a route combined into its baseline (``?limit=`` up to 100)."""

MAX_BASELINE_LIMIT = 100
MAX_DIFF_ROWS = 200
_SMALL_INT = re.compile(r"[0-9]{1,7}")

_PAGE_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# Text, JSON and error bodies: nothing may load or run, even if a browser renders them.
_DATA_CSP = (
    "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; sandbox"
)
# The frame around a profile: our markup, no script, and pyinstrument's page of the same
# origin in an <iframe>.
_FRAME_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# pyinstrument's page: its two inline scripts, allowed by hash, so nothing injected
# can run; inline styles (its app sets style attributes); its data: images. Nothing
# external (render() removes its web-font link). Framed by our own pages only.
_PROFILE_CSP = (
    "default-src 'none'; script-src {scripts}; style-src 'unsafe-inline'; img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
)
_TEXT = "text/plain; charset=utf-8"
_HTML = "text/html; charset=utf-8"
_JSON = "application/json; charset=utf-8"
_ALLOW = "GET, HEAD"
_MAX_QUERY_FIELDS = 50
_MAX_ROUTE_LENGTH = 2048
_HOST = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


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


class _Abort(Exception):
    """Stop handling and answer ``status`` with a plain-text ``message``."""

    def __init__(self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


class Viewer:
    """Serves the profile index and single profiles from a :class:`ProfileStore`.

    Args:
        store: where the profiles are.
        token: the debug token (``OTELPROF_DEBUG_TOKEN``, default ``None``). When
            ``None`` only loopback clients are served; when set, every client must
            present it.
        public_url: base of the absolute URLs in ``?format=json``
            (``OTELPROF_PUBLIC_URL``, e.g. ``https://api.example.com``); default:
            the request's own scheme and host.
        prefix: where the routes live (default ``/debug/profile``).

    Raises:
        ValueError: an empty ``token`` or a ``prefix`` not starting with ``/``.

    Example::

        viewer = Viewer(MemoryStore())
        if viewer.handles(path):
            response = viewer.handle(
                ViewerRequest("GET", path, b"format=json", {}, client_host="127.0.0.1")
            )
    """

    def __init__(
        self,
        store: ProfileStore,
        *,
        token: str | None = None,
        public_url: str | None = None,
        prefix: str = DEBUG_PREFIX,
    ) -> None:
        if token is not None and not token:
            raise ValueError("token must be a non-empty string or None")
        prefix = prefix.rstrip("/")
        if not prefix.startswith("/"):
            raise ValueError(f"prefix must start with '/', got {prefix!r}")
        self._store = store
        self._token = token.encode("utf-8") if token is not None else None
        self._public_url = public_url.rstrip("/") if public_url else None
        self._prefix = prefix

    @property
    def prefix(self) -> str:
        """The path prefix of the viewer's routes, without a trailing slash."""
        return self._prefix

    def handles(self, path: str) -> bool:
        """True when ``path`` is one of the viewer's routes (the prefix or below it)."""
        return path == self._prefix or path.startswith(self._prefix + "/")

    def handle(self, request: ViewerRequest) -> ViewerResponse:
        """Answer ``request``. Never raises, never answers 500.

        Args:
            request: the request, translated by an adapter.

        Returns:
            The response to send as is (no body for ``HEAD``).
        """
        set_cookie: str | None = None
        try:
            set_cookie = self._authorize(request)
            response = self._route(request)
        except _Abort as abort:
            response = _plain(abort.status, abort.message, abort.headers)
        except Exception as exc:
            log_failure("viewer", exc)
            response = _plain(503, "the profile viewer failed; the error was logged.\n")
        if set_cookie is not None:
            response.headers.append(("set-cookie", set_cookie))
        if request.method.upper() == "HEAD":
            response = ViewerResponse(response.status, response.headers, b"")
        return response

    # access

    def _authorize(self, request: ViewerRequest) -> str | None:
        """Raise 401/403 unless the client may look; return a ``Set-Cookie`` value or None."""
        if self._token is None:
            if is_loopback(request.client_host):
                return None
            count("viewer.refused")
            raise _Abort(
                403,
                "the profile viewer answers loopback clients only; configure a debug "
                "token (OTELPROF_DEBUG_TOKEN) to open it to other clients.\n",
            )
        headers = _lower(request.headers)
        authorization = headers.get("authorization", "")
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and self._is_token(credentials.strip()):
            return None
        query_tokens = _query_values(request.query_string, "token")
        if len(query_tokens) == 1 and self._is_token(query_tokens[0]):
            return self._cookie(request)
        for cookie in _cookies(headers.get("cookie", ""), TOKEN_COOKIE):
            if self._is_token(cookie):
                return None
        count("viewer.refused")
        raise _Abort(
            401,
            "a debug token is required: send 'Authorization: Bearer <token>', or open "
            f"{self._links(request)}?token=<token> once in a browser.\n",
            [("www-authenticate", 'Bearer realm="otelprof"')],
        )

    def _is_token(self, candidate: str) -> bool:
        token = self._token
        return token is not None and hmac.compare_digest(
            candidate.encode("utf-8", "surrogatepass"), token
        )

    def _cookie(self, request: ViewerRequest) -> str:
        value = quote((self._token or b"").decode("utf-8"), safe="")
        cookie = f"{TOKEN_COOKIE}={value}; Path={self._links(request)}; HttpOnly; SameSite=Lax"
        if request.scheme == "https":
            cookie += "; Secure"
        return cookie

    # routing

    def _route(self, request: ViewerRequest) -> ViewerResponse:
        if not self.handles(request.path):
            raise _Abort(404, "not a profile viewer page.\n")
        if request.method.upper() not in ("GET", "HEAD"):
            raise _Abort(405, f"method not allowed; use {_ALLOW}.\n", [("allow", _ALLOW)])
        query = _parse_query(request.query_string)
        rest = request.path[len(self._prefix) :].strip("/")
        if not rest:
            return self._index(request, query)
        if rest in ("route", "route/flame"):
            return self._baseline(request, query, bare=rest == "route/flame")
        trace_id, _, page = rest.partition("/")
        if page not in ("", "diff", "flame"):
            raise _Abort(404, "not a profile viewer page.\n")
        if not is_trace_id(trace_id):
            raise _Abort(
                400, "malformed trace id: expected 32 lowercase hex digits, not all zero.\n"
            )
        if page == "diff":
            return self._diff(request, query, trace_id)
        return self._profile(request, query, trace_id, bare=page == "flame")

    # route baselines

    def _baseline_summaries(
        self, route: str, limit: int, exclude: ProfileSummary | None = None
    ) -> list[ProfileSummary]:
        try:
            return [
                s
                for s in self._store.list(route=route, limit=limit + 1)
                if s.route == route
                and (
                    exclude is None
                    or (s.trace_id, s.span_id) != (exclude.trace_id, exclude.span_id)
                )
            ][:limit]
        except Exception as exc:
            log_failure("viewer.store", exc)
            raise _Abort(503, "profile store unavailable.\n") from None

    def _baseline_sessions(
        self, route: str, limit: int, exclude: ProfileSummary | None = None
    ) -> list[Session]:
        summaries = self._baseline_summaries(route, limit, exclude)
        try:
            records = [r for s in summaries for r in self._store.get(s.trace_id, s.span_id)]
        except Exception as exc:
            log_failure("viewer.store", exc)
            raise _Abort(503, "profile store unavailable.\n") from None
        try:
            return [record.session() for record in records]
        except Exception as exc:
            log_failure("viewer.decode", exc)
            raise _Abort(422, "a stored profile is corrupt; the error was logged.\n") from None

    def _baseline(
        self, request: ViewerRequest, query: dict[str, list[str]], *, bare: bool
    ) -> ViewerResponse:
        route = _one(query, "route")
        if not route:
            raise _Abort(400, "route is required, e.g. ?route=/items/{item_id}\n")
        if len(route) > _MAX_ROUTE_LENGTH:
            raise _Abort(400, f"route is too long (more than {_MAX_ROUTE_LENGTH} characters).\n")
        fmt = _one(query, "format") or "html"
        if fmt not in FORMATS:
            raise _Abort(
                400, f"unknown format {_shown(fmt)}; expected one of {', '.join(FORMATS)}.\n"
            )
        if bare and fmt != "html":
            raise _Abort(400, "the flame page is html; use ?format= on the baseline page.\n")
        limit = _bounded_int(query, "limit", BASELINE_LIMIT, MAX_BASELINE_LIMIT)
        if fmt == "html" and not bare:
            summaries = self._baseline_summaries(route, limit)
            if not summaries:
                raise _Abort(404, "no kept profiles of this route yet.\n")
            page = _baseline_frame(self._links(request), route, limit, summaries)
            return _response(200, _HTML, page.encode("utf-8"), _FRAME_CSP)
        sessions = self._baseline_sessions(route, limit)
        if not sessions:
            raise _Abort(404, "no kept profiles of this route yet.\n")
        combined = baseline.combine(sessions)
        combined.target_description = (
            f"{route}: baseline of {len(sessions)} recent request{'s' if len(sessions) > 1 else ''}"
        )
        return self._render_session(combined, fmt, "baseline")

    def _diff(
        self, request: ViewerRequest, query: dict[str, list[str]], trace_id: str
    ) -> ViewerResponse:
        fmt = _one(query, "format") or "html"
        if fmt not in INDEX_FORMATS:
            raise _Abort(400, f"unknown format {_shown(fmt)}; the diff speaks html or json.\n")
        span_id = _one(query, "span_id")
        if span_id is not None and not is_span_id(span_id):
            raise _Abort(
                400, "malformed span id: expected 16 lowercase hex digits, not all zero.\n"
            )
        limit = _bounded_int(query, "limit", BASELINE_LIMIT, MAX_BASELINE_LIMIT)
        try:
            records = list(self._store.get(trace_id, span_id))
        except Exception as exc:
            log_failure("viewer.store", exc)
            raise _Abort(503, "profile store unavailable.\n") from None
        if not records:
            raise _Abort(404, "no profile for this trace.\n")
        if len(records) > 1:
            raise _Abort(400, "this trace has several profiles here: add ?span_id=...\n")
        record = records[0]
        if not record.summary.route:
            raise _Abort(404, "this request matched no route, so it has no baseline.\n")
        sessions = self._baseline_sessions(record.summary.route, limit, exclude=record.summary)
        try:
            # No other kept profile of the route yet (the span link is made when the first
            # is kept): the page says so, with nothing to compare, rather than a 404.
            session = record.session()
            rows = baseline.diff(session, sessions) if sessions else []
            tree = baseline.diff_tree(session, sessions) if fmt == "html" and sessions else None
        except Exception as exc:
            log_failure("viewer.diff", exc)
            raise _Abort(422, "the comparison failed; the error was logged.\n") from None
        if fmt == "json":
            body = json.dumps(
                {
                    "trace_id": record.summary.trace_id,
                    "span_id": record.summary.span_id,
                    "route": record.summary.route,
                    "baseline_profiles": len(sessions),
                    "functions": [row.to_json() for row in rows[:MAX_DIFF_ROWS]],
                },
                indent=1,
            )
            return _response(200, _JSON, (body + "\n").encode("utf-8"), _DATA_CSP)
        flame = _svg.flame_diff(tree) if tree is not None else ""
        page = _diff_page(self._links(request), record.summary, len(sessions), rows, flame)
        return _response(200, _HTML, page.encode("utf-8"), _PAGE_CSP)

    def _index(self, request: ViewerRequest, query: dict[str, list[str]]) -> ViewerResponse:
        fmt = _one(query, "format") or "html"
        if fmt not in INDEX_FORMATS:
            raise _Abort(400, f"unknown format {_shown(fmt)}; the index speaks html or json.\n")
        filters = _Filters.parse(query)
        try:
            summaries = list(
                self._store.list(
                    limit=filters.limit,
                    route=filters.route,
                    min_duration_ms=filters.min_duration_ms,
                    order=filters.order,
                )
            )
        except Exception as exc:
            log_failure("viewer.store", exc)
            raise _Abort(503, "profile store unavailable.\n") from None
        if fmt == "json":
            return self._json_list(request, summaries)
        distribution = summaries
        if summaries and len(summaries) == filters.limit and filters.limit < MAX_LIMIT:
            # The histograms describe every stored profile the filters match (up to
            # MAX_LIMIT), not only the rows of this page.
            try:
                distribution = list(
                    self._store.list(
                        limit=MAX_LIMIT,
                        route=filters.route,
                        min_duration_ms=filters.min_duration_ms,
                    )
                )
            except Exception as exc:
                log_failure("viewer.store", exc)
        page = _index_page(self._links(request), filters, summaries, distribution)
        return _response(200, _HTML, page.encode("utf-8"), _PAGE_CSP)

    def _profile(
        self, request: ViewerRequest, query: dict[str, list[str]], trace_id: str, *, bare: bool
    ) -> ViewerResponse:
        fmt = _one(query, "format") or "html"
        if fmt not in FORMATS:
            raise _Abort(
                400, f"unknown format {_shown(fmt)}; expected one of {', '.join(FORMATS)}.\n"
            )
        if bare and fmt != "html":
            raise _Abort(400, "the flame page is html; use ?format= on the profile page.\n")
        span_id = _one(query, "span_id")
        if span_id is not None and not is_span_id(span_id):
            raise _Abort(
                400, "malformed span id: expected 16 lowercase hex digits, not all zero.\n"
            )
        try:
            records = [
                record
                for record in self._store.get(trace_id, span_id)
                if record.summary.trace_id == trace_id
                and (span_id is None or record.summary.span_id == span_id)
            ]
        except Exception as exc:
            log_failure("viewer.store", exc)
            raise _Abort(503, "profile store unavailable.\n") from None
        if not records:
            raise _Abort(
                404,
                "no profile for this trace"
                + (" and span" if span_id else "")
                + ": it was not kept, not written yet, or has been evicted.\n",
            )
        links = self._links(request)
        if fmt == "html" and not bare and span_id is None:
            page = _trace_page(links, trace_id, fmt, [record.summary for record in records])
            return _response(200, _HTML, page.encode("utf-8"), _PAGE_CSP)
        if len(records) > 1:
            if bare:
                raise _Abort(400, "this trace has several profiles here: add ?span_id=...\n")
            summaries = [record.summary for record in records]
            if fmt == "json":
                return self._json_list(request, summaries)
            page = _trace_page(links, trace_id, fmt, summaries)
            return _response(200, _HTML, page.encode("utf-8"), _PAGE_CSP)
        if fmt == "html" and not bare:
            page = _profile_frame(links, records[0].summary)
            return _response(200, _HTML, page.encode("utf-8"), _FRAME_CSP)
        return self._render(records[0], fmt)

    def _render(self, record: ProfileRecord, fmt: str) -> ViewerResponse:
        try:
            session = record.session()
        except Exception as exc:
            log_failure("viewer.decode", exc)
            raise _Abort(
                422, "the stored profile is corrupt and cannot be shown; the error was logged.\n"
            ) from None
        summary = record.summary
        name = (
            f"{summary.trace_id}-{summary.span_id}"
            if is_trace_id(summary.trace_id) and is_span_id(summary.span_id)
            else "profile"
        )
        return self._render_session(session, fmt, name)

    def _render_session(self, session: Session, fmt: str, name: str) -> ViewerResponse:
        try:
            body, content_type = render(session, fmt)
        except Exception as exc:
            log_failure("viewer.render", exc)
            raise _Abort(
                422, f"the profile could not be rendered as {fmt}; the error was logged.\n"
            ) from None
        extra: list[tuple[str, str]] = []
        if fmt == "html":
            csp = _PROFILE_CSP.format(scripts=" ".join(inline_script_hashes(body)) or "'none'")
            extra.append(("x-frame-options", "SAMEORIGIN"))
        else:
            csp = _DATA_CSP
        if fmt == "speedscope":
            extra.append(("content-disposition", f'attachment; filename="{name}.speedscope.json"'))
        return _response(200, content_type, body.encode("utf-8"), csp, extra)

    def _json_list(
        self, request: ViewerRequest, summaries: Sequence[ProfileSummary]
    ) -> ViewerResponse:
        base = self._base_url(request)
        # ``public_url`` already holds the mount point, as in the links put on spans.
        links = self._prefix if self._public_url else self._links(request)
        rows = [{**s.to_json(), "url": base + _profile_path(links, s)} for s in summaries]
        body = json.dumps({"profiles": rows}, indent=1) + "\n"
        return _response(200, _JSON, body.encode("utf-8"), _DATA_CSP)

    def _links(self, request: ViewerRequest) -> str:
        """Where the viewer's pages are, as links: the app's mount point, then the prefix."""
        return request.root_path.rstrip("/") + self._prefix

    def _base_url(self, request: ViewerRequest) -> str:
        """``public_url``, else ``scheme://host`` of the request, else ``""`` (relative)."""
        if self._public_url:
            return self._public_url
        host = request.host or _lower(request.headers).get("host")
        scheme = request.scheme if request.scheme in ("http", "https") else "http"
        if host and _HOST.fullmatch(host):
            return f"{scheme}://{host.lower()}"
        return ""


@dataclass(frozen=True)
class _Filters:
    route: str | None = None
    min_duration_ms: float | None = None
    order: str = "newest"
    limit: int = DEFAULT_LIMIT

    @classmethod
    def parse(cls, query: dict[str, list[str]]) -> _Filters:
        route = _one(query, "route")
        if route is not None and len(route) > _MAX_ROUTE_LENGTH:
            raise _Abort(400, f"route is too long (more than {_MAX_ROUTE_LENGTH} characters).\n")
        min_duration_ms: float | None = None
        raw = _one(query, "min_duration_ms")
        if raw is not None:
            try:
                min_duration_ms = float(raw)
            except ValueError:
                min_duration_ms = math.nan
            if not math.isfinite(min_duration_ms) or min_duration_ms < 0:
                raise _Abort(400, f"min_duration_ms must be a number >= 0, got {_shown(raw)}.\n")
        order = _one(query, "order") or "newest"
        if order not in ORDERS:
            raise _Abort(400, f"order must be newest or slowest, got {_shown(order)}.\n")
        limit = DEFAULT_LIMIT
        raw = _one(query, "limit")
        if raw is not None:
            if not re.fullmatch(r"[0-9]{1,7}", raw) or not 1 <= int(raw) <= MAX_LIMIT:
                raise _Abort(
                    400, f"limit must be an integer from 1 to {MAX_LIMIT}, got {_shown(raw)}.\n"
                )
            limit = int(raw)
        return cls(route=route, min_duration_ms=min_duration_ms, order=order, limit=limit)

    @property
    def active(self) -> bool:
        return self.route is not None or self.min_duration_ms is not None

    def query(self, **extra: str) -> str:
        """These filters as a query string (defaults left out), plus ``extra``."""
        params: dict[str, str] = {}
        if self.route is not None:
            params["route"] = self.route
        if self.min_duration_ms is not None:
            params["min_duration_ms"] = f"{self.min_duration_ms:g}"
        if self.order != "newest":
            params["order"] = self.order
        if self.limit != DEFAULT_LIMIT:
            params["limit"] = str(self.limit)
        params.update(extra)
        return urlencode(params)


# request parsing


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def _parse_query(query_string: bytes) -> dict[str, list[str]]:
    try:
        pairs = parse_qsl(
            query_string.decode("latin-1"),
            keep_blank_values=True,
            encoding="utf-8",
            errors="replace",
            max_num_fields=_MAX_QUERY_FIELDS,
        )
    except ValueError:
        raise _Abort(400, f"too many query parameters (at most {_MAX_QUERY_FIELDS}).\n") from None
    query: dict[str, list[str]] = {}
    for name, value in pairs:
        query.setdefault(name, []).append(value)
    return query


def _query_values(query_string: bytes, name: str) -> list[str]:
    try:
        return _parse_query(query_string).get(name, [])
    except _Abort:
        return []


def _one(query: dict[str, list[str]], name: str) -> str | None:
    """The single value of ``name``; ``None`` when absent or empty (as forms send it)."""
    values = query.get(name, [])
    if len(values) > 1:
        raise _Abort(400, f"query parameter {name!r} given more than once.\n")
    return values[0] if values and values[0] != "" else None


def _cookies(header: str, name: str) -> list[str]:
    found = []
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            found.append(unquote(value.strip().strip('"')))
    return found


def _shown(value: str) -> str:
    """A user-supplied value, shortened and quoted for a plain-text error message."""
    return repr(value[:40] + ("..." if len(value) > 40 else ""))


# responses


def _response(
    status: int,
    content_type: str,
    body: bytes,
    csp: str,
    extra: Sequence[tuple[str, str]] = (),
) -> ViewerResponse:
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


def _plain(status: int, message: str, extra: Sequence[tuple[str, str]] = ()) -> ViewerResponse:
    return _response(status, _TEXT, message.encode("utf-8"), _DATA_CSP, extra)


# pages

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1d1d1f; }
h1 { font-size: 1.3rem; margin: 0 0 1rem; }
form { display: flex; flex-wrap: wrap; gap: .75rem; align-items: end; margin-bottom: 1rem; }
label { display: flex; flex-direction: column; font-size: .8rem; color: #555; }
input, select, button { font: inherit; padding: .2rem .4rem; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .3rem .6rem; border-bottom: 1px solid #e3e3e3; }
th { font-size: .8rem; color: #555; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: .85rem; }
.muted { color: #777; }
.note { background: #f6f6f6; padding: .8rem 1rem; border-radius: 4px; max-width: 48rem; }
a { color: #0b5cad; }
nav.crumbs { font-size: .85rem; margin-bottom: .4rem; }
dl.facts { display: flex; flex-wrap: wrap; gap: .2rem 1.4rem; margin: .4rem 0; }
dl.facts div { display: flex; flex-direction: column; }
dl.facts dt { font-size: .72rem; color: #666; text-transform: uppercase; }
dl.facts dd { margin: 0; }
p.links { margin: .4rem 0 0; font-size: .9rem; }
.status-error { color: #b00020; font-weight: 600; }
.wf { position: relative; min-width: 16rem; height: 14px; background: #f3f3f3; }
.wf .bar { position: absolute; top: 0; height: 14px; background: #6b8fb5; }
td.chart { padding: 0 .6rem; vertical-align: middle; }
svg.flamediff { display: block; max-width: 100%; margin: .5rem 0 1rem; }
svg.flamediff g.frame:hover rect { stroke: #000; stroke-width: .8; }
.legend span { display: inline-block; padding: 0 .4rem; margin-right: .4rem; }
"""
# The frame around pyinstrument's page: a header, then the flame graph filling the window.
_FRAME_STYLE = """
html, body { height: 100%; }
body { margin: 0; display: flex; flex-direction: column; }
header { padding: .8rem 1.2rem .6rem; border-bottom: 1px solid #ddd; background: #fafafa; }
header h1 { margin: 0; font-size: 1.15rem; }
iframe { flex: 1; width: 100%; border: 0; min-height: 24rem; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, body: str, *, heading: str | None = None, style: str = "") -> str:
    """A whole page: ``title`` in the browser tab, ``heading`` (default: the title, as
    text) as its ``<h1>``, then ``body``; ``heading`` and ``body`` are markup."""
    h1 = f"<h1>{_e(title)}</h1>\n" if heading is None else heading
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{_STYLE}{style}</style>\n</head>\n"
        f"<body>\n{h1}{body}</body>\n</html>\n"
    )


def _ms_text(duration_ms: float) -> str:
    """A duration for titles: ``312 ms``, ``4.2 ms``."""
    return f"{duration_ms:.0f} ms" if duration_ms >= 10 else f"{duration_ms:.1f} ms"


def _request_name(summary: ProfileSummary) -> str:
    return f"{summary.method} {summary.route or '(no route matched)'}"


_CRUMB = " &rsaquo; "

_KEPT_BECAUSE = {
    "slow": "slow for its route",
    "error": "it failed",
    "triggered": "asked for (trigger)",
    "min_duration": "over min_duration_ms",
}
_MODES = {"hook": "pyinstrument hook", "always_on": "always-on sampler"}


def _facts(pairs: Sequence[tuple[str, str]]) -> str:
    """``(label, markup)`` pairs as a definition list."""
    items = "".join(f"<div><dt>{_e(label)}</dt><dd>{value}</dd></div>" for label, value in pairs)
    return f'<dl class="facts">{items}</dl>\n'


def _trace_path(prefix: str, trace_id: str) -> str:
    return f"{prefix}/{quote(trace_id, safe='')}"


def _trace_crumb(prefix: str, trace_id: str) -> str:
    return _link(_trace_path(prefix, trace_id), f"trace {trace_id[:8]}…", "the trace page")


def _diff_path(prefix: str, summary: ProfileSummary) -> str:
    return f"{_trace_path(prefix, summary.trace_id)}/diff?" + urlencode(
        {"span_id": summary.span_id}
    )


def _baseline_path(
    prefix: str, route: str, *, flame: bool = False, extra: Mapping[str, str] | None = None
) -> str:
    return f"{prefix}/route{'/flame' if flame else ''}?" + urlencode(
        {"route": route, **(extra or {})}
    )


def _link(href: str, text: str, title: str = "") -> str:
    hint = f' title="{_e(title)}"' if title else ""
    return f'<a href="{_e(href)}"{hint}>{_e(text)}</a>'


def _profile_frame(prefix: str, s: ProfileSummary) -> str:
    """One profile: its request's facts and links, pyinstrument's page below."""
    title = f"{_request_name(s)} {_ms_text(s.duration_ms)} · otelprof"
    status_class = ' class="status-error"' if s.status_code >= 500 else ""
    heading = (
        f'<header>\n<nav class="crumbs">{_link(prefix, "otelprof: all profiles")}{_CRUMB}'
        f"{_trace_crumb(prefix, s.trace_id)}{_CRUMB}"
        "this request</nav>\n"
        f'<h1>{_e(s.method)} <span class="mono">{_e(s.route or "(no route matched)")}</span> '
        f"<span{status_class}>{_e(s.status_code)}</span> · {s.duration_ms:.1f} ms</h1>\n"
    )
    mode = _MODES.get(s.mode, s.mode)
    kept = s.kept_reason and f"{s.kept_reason} ({_KEPT_BECAUSE.get(s.kept_reason, '?')})"
    facts = _facts(
        [
            ("Trace id", f'<span class="mono">{_e(s.trace_id)}</span>'),
            ("Span id", f'<span class="mono">{_e(s.span_id)}</span>'),
            ("Service", _e(s.service) if s.service else '<span class="muted">—</span>'),
            ("When (UTC)", f'<span class="mono">{_e(_utc(s.start_time))}</span>'),
            ("Mode", f"{_e(mode)}, every {s.interval_ms:g} ms"),
            ("Samples", _e(s.sample_count)),
            ("Kept because", _e(kept) if kept else '<span class="muted">not recorded</span>'),
        ]
    )
    links = [_link(_trace_path(prefix, s.trace_id), "trace page", "every profiled span of it")]
    if s.route:
        links.append(_link(_diff_path(prefix, s), "this request vs its route"))
        links.append(_link(_baseline_path(prefix, s.route), "route baseline", "recent combined"))
    formats = " ".join(
        _link(_profile_path(prefix, s, fmt), fmt)
        for fmt in ("text", "speedscope", "json", "folded")
    )
    flame = f"{_trace_path(prefix, s.trace_id)}/flame?" + urlencode({"span_id": s.span_id})
    links.append(f"formats: {formats}")
    links.append(_link(flame, "flame graph alone"))
    links.append(_link(prefix, "all profiles"))
    header = heading + facts + f'<p class="links">{" · ".join(links)}</p>\n</header>\n'
    frame = f'<iframe src="{_e(flame)}" title="flame graph of {_e(_request_name(s))}"></iframe>\n'
    return _page(title, frame, heading=header, style=_FRAME_STYLE)


def _baseline_frame(
    prefix: str, route: str, limit: int, summaries: Sequence[ProfileSummary]
) -> str:
    """A route's baseline: what it combines, links, pyinstrument's page below."""
    count = len(summaries)
    requests = f"{count} request{'s' if count != 1 else ''}"
    title = f"Baseline {route} · {requests} · otelprof"
    durations = sorted(s.duration_ms for s in summaries)
    methods = sorted({s.method for s in summaries})
    heading = (
        f'<header>\n<nav class="crumbs">{_link(prefix, "otelprof: all profiles")}{_CRUMB}'
        "route baseline</nav>\n"
        f'<h1>Baseline of <span class="mono">{_e(route)}</span>: the {requests} most '
        "recently kept, combined</h1>\n"
    )
    facts = _facts(
        [
            ("Methods", _e(", ".join(methods))),
            ("Median", f"{_svg.percentile(durations, 50):.1f} ms"),
            ("95th percentile", f"{_svg.percentile(durations, 95):.1f} ms"),
            ("Slowest", f"{durations[-1]:.1f} ms"),
            (
                "From (UTC)",
                f'<span class="mono">{_e(_utc(min(s.start_time for s in summaries)))}</span>',
            ),
            (
                "To (UTC)",
                f'<span class="mono">{_e(_utc(max(s.start_time for s in summaries)))}</span>',
            ),
        ]
    )
    extra = {} if limit == BASELINE_LIMIT else {"limit": str(limit)}
    formats = " ".join(
        _link(_baseline_path(prefix, route, extra={**extra, "format": fmt}), fmt)
        for fmt in ("text", "speedscope", "json", "folded")
    )
    flame = _baseline_path(prefix, route, flame=True, extra=extra)
    route_index = prefix + "?" + urlencode({"route": route, "order": "slowest"})
    links = [
        _link(route_index, "this route's profiles", "slowest first"),
        f"formats: {formats}",
        _link(flame, "flame graph alone"),
        _link(prefix, "all profiles"),
    ]
    header = heading + facts + f'<p class="links">{" · ".join(links)}</p>\n</header>\n'
    frame = (
        f'<iframe src="{_e(flame)}" title="flame graph of the baseline of {_e(route)}"></iframe>\n'
    )
    return _page(title, frame, heading=header, style=_FRAME_STYLE)


def _utc(epoch: float) -> str:
    try:
        moment = datetime.fromtimestamp(epoch, UTC)
    except (OverflowError, OSError, ValueError, TypeError):
        return "?"
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _profile_path(prefix: str, summary: ProfileSummary, fmt: str = "html") -> str:
    path = f"{prefix}/{quote(summary.trace_id, safe='')}?span_id={quote(summary.span_id, safe='')}"
    if fmt != "html":
        path += f"&format={quote(fmt, safe='')}"
    return path


def _kept_cell(summary: ProfileSummary) -> str:
    """The "Kept" cell: why the profile was kept; a muted dash when the profile was
    stored by an older version, which did not record it."""
    if summary.kept_reason:
        return f'<td class="kept">{_e(summary.kept_reason)}</td>'
    return '<td class="kept muted" title="not recorded (stored by an older version)">—</td>'


def _routes_section(prefix: str, filters: _Filters, summaries: Sequence[ProfileSummary]) -> str:
    """Per route: how many stored profiles, their median, 95th percentile and slowest, and
    a histogram of their durations (one log scale for every route, so they compare)."""
    by_route: dict[tuple[str, str], list[float]] = {}
    for s in summaries:
        by_route.setdefault((s.route, s.method), []).append(s.duration_ms)
    if not by_route:
        return ""
    every = [d for durations in by_route.values() for d in durations]
    low, high = max(min(every), 0.1), max(every)
    ordered = sorted(by_route.items(), key=lambda item: (-len(item[1]), item[0]))[:30]
    rows = []
    for (route, method), durations in ordered:
        durations.sort()
        only = _link(
            prefix + "?" + filters.query(route=route, order="slowest"),
            route or "(no route matched)",
            "this route's profiles, slowest first",
        )
        base = _link(_baseline_path(prefix, route), "baseline") if route else ""
        rows.append(
            "<tr>"
            f"<td>{_e(method)}</td>"
            f'<td class="mono">{only}</td>'
            f'<td class="num">{len(durations)}</td>'
            f'<td class="num">{_svg.percentile(durations, 50):.1f}</td>'
            f'<td class="num">{_svg.percentile(durations, 95):.1f}</td>'
            f'<td class="num">{durations[-1]:.1f}</td>'
            f'<td class="chart">{_svg.duration_histogram(durations, low, high)}</td>'
            f'<td class="muted">{base}</td>'
            "</tr>\n"
        )
    return (
        f'<h2>Routes</h2>\n<p class="muted">Durations of {len(every)} stored profiles, per '
        f"route (log scale from {low:.1f} to {high:.1f} ms; red: slower than the route's "
        "95th percentile).</p>\n"
        "<table>\n<thead><tr><th>Method</th><th>Route</th><th>Profiles</th><th>Median (ms)</th>"
        "<th>p95 (ms)</th><th>Slowest (ms)</th><th>Distribution</th><th></th></tr></thead>\n"
        "<tbody>\n" + "".join(rows) + "</tbody>\n</table>\n<h2>Profiles</h2>\n"
    )


def _index_page(
    prefix: str,
    filters: _Filters,
    summaries: Sequence[ProfileSummary],
    distribution: Sequence[ProfileSummary] = (),
) -> str:
    order_options = "".join(
        f'<option value="{o}"{" selected" if o == filters.order else ""}>{o} first</option>'
        for o in ORDERS
    )
    min_ms = "" if filters.min_duration_ms is None else f"{filters.min_duration_ms:g}"
    form = (
        f'<form method="get" action="{_e(prefix)}">\n'
        f'<label>Route <input name="route" value="{_e(filters.route or "")}" '
        'placeholder="/items/{item_id}"></label>\n'
        f'<label>Min duration (ms) <input name="min_duration_ms" value="{_e(min_ms)}" '
        'inputmode="decimal" size="8"></label>\n'
        f'<label>Order <select name="order">{order_options}</select></label>\n'
        f'<label>Limit <input name="limit" value="{filters.limit}" inputmode="numeric" '
        'size="5"></label>\n'
        '<button type="submit">Filter</button>\n'
        f'<a href="{_e(prefix)}">clear</a>\n'
        f'<a href="{_e(prefix + "?" + filters.query(format="json"))}">JSON</a>\n'
        "</form>\n"
    )
    if not summaries:
        if filters.active:
            note = "No profiles match these filters."
        else:
            note = (
                "No profiles yet. A profile appears here a moment after a profiled "
                "request finishes: requests are profiled by trace at "
                "<code>sample_rate</code> (<code>OTELPROF_SAMPLE_RATE</code>) or when "
                "asked for with the trigger header (<code>OTELPROF_TRIGGER_HEADER</code>, "
                "default <code>x-otelprof</code>; its value must be the debug token when "
                "one is set), and kept when they took at least "
                "<code>min_duration_ms</code> (<code>OTELPROF_MIN_DURATION_MS</code>). "
                "Each kept profile is also linked from its request's server span."
            )
        return _page("Recent profiles · otelprof", form + f'<p class="note">{note}</p>\n')
    rows = []
    for s in summaries:
        link = _e(_profile_path(prefix, s))
        others = " ".join(
            f'<a href="{_e(_profile_path(prefix, s, fmt))}">{fmt}</a>'
            for fmt in ("text", "speedscope", "json")
        )
        if s.route:
            others += " · " + _link(_diff_path(prefix, s), "vs route", "this request vs its route")
            others += " " + _link(_baseline_path(prefix, s.route), "baseline", "recent combined")

        route_link = _e(prefix + "?" + filters.query(route=s.route))
        rows.append(
            "<tr>"
            f'<td class="mono"><a href="{link}">{_e(_utc(s.start_time))}</a></td>'
            f"<td>{_e(s.method)}</td>"
            f'<td class="mono"><a href="{route_link}" title="only this route">'
            f"{_e(s.route)}</a></td>"
            f'<td class="num">{_e(s.status_code)}</td>'
            f'<td class="num">{s.duration_ms:.1f}</td>'
            f"{_kept_cell(s)}"
            f'<td class="mono"><a href="{link}">{_e(s.trace_id)}</a></td>'
            f'<td class="muted">{others}</td>'
            "</tr>\n"
        )
    order_note = "newest first" if filters.order == "newest" else "slowest first"
    table = (
        f'<p class="muted">{len(summaries)} profile{"" if len(summaries) == 1 else "s"}, '
        f"{order_note}. Times are UTC.</p>\n"
        "<table>\n<thead><tr><th>Time (UTC)</th><th>Method</th><th>Route</th>"
        "<th>Status</th><th>Duration (ms)</th><th>Kept</th><th>Trace id</th>"
        "<th>Other formats</th>"
        "</tr></thead>\n<tbody>\n" + "".join(rows) + "</tbody>\n</table>\n"
    )
    routes = _routes_section(prefix, filters, distribution or summaries)
    return _page("Recent profiles · otelprof", form + routes + table)


def _bounded_int(query: dict[str, list[str]], name: str, default: int, high: int) -> int:
    text = _one(query, name)
    if text is None:
        return default
    if not _SMALL_INT.fullmatch(text) or not 1 <= int(text) <= high:
        raise _Abort(400, f"{name} must be a whole number from 1 to {high}.\n")
    return int(text)


def _diff_page(
    prefix: str,
    summary: ProfileSummary,
    baseline_count: int,
    rows: Sequence[baseline.DiffRow],
    flame: str = "",
) -> str:
    def table(title: str, chosen: Sequence[baseline.DiffRow]) -> str:
        if not chosen:
            return f'<h3>{_e(title)}</h3>\n<p class="muted">None.</p>\n'
        body = "".join(
            "<tr>"
            f'<td class="mono">{_e(row.function)}</td>'
            f'<td class="mono muted">{_e(row.filename)}:{row.line}</td>'
            f'<td class="num">{row.request_ms:.1f}</td>'
            f'<td class="num">{row.baseline_ms:.1f}</td>'
            f'<td class="num">{row.delta_ms:+.1f}</td>'
            f'<td class="num">{row.request_share:.0%}</td>'
            f'<td class="num">{row.baseline_share:.0%}</td>'
            "</tr>\n"
            for row in chosen
        )
        return (
            f"<h3>{_e(title)}</h3>\n<table>\n<thead><tr><th>Function</th><th>Where</th>"
            "<th>This request (ms)</th><th>Route mean (ms)</th><th>Difference (ms)</th>"
            "<th>Share here</th><th>Share usually</th></tr></thead>\n<tbody>\n"
            + body
            + "</tbody>\n</table>\n"
        )

    more = [row for row in rows if row.delta_ms > 0][:30]
    less = [row for row in rows if row.delta_ms < 0][:30]
    title = f"{_request_name(summary)} {_ms_text(summary.duration_ms)} vs route · otelprof"
    heading = (
        f'<nav class="crumbs">{_link(prefix, "otelprof: all profiles")}{_CRUMB}'
        f"{_trace_crumb(prefix, summary.trace_id)}{_CRUMB}"
        f"{_link(_profile_path(prefix, summary), 'this request')}{_CRUMB}vs its route</nav>\n"
        f'<h1>{_e(summary.method)} <span class="mono">{_e(summary.route)}</span> '
        f"{summary.duration_ms:.1f} ms against its route</h1>\n"
    )
    intro = (
        f'<p>Request <a class="mono" href="{_e(_profile_path(prefix, summary))}">'
        f"{_e(summary.trace_id)}</a> ({_e(summary.method)} "
        f'<span class="mono">{_e(summary.route)}</span>, {summary.duration_ms:.1f} ms) '
        f'against the mean of the <a href="{_e(_baseline_path(prefix, summary.route))}">'
        f"{baseline_count} other recent profile{'s' if baseline_count != 1 else ''} of its "
        "route</a>. Times are inclusive: the time each function was on the stack, waits "
        "included.</p>\n"
    )
    if baseline_count == 0:
        body = intro + (
            '<p class="muted">This is the only kept profile of its route so far: there is '
            "nothing to compare it with yet. Come back when the route has more.</p>\n"
        )
        return _page(title, body, heading=heading)
    if flame:
        graph = (
            '<h2>Flame graph</h2>\n<p class="legend muted">This request\'s call paths, as wide '
            "as the time they took here, coloured by the route's mean: "
            '<span style="background:#e57373">took longer</span>'
            '<span style="background:#7fa8cc">took less</span>'
            '<span style="background:#e8e8e8">about the same</span> '
            "(by at least 2% of the request). Hover a frame for its self and total time here "
            "and usually. Paths the route usually runs and this request did not are in the "
            "tables only.</p>\n" + flame
        )
    else:
        graph = '<p class="muted">No samples in this request: nothing to draw.</p>\n'
    body = (
        intro
        + graph
        + "<h2>Functions</h2>\n"
        + table("Took more time than usual", more)
        + table("Took less time", less)
    )
    return _page(title, body, heading=heading)


def _trace_page(prefix: str, trace_id: str, fmt: str, summaries: Sequence[ProfileSummary]) -> str:
    """Every profiled span of one trace, in start order, as a waterfall."""
    ordered = sorted(summaries, key=lambda s: (s.start_time, s.span_id))
    first = ordered[0].start_time
    end = max(s.start_time + s.duration_ms / 1000.0 for s in ordered)
    whole_ms = max((end - first) * 1000.0, 0.001)
    services = sorted({s.service for s in ordered if s.service})
    rows = []
    for s in ordered:
        offset_ms = (s.start_time - first) * 1000.0
        left = min(offset_ms / whole_ms * 100.0, 99.7)
        width = max(min(s.duration_ms / whole_ms * 100.0, 100.0 - left), 0.3)
        name = _request_name(s)
        service = _e(s.service) if s.service else '<span class="muted">—</span>'
        tip = f"{name}: starts at +{offset_ms:.1f} ms, takes {s.duration_ms:.1f} ms"
        flame = f"{_trace_path(prefix, s.trace_id)}/flame?" + urlencode({"span_id": s.span_id})
        extra = _link(flame, "flame graph alone") if fmt == "html" else ""
        if s.route:
            extra += (" · " if extra else "") + _link(_diff_path(prefix, s), "vs route")
        rows.append(
            "<tr>"
            f"<td>{service}</td>"
            f'<td><a href="{_e(_profile_path(prefix, s, fmt))}">{_e(s.method)} '
            f'<span class="mono">{_e(s.route or "(no route matched)")}</span></a>'
            f'<br><span class="mono muted">{_e(s.span_id)}</span></td>'
            f'<td class="num">{_e(s.status_code)}</td>'
            f'<td class="num">+{offset_ms:.1f}</td>'
            f'<td class="num">{s.duration_ms:.1f}</td>'
            f"{_kept_cell(s)}"
            f'<td class="chart"><div class="wf" title="{_e(tip)}"><div class="bar" '
            f'style="left:{left:.3f}%;width:{width:.3f}%"></div></div></td>'
            f'<td class="muted">{extra}</td>'
            "</tr>\n"
        )
    count = len(ordered)
    where = (
        f"from {len(services)} service{'s' if len(services) != 1 else ''} "
        f"({_e(', '.join(services))})"
        if services
        else "(services not recorded)"
    )
    body = (
        f"<p>{count} profiled span{'s' if count != 1 else ''} of this trace held in the "
        f"store, {where}, in start order, over {whole_ms:.1f} ms. Spans that were not "
        "profiled or not kept are not shown; start offsets come from each host's clock. "
        "Open a span for its flame graph.</p>\n"
        "<table>\n<thead><tr><th>Service</th><th>Span</th><th>Status</th><th>Start (ms)</th>"
        "<th>Duration (ms)</th><th>Kept</th><th>Waterfall</th><th></th></tr></thead>\n"
        "<tbody>\n" + "".join(rows) + "</tbody>\n</table>\n"
    )
    heading = (
        f'<nav class="crumbs">{_link(prefix, "otelprof: all profiles")}{_CRUMB}trace</nav>\n'
        f'<h1>Trace <span class="mono">{_e(trace_id)}</span></h1>\n'
    )
    title = f"Trace {trace_id[:8]}… · {count} profiled span{'s' if count != 1 else ''} · otelprof"
    return _page(title, body, heading=heading)
