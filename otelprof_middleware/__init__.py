"""otelprof-middleware: per-request pyinstrument profiles, one click from the OTel span."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._config import Config, Settings
from ._failsafe import snapshot as counters
from ._record import ProfileRecord, ProfileSummary
from .profiling._settings import check_settings
from .stores import ProfileStore, open_store
from .wsgi import WSGIProfilingMiddleware

if TYPE_CHECKING:
    from .asgi import ProfilingMiddleware

__all__ = [
    "Config",
    "ProfileRecord",
    "ProfileStore",
    "ProfileSummary",
    "ProfilingMiddleware",
    "Settings",
    "WSGIProfilingMiddleware",
    "check_settings",
    "counters",
    "open_store",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The ASGI adapter (and OpenTelemetry's ASGI instrumentation, Starlette's routing) is
    # imported when first asked for: a Flask or Django WSGI app never loads it (about
    # 20-35 ms of its start-up).
    if name in ("ProfilingMiddleware", "asgi"):
        asgi = importlib.import_module(".asgi", __name__)  # (sets the ``asgi`` attribute)
        return asgi if name == "asgi" else asgi.ProfilingMiddleware
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
