"""Django's WSGI app in WSGIProfilingMiddleware (``tests.django_app.wsgi:application``).

OTel is configured here, like demo_app does: spans go to ``OTELPROF_DEMO_SPANS_DIR``
as JSON lines when that variable is set.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_app.settings")

from django.core.wsgi import get_wsgi_application

from demo_app.telemetry import configure_tracing
from otelprof_middleware import WSGIProfilingMiddleware

configure_tracing("otelprof-e2e-django")

application = WSGIProfilingMiddleware(get_wsgi_application(), debug_route=True)
