"""otelprof-middleware: per-request pyinstrument profiles, one click from the OTel span."""

from __future__ import annotations

from ._config import Config, Settings
from ._failsafe import snapshot as counters
from ._record import ProfileRecord, ProfileSummary
from .asgi import ProfilingMiddleware
from .profiling._settings import check_settings
from .stores import ProfileStore, open_store
from .wsgi import WSGIProfilingMiddleware

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
