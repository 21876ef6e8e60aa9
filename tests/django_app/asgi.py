"""Django's ASGI application wrapped in ProfilingMiddleware (``tests.django_app.asgi:application``).

OTel is configured here, like demo_app does: spans go to ``OTELPROF_DEMO_SPANS_DIR``
as JSON lines when that variable is set.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_app.settings")

from django.core.asgi import get_asgi_application

from demo_app.telemetry import configure_tracing
from otelprof_middleware import ProfilingMiddleware

configure_tracing("otelprof-e2e-django")

application = ProfilingMiddleware(get_asgi_application(), debug_route=True)
