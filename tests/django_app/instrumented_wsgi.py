"""Django's WSGI app with DjangoInstrumentor, wrapped in WSGIProfilingMiddleware
(``tests.django_app.instrumented_wsgi:application``): the instrumentor's span is the server
span, joined by RouteMiddleware (tests/e2e/test_django.py)."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_app.settings")

from django.core.wsgi import get_wsgi_application
from opentelemetry.instrumentation.django import DjangoInstrumentor

from demo_app.telemetry import configure_tracing
from otelprof_middleware import WSGIProfilingMiddleware

configure_tracing("otelprof-e2e-django-instrumented")
DjangoInstrumentor().instrument()  # puts its middleware first in MIDDLEWARE

application = WSGIProfilingMiddleware(get_wsgi_application(), debug_route=True)
