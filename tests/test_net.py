"""_net.py: the one rule for a usable Host header (span links and the viewer's JSON urls)."""

from __future__ import annotations

import json

import pytest

from otelprof_middleware._net import safe_host
from otelprof_middleware._record import ProfileRecord
from otelprof_middleware.stores.memory import MemoryStore
from otelprof_middleware.viewer import Viewer, ViewerRequest

from .helpers import make_summary, profile


@pytest.mark.parametrize(
    "host",
    [
        "example.com",
        "api.example.com:8443",
        "localhost",
        "127.0.0.1:8000",
        "[::1]",
        "[::1]:8000",
        "[::ffff:127.0.0.1]:80",
        "example.com.",
        "a" * 253 + ":65535",
    ],
)
def test_usable_hosts_pass_unchanged(host: str) -> None:
    assert safe_host(host) == host


@pytest.mark.parametrize(
    "host",
    [
        None,
        "",
        "a..b",
        ".example.com",
        "evil.example/path",
        "evil.example?x=1",
        'x"><script>',
        "example.com:",
        "example.com:123456",
        "a b",
        "exa\u00e9mple.com",
        "host\r\nX-Injected: 1",
        "[::1",
        "[zz::1]",
        "user@example.com",
        "a" * 254 + ":65535",
        "x" * 300,
    ],
)
def test_unusable_hosts_are_refused(host: str | None) -> None:
    assert safe_host(host) is None


def test_the_viewer_uses_the_same_rule() -> None:
    """A Host the span links refuse gives a relative url in the viewer's JSON, not a link."""
    summary = make_summary(trace_id="1" * 32, span_id="a" * 16, route="/items", duration_ms=1.0)
    store = MemoryStore()
    store.put(ProfileRecord.from_session(summary, profile(lambda: None, interval=0.001)))
    viewer = Viewer(store)
    path = f"/debug/profile/{'1' * 32}?span_id={'a' * 16}"
    for host, base in [("ok.example:8000", "http://ok.example:8000"), ("x" * 300, "")]:
        request = ViewerRequest(
            "GET", "/debug/profile", b"format=json", {"host": host}, client_host="127.0.0.1"
        )
        answer = viewer.handle(request)
        assert answer.status == 200
        assert [row["url"] for row in json.loads(answer.body)["profiles"]] == [base + path]
