"""Django's ASGI app with DjangoInstrumentor, wrapped in ProfilingMiddleware
(``tests.django_app.instrumented_asgi:application``): the instrumentor's span is the server
span, joined by RouteMiddleware (tests/e2e/test_django.py)."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_app.settings")

from django.core.asgi import get_asgi_application
from opentelemetry.instrumentation.django import DjangoInstrumentor

from demo_app.telemetry import configure_tracing
from otelprof_middleware import ProfilingMiddleware

configure_tracing("otelprof-e2e-django-instrumented")
DjangoInstrumentor().instrument()  # puts its middleware first in MIDDLEWARE

application = ProfilingMiddleware(get_asgi_application(), debug_route=True)
