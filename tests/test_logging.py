"""Log correlation: real FastAPI and Flask requests through the middleware, real SDK spans."""

from __future__ import annotations

import logging
import logging.config
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import format_span_id, format_trace_id
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse
from starlette.testclient import TestClient

from otelprof_middleware import ProfilingMiddleware, WSGIProfilingMiddleware
from otelprof_middleware.logging import ProfileLogFilter, add_profile_context, current_profile_url
from otelprof_middleware.profiling._span import PROFILE_URL
from otelprof_middleware.stores import MemoryStore

from .helpers import make_provider, marker_alpha, server_spans

LOOPBACK = ("127.0.0.1", 50000)
FORMAT = "%(message)s trace_id=%(trace_id)s span_id=%(span_id)s profile=%(profile_url)s"
app_log = logging.getLogger("tests.logging.app")


class Capture(logging.Handler):
    """Keeps records and their formatted lines."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter(FORMAT))
        self.addFilter(ProfileLogFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))

    def by_message(self, message: str) -> logging.LogRecord:
        [record] = [r for r in self.records if r.getMessage() == message]
        return record


@pytest.fixture
def capture() -> Iterator[Capture]:
    handler = Capture()
    app_log.addHandler(handler)
    app_log.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        app_log.removeHandler(handler)


def current_ids() -> dict[str, str]:
    context = trace.get_current_span().get_span_context()
    return {
        "trace_id": format_trace_id(context.trace_id),
        "span_id": format_span_id(context.span_id),
    }


events: list[dict[str, Any]] = []  # structlog events, captured by log_everywhere


@pytest.fixture(autouse=True)
def _clear_events() -> None:
    events.clear()


def log_everywhere(message: str) -> None:
    app_log.info(message)
    capture = structlog.testing.LogCapture()
    logger = structlog.wrap_logger(None, processors=[add_profile_context, capture])
    logger.info(message)
    events.extend(dict(entry) for entry in capture.entries)


def make_fastapi(provider: TracerProvider, **settings: Any) -> Any:
    from fastapi import FastAPI

    api = FastAPI(telemetry={"tracer_provider": provider})

    @api.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, Any]:
        marker_alpha(0.002)
        log_everywhere("async endpoint")
        return current_ids()

    @api.get("/sync")
    def sync_endpoint() -> dict[str, Any]:  # FastAPI runs it on a worker thread
        log_everywhere("sync endpoint")
        return current_ids()

    @api.get("/later")
    async def later() -> JSONResponse:
        log_everywhere("before the response")
        return JSONResponse({}, background=BackgroundTask(log_everywhere, "background task"))

    api.add_middleware(
        ProfilingMiddleware, profile_store=MemoryStore(), tracer_provider=provider, **settings
    )
    return api


def test_fastapi_records_carry_ids_and_profile_url(
    otel: tuple[TracerProvider, InMemorySpanExporter], capture: Capture
) -> None:
    with TestClient(make_fastapi(otel[0], sample_rate=1.0), client=LOOPBACK) as client:
        async_ids = client.get("/items/3").json()
        sync_ids = client.get("/sync").json()
    spans = server_spans(otel[1])
    assert len(spans) == 2
    urls = {format_trace_id(s.context.trace_id): (s.attributes or {})[PROFILE_URL] for s in spans}
    for message, ids in (("async endpoint", async_ids), ("sync endpoint", sync_ids)):
        record = capture.by_message(message)
        # The ids of the span current where the record was emitted (FastAPI's endpoint
        # span, a child of the server span), and the link to the request's profile.
        assert (record.trace_id, record.span_id) == (ids["trace_id"], ids["span_id"])  # type: ignore[attr-defined]
        assert record.profile_url == urls[ids["trace_id"]]  # type: ignore[attr-defined]
        assert record.profile_url.startswith("http://testserver/debug/profile/")  # type: ignore[attr-defined]
        [event] = [e for e in events if e["event"] == message]
        assert event["trace_id"] == ids["trace_id"] and event["span_id"] == ids["span_id"]
        assert event["profile_url"] == urls[ids["trace_id"]]
    line = next(line for line in capture.lines if line.startswith("async endpoint"))
    assert f"trace_id={async_ids['trace_id']}" in line and " profile=http://" in line


def test_unprofiled_request_has_ids_but_no_url(
    otel: tuple[TracerProvider, InMemorySpanExporter], capture: Capture
) -> None:
    with TestClient(make_fastapi(otel[0], sample_rate=0.0), client=LOOPBACK) as client:
        ids = client.get("/items/3").json()
    record = capture.by_message("async endpoint")
    assert (record.trace_id, record.span_id, record.profile_url) == (  # type: ignore[attr-defined]
        ids["trace_id"],
        ids["span_id"],
        "",
    )
    [event] = events
    assert "profile_url" not in event and event["trace_id"] == ids["trace_id"]


def test_discarded_profile_url_is_gone_once_the_profile_is_dropped(
    otel: tuple[TracerProvider, InMemorySpanExporter], capture: Capture
) -> None:
    """During the request the URL is the would-be link; after the keep decision, none."""
    app = make_fastapi(otel[0], sample_rate=1.0, min_duration_ms=60_000)
    with TestClient(app, client=LOOPBACK) as client:
        assert client.get("/later").status_code == 200
    before = capture.by_message("before the response")
    after = capture.by_message("background task")  # runs after the last body message
    assert before.profile_url.startswith("http://testserver/debug/profile/")  # type: ignore[attr-defined]
    assert after.profile_url == ""  # type: ignore[attr-defined]
    assert after.trace_id == before.trace_id  # type: ignore[attr-defined]
    [span] = server_spans(otel[1])
    assert PROFILE_URL not in (span.attributes or {})


def test_kept_profile_url_stays_for_background_work(
    otel: tuple[TracerProvider, InMemorySpanExporter], capture: Capture
) -> None:
    with TestClient(make_fastapi(otel[0], sample_rate=1.0), client=LOOPBACK) as client:
        assert client.get("/later").status_code == 200
    [span] = server_spans(otel[1])
    url = (span.attributes or {})[PROFILE_URL]
    assert capture.by_message("background task").profile_url == url  # type: ignore[attr-defined]


def test_flask_records_carry_ids_and_profile_url(
    otel: tuple[TracerProvider, InMemorySpanExporter], capture: Capture
) -> None:
    from flask import Flask

    flask_app = Flask(__name__)

    @flask_app.get("/items/<int:item_id>")
    def item(item_id: int) -> dict[str, Any]:
        log_everywhere("flask view")
        return current_ids()

    flask_app.wsgi_app = WSGIProfilingMiddleware(  # type: ignore[method-assign]
        flask_app.wsgi_app, profile_store=MemoryStore(), tracer_provider=otel[0], sample_rate=1.0
    )
    response = flask_app.test_client().get("/items/5", environ_base={"REMOTE_ADDR": "127.0.0.1"})
    ids = response.get_json()
    [span] = server_spans(otel[1])
    record = capture.by_message("flask view")
    assert (record.trace_id, record.span_id) == (ids["trace_id"], ids["span_id"])  # type: ignore[attr-defined]
    assert ids["span_id"] == format_span_id(span.context.span_id)  # the server span itself
    assert record.profile_url == (span.attributes or {})[PROFILE_URL]  # type: ignore[attr-defined]
    assert record.profile_url.endswith(f"?span_id={ids['span_id']}")  # type: ignore[attr-defined]
    [event] = events
    assert event["profile_url"] == record.profile_url  # type: ignore[attr-defined]


def test_outside_a_request_nothing_breaks(capture: Capture) -> None:
    assert current_profile_url() is None
    log_everywhere("no request")
    record = capture.by_message("no request")
    assert (record.trace_id, record.span_id, record.profile_url) == ("", "", "")  # type: ignore[attr-defined]
    assert capture.lines == ["no request trace_id= span_id= profile="]
    assert events == [{"event": "no request", "log_level": "info"}]


def test_span_without_request_has_ids_only(capture: Capture) -> None:
    provider, _ = make_provider()
    with provider.get_tracer("t").start_as_current_span("job"):
        expected = current_ids()
        log_everywhere("in a job")
    record = capture.by_message("in a job")
    assert (record.trace_id, record.span_id) == (expected["trace_id"], expected["span_id"])  # type: ignore[attr-defined]
    assert record.profile_url == ""  # type: ignore[attr-defined]


def test_existing_values_win_and_default_is_configurable(capture: Capture) -> None:
    capture.filters.clear()
    capture.addFilter(ProfileLogFilter(default="-"))
    app_log.info("given", extra={"trace_id": "from-extra"})
    record = capture.by_message("given")
    assert (record.trace_id, record.span_id, record.profile_url) == ("from-extra", "-", "-")  # type: ignore[attr-defined]
    event = add_profile_context(None, "info", {"event": "e", "trace_id": "mine"})
    assert event == {"event": "e", "trace_id": "mine"}


def test_filter_name_limits_enrichment_but_never_drops(capture: Capture) -> None:
    capture.filters.clear()
    capture.addFilter(ProfileLogFilter("some.other.logger"))
    capture.setFormatter(logging.Formatter("%(message)s"))
    app_log.info("elsewhere")
    record = capture.by_message("elsewhere")
    assert not hasattr(record, "trace_id")


def _docs_logging_dict() -> dict[str, Any]:
    """The ``LOGGING`` dict of docs/logging.md, as a reader copies it."""
    page = (Path(__file__).parent.parent / "docs" / "logging.md").read_text()
    block = next(b for b in page.split("```python\n")[1:] if b.startswith("LOGGING = {"))
    namespace: dict[str, Any] = {}
    exec(block.split("```", 1)[0], namespace)
    return dict(namespace["LOGGING"])


def test_the_documented_dict_config_leaves_the_otelprof_logger_on() -> None:
    """docs/logging.md's ``dictConfig`` (also Django's ``LOGGING``) runs after the package
    is imported, as in Django's ``wsgi.py``. Without ``disable_existing_loggers: False`` it
    disabled every logger that existed then: the ``otelprof_middleware`` logger, so that
    "profiling is OFF for this app" never showed, and Django's ``django.request``, so
    that a view's exception was no longer logged at all."""
    loggers = [logging.getLogger(name) for name in ("otelprof_middleware", "django.request")]
    root = logging.getLogger()
    saved = (
        root.handlers[:],
        root.level,
        [
            (lg, lg.disabled)
            for lg in logging.root.manager.loggerDict.values()
            if isinstance(lg, logging.Logger)
        ],
    )
    try:
        logging.config.dictConfig(_docs_logging_dict())
        assert [lg.disabled for lg in loggers] == [False, False]
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        for lg, disabled in saved[2]:
            lg.disabled = disabled
