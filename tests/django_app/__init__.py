"""A minimal Django project for the end-to-end tests (ASGI and WSGI, real servers)."""
