"""The :class:`Viewer`: access, then routing to one function per page, never a 500."""

from __future__ import annotations

from collections.abc import Callable

from .._config import DEBUG_PREFIX
from .._failsafe import log_failure
from .._net import safe_host
from .._record import is_trace_id
from ..stores._base import ProfileStore
from . import _handlers
from ._access import Access
from ._http import Abort, ViewerRequest, ViewerResponse, framable, plain
from ._query import parse_query
from ._reading import StoreReader

__all__ = ["Viewer"]

_ALLOW = "GET, HEAD"


class Viewer:
    """Serves the profile index and single profiles from a :class:`ProfileStore`.

    Args:
        store: where the profiles are: a :class:`ProfileStore`, or a zero-argument
            callable returning one, to open the store on first use (the middlewares
            pass theirs: building the viewer opens nothing). The callable is called when
            a page first reads the store; while it raises, such pages answer 503 and
            the next one calls it again; the store it returns is kept.
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
        store: ProfileStore | Callable[[], ProfileStore],
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
        self._store = StoreReader(_opener(store))
        self._access = Access(token)
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
            set_cookie = self._access.authorize(request, self._links(request))
            response = self._route(request)
        except Abort as abort:
            response = abort.response()
        except Exception as exc:
            log_failure("viewer", exc)
            response = plain(503, "the profile viewer failed; the error was logged.\n")
        if response.status >= 400 and self._framed(request.path):
            response = framable(response)
        if set_cookie is not None:
            response.headers.append(("set-cookie", set_cookie))
        if request.method.upper() == "HEAD":
            response = ViewerResponse(response.status, response.headers, b"")
        return response

    def _route(self, request: ViewerRequest) -> ViewerResponse:
        if not self.handles(request.path):
            raise Abort(404, "not a profile viewer page.\n")
        if request.method.upper() not in ("GET", "HEAD"):
            raise Abort(405, f"method not allowed; use {_ALLOW}.\n", [("allow", _ALLOW)])
        query = parse_query(request.query_string)
        links = self._links(request)
        # ``public_url`` already holds the mount point, as in the links put on spans.
        urls = self._base_url(request) + (self._prefix if self._public_url else links)
        call = _handlers.Call(query, self._store, links, urls)
        rest = request.path[len(self._prefix) :].strip("/")
        if not rest:
            return _handlers.index(call)
        if rest in ("route", "route/flame"):
            return _handlers.baseline_page(call, bare=rest == "route/flame")
        trace_id, _, page = rest.partition("/")
        if page not in ("", "diff", "flame"):
            raise Abort(404, "not a profile viewer page.\n")
        if not is_trace_id(trace_id):
            raise Abort(
                400, "malformed trace id: expected 32 lowercase hex digits, not all zero.\n"
            )
        if page == "diff":
            return _handlers.diff(call, trace_id)
        return _handlers.profile(call, trace_id, bare=page == "flame")

    def _framed(self, path: str) -> bool:
        """True for the pages our frame pages show in an ``<iframe>`` (``.../flame``)."""
        return self.handles(path) and path.rstrip("/").endswith("/flame")

    def _links(self, request: ViewerRequest) -> str:
        """Where the viewer's pages are, as links: the app's mount point, then the prefix."""
        return request.root_path.rstrip("/") + self._prefix

    def _base_url(self, request: ViewerRequest) -> str:
        """``public_url``, else ``scheme://host`` of the request, else ``""`` (relative)."""
        if self._public_url:
            return self._public_url
        host = safe_host(request.host or request.header("host"))
        scheme = request.scheme if request.scheme in ("http", "https") else "http"
        return f"{scheme}://{host.lower()}" if host else ""


def _opener(store: ProfileStore | Callable[[], ProfileStore]) -> Callable[[], ProfileStore]:
    """``store`` as a callable returning it (a callable store is a store, not an opener)."""
    if callable(store) and not isinstance(store, ProfileStore):
        return store
    given: ProfileStore = store
    return lambda: given
