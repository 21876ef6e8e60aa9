"""Django settings of the test project: no database, no apps, one otelprof middleware."""

from __future__ import annotations

SECRET_KEY = "otelprof-tests-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
ROOT_URLCONF = "tests.django_app.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE = [
    # Copies Django's matched URL pattern to the profile index and the server span.
    "otelprof_middleware.django.RouteMiddleware",
]
DATABASES: dict[str, object] = {}
USE_TZ = True
