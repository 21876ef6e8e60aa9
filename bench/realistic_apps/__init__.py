"""Two realistic apps for ``bench.realistic``: FastAPI and Flask, the same endpoints.

Each app has the kinds of work a real service does per request, each on its own endpoint:

* ``/items/<id>``: an SQLAlchemy 2 ORM query (products of one category, a join, 50 rows)
  against a SQLite file of a few thousand rows, serialised through a Pydantic model;
* ``/page/<id>``: the same query plus an aggregate, rendered as an HTML page by Jinja2;
* ``/upstream``: a call to another local HTTP service (``bench.realistic_apps.upstream``):
  httpx's ``AsyncClient`` (FastAPI) or a ``requests.Session`` (Flask);
* ``/sleep``: 5 ms of waiting (``await asyncio.sleep(0.005)`` / ``time.sleep(0.005)``) and a
  small Pydantic response.

OpenTelemetry is set up as users do: ``FastAPIInstrumentor`` / ``FlaskInstrumentor``,
``SQLAlchemyInstrumentor``, ``HTTPXClientInstrumentor`` / ``RequestsInstrumentor``, a
``BatchSpanProcessor`` into the OTLP/HTTP exporter (to ``bench.otlp_sink``) or into an
exporter that drops the spans. ``REALAPP_VARIANT`` picks ``otel`` (that alone) or
``ours`` (that plus the middleware with no arguments).
"""
