"""FlaskInstrumentor under gunicorn gthread, the middleware with the defaults: Flask's span
stays the one server span (no INTERNAL demotion, no span of ours), its ``excluded_urls``
keep /health out of the traces, and a slow request's profile is linked from Flask's span
and holds its work. Real gunicorn, real FlaskInstrumentor, spans read from the exporter."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import httpx
import pytest

from otelprof_middleware.profiling._span import PROFILE_URL
from otelprof_middleware.stores import SQLiteStore

from ..helpers import free_port
from .servers import gunicorn, run_server
from .test_defaults import PACKAGE_DEFAULTS, _seconds_under

pytestmark = pytest.mark.e2e


def test_flask_instrumentor_span_is_joined_under_gunicorn(tmp_path: Path) -> None:
    port = free_port()
    command = gunicorn("tests.e2e.flask_instrumented:app", port, workers=2, threads=4)
    with run_server(command, tmp_path, port=port, env=PACKAGE_DEFAULTS) as server:
        slow_trace = secrets.token_hex(16)
        headers = {"traceparent": f"00-{slow_trace}-{secrets.token_hex(8)}-01"}
        with httpx.Client(base_url=server.base_url, timeout=10) as client:
            for index in range(30):
                assert client.get(f"/items/{index % 5}").status_code == 200
                assert client.get("/health").text == "ok"
            assert client.get("/items/7", headers=headers).text == "item 7"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            spans = server.spans()
            if any(s["context"]["trace_id"] == "0x" + slow_trace for s in spans):
                break
            time.sleep(0.2)
        time.sleep(1.0)  # the writer stores in the background
        spans = server.spans()
        # Every span is Flask's SERVER span of an /items request: none for /health
        # (excluded), none of ours, none demoted to INTERNAL.
        assert {(s["name"], s["kind"]) for s in spans} == {
            ("GET /items/<int:item_id>", "SpanKind.SERVER")
        }, {(s["name"], s["kind"]) for s in spans}
        assert len(spans) == 31
        [slow_span] = [s for s in spans if s["context"]["trace_id"] == "0x" + slow_trace]
        link = slow_span["attributes"][PROFILE_URL]
        store = SQLiteStore(server.state_dir / "profiles.db")
        try:
            [slow] = store.get(slow_trace)
        finally:
            store.close()
        assert link.endswith(f"/debug/profile/{slow_trace}?span_id={slow.summary.span_id}")
        assert (slow.summary.kept_reason, slow.summary.mode) == ("slow", "always_on")
        assert slow.summary.route == "/items/<int:item_id>"
        share = _seconds_under(slow.session().frame_records, "instrumented_marker_work") / 0.3
        assert share >= 0.7, share
        page = httpx.get(link + "&format=text", timeout=10)
        assert page.status_code == 200 and "instrumented_marker_work" in page.text
