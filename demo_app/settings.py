"""The demo's settings: keep every profile and serve the viewer (to loopback clients).

Everything else is the package's defaults. An ``OTELPROF_*`` variable, when set, wins.
"""

from __future__ import annotations

import os
from typing import Any

DEMO_SETTINGS: dict[str, Any] = {"min_duration_ms": 0, "debug_route": True}


def demo_settings() -> dict[str, Any]:
    """The demo's own settings, minus those an ``OTELPROF_*`` variable sets."""
    return {
        name: value
        for name, value in DEMO_SETTINGS.items()
        if not os.environ.get("OTELPROF_" + name.upper(), "").strip()
    }
