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

Where things are: ``_viewer.py`` (:class:`Viewer`: access, then routing),
``_access.py`` (token, cookie, loopback rule), ``_query.py`` (query parsing and bounds),
``_reading.py`` (the store: 503 and 422 written once), ``_handlers.py`` (one function
per route), ``_render.py`` (a profile in a format, with its headers), ``_html.py`` (the
escaped-by-default templates, page shell, links), ``_index_page.py``,
``_frame_pages.py``, ``_trace_pages.py`` (the pages), ``_svg.py`` (the diff flame graph
and histograms), :mod:`.baseline` (route baselines and diffs), ``_http.py`` (requests,
responses, headers) and ``_serve.py`` (ASGI/WSGI serving: the middlewares and
``otelprof serve``).
"""

from __future__ import annotations

from ._access import TOKEN_COOKIE
from ._handlers import INDEX_FORMATS
from ._http import ViewerRequest, ViewerResponse
from ._query import MAX_LIMIT, ORDERS
from ._serve import ViewerApp, serve_asgi, serve_wsgi
from ._viewer import Viewer

__all__ = [
    "INDEX_FORMATS",
    "MAX_LIMIT",
    "ORDERS",
    "TOKEN_COOKIE",
    "Viewer",
    "ViewerApp",
    "ViewerRequest",
    "ViewerResponse",
    "serve_asgi",
    "serve_wsgi",
]
