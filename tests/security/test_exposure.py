"""Who can open the viewer and trigger profiles, and where the debug token may never go.

In-process tests give the adapters a client address (ASGI ``scope["client"]`` through
Starlette's TestClient, WSGI ``REMOTE_ADDR`` through werkzeug's client). One test
(``test_a_real_non_loopback_client``) uses a real non-loopback address: a network
namespace of its own, joined by a veth pair, talking to a real uvicorn.
"""

from __future__ import annotations

import ast
import hmac
import inspect
import io
import json
import logging
import sqlite3
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware as AsgiOtel
from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware as WsgiOtel
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.testclient import TestClient

from otelprof_middleware import (
    Config,
    ProfilingMiddleware,
    WSGIProfilingMiddleware,
)
from otelprof_middleware._record import ProfileRecord
from otelprof_middleware.profiling import _start_policy
from otelprof_middleware.profiling._span import PROFILE_URL
from otelprof_middleware.stores import MemoryStore, SQLiteStore
from otelprof_middleware.stores._base import ProfileStore
from otelprof_middleware.viewer import TOKEN_COOKIE, _access

from ..helpers import make_provider, make_summary, marker_alpha, profile
from ..test_asgi import make_app
from ..test_viewer import FailingStore
from ..test_wsgi import Client, make_flask
from ._support import TALLY, network_namespace, uvicorn_on

PREFIX = "/debug/profile"
TOKEN = "expo-T0ken/with+odd=chars"
QUOTED = quote(TOKEN, safe="")
T1, T2 = "1" * 32, "2" * 32
S1, S2 = "a" * 16, "b" * 16
LOOPBACK = "127.0.0.1"
REMOTE = ("10.1.2.3", "203.0.113.9", "192.168.0.10", "172.16.0.1", "::ffff:10.0.0.1", "2001:db8::1")
FORWARDING = {
    "X-Forwarded-For": "127.0.0.1",
    "X-Real-IP": "127.0.0.1",
    "Forwarded": "for=127.0.0.1;host=localhost",
    "X-Forwarded-Host": "localhost",
}


# one profiled app per adapter, with a uniform way to send requests


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]  # lowercased names; set-cookie kept separately
    set_cookie: str | None
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


@dataclass
class Served:
    adapter: str
    middleware: ProfilingMiddleware | WSGIProfilingMiddleware
    store: ProfileStore
    exporter: InMemorySpanExporter
    app: Any
    sent: list[Answer] = field(default_factory=list)

    def request(
        self,
        path: str,
        *,
        client: str = LOOPBACK,
        headers: Mapping[str, str] | None = None,
        method: str = "GET",
    ) -> Answer:
        TALLY["requests sent"] += 1
        if self.adapter == "asgi":
            with TestClient(self.app, client=(client, 4000), raise_server_exceptions=False) as c:
                r = c.request(method, path, headers=dict(headers or {}))
                answer = Answer(
                    r.status_code,
                    {k: v for k, v in r.headers.items() if k != "set-cookie"},
                    r.headers.get("set-cookie"),
                    r.content,
                )
        else:
            w = Client(self.app, use_cookies=False).open(
                path,
                method=method,
                headers=list((headers or {}).items()),
                environ_base={"REMOTE_ADDR": client},
            )
            answer = Answer(
                w.status_code,
                {k.lower(): v for k, v in w.headers.items() if k.lower() != "set-cookie"},
                w.headers.get("set-cookie"),
                w.get_data(),
            )
        self.sent.append(answer)
        return answer

    def flush(self) -> None:
        assert self.middleware.core.writer.flush()

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


Serve = Callable[..., Served]


@pytest.fixture(params=["asgi", "wsgi"])
def serve(request: pytest.FixtureRequest) -> Iterator[Serve]:
    """Build the adapter's test app with ``settings``; ``outer_otel`` wraps it in OTel's
    own middleware (an instrumentation outside ours)."""
    made: list[Served] = []

    def make(
        *, store: ProfileStore | None = None, outer_otel: bool = False, **settings: Any
    ) -> Served:
        provider, exporter = make_provider()
        store = store if store is not None else MemoryStore()
        app: Any
        middleware: ProfilingMiddleware | WSGIProfilingMiddleware
        if request.param == "asgi":
            middleware = ProfilingMiddleware(
                make_app(), tracer_provider=provider, profile_store=store, **settings
            )
            app = AsgiOtel(middleware, tracer_provider=provider) if outer_otel else middleware
        else:
            flask = make_flask()
            middleware = WSGIProfilingMiddleware(
                flask.wsgi_app, tracer_provider=provider, profile_store=store, **settings
            )
            flask.wsgi_app = (  # type: ignore[method-assign]
                WsgiOtel(middleware, tracer_provider=provider) if outer_otel else middleware
            )
            app = flask
        served = Served(request.param, middleware, store, exporter, app)
        made.append(served)
        return served

    yield make
    for served in made:
        served.middleware.core.writer.close()


def _session_record(trace_id: str, span_id: str, route: str = "/items/{item_id}") -> ProfileRecord:
    summary = make_summary(trace_id=trace_id, span_id=span_id, route=route)
    return ProfileRecord.from_session(summary, profile(lambda: marker_alpha(0.01), 0.0005))


def _filled_store() -> MemoryStore:
    store = MemoryStore()
    store.put(_session_record(T1, S1))
    store.put(_session_record(T2, S1))
    store.put(_session_record(T2, S2))
    return store


def _assert_viewer_answer(answer: Answer, status: int) -> None:
    assert answer.status == status, answer.text
    assert "default-src 'none'" in answer.headers["content-security-policy"]
    assert answer.headers["x-content-type-options"] == "nosniff"


VIEWER_PAGES = [
    ("GET", PREFIX),
    ("GET", PREFIX + "?format=json"),
    ("GET", f"{PREFIX}/{T1}"),
    ("GET", f"{PREFIX}/{T1}?format=text&span_id={S1}"),
    ("GET", f"{PREFIX}/not-an-id"),
    ("HEAD", PREFIX),
    ("POST", PREFIX),
]


# off by default


def test_the_viewer_is_off_by_default(serve: Serve) -> None:
    assert Config.load({}).debug_route is False
    for settings in ({}, {"debug_token": TOKEN}):  # a token alone does not turn it on
        served = serve(store=_filled_store(), **settings)
        for method, path in VIEWER_PAGES:
            for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
                answer = served.request(path, method=method, headers=headers)
                assert answer.status in (404, 405), (method, path, answer.status)
                assert "content-security-policy" not in answer.headers, "the app's own answer"
                assert T1.encode() not in answer.body
        answer = served.request(f"{PREFIX}?token={QUOTED}")
        assert answer.status == 404 and answer.set_cookie is None


# without a token: loopback only


@pytest.mark.parametrize("client", REMOTE)
def test_non_loopback_clients_are_refused(serve: Serve, client: str) -> None:
    served = serve(store=_filled_store(), debug_route=True)
    for method, path in VIEWER_PAGES:
        answer = served.request(path, method=method, client=client)
        _assert_viewer_answer(answer, 403)
        if method != "HEAD":
            assert "loopback" in answer.text and T1 not in answer.text
    _assert_viewer_answer(served.request(PREFIX, client=LOOPBACK), 200)  # the control


def test_forwarding_headers_never_make_a_client_loopback(serve: Serve) -> None:
    open_viewer = serve(store=_filled_store(), debug_route=True)
    tokened = serve(store=_filled_store(), debug_route=True, debug_token=TOKEN)
    for name, value in FORWARDING.items():
        forwarded = {name: value}
        _assert_viewer_answer(open_viewer.request(PREFIX, client=REMOTE[0], headers=forwarded), 403)
        _assert_viewer_answer(tokened.request(PREFIX, client=REMOTE[0], headers=forwarded), 401)
    _assert_viewer_answer(open_viewer.request(PREFIX, client=REMOTE[0], headers=FORWARDING), 403)


# with a token: everyone presents it


def test_the_token_opens_the_viewer_and_nothing_else_does(serve: Serve) -> None:
    served = serve(store=_filled_store(), debug_route=True, debug_token=TOKEN)
    refused: list[tuple[str, dict[str, str]]] = [
        (PREFIX, {}),
        (PREFIX, {"Authorization": "Bearer wrong"}),
        (PREFIX, {"Authorization": f"Basic {TOKEN}"}),
        (PREFIX, {"Authorization": f"Bearer {TOKEN[:-1]}"}),
        (f"{PREFIX}?token=wrong", {}),
        (f"{PREFIX}?token={QUOTED}&token={QUOTED}", {}),
        (PREFIX, {"Cookie": f"{TOKEN_COOKIE}=wrong"}),
        (PREFIX, {"X-Otelprof": TOKEN}),  # the trigger header is not a credential
    ]
    for client in (REMOTE[0], LOOPBACK):  # loopback needs it too
        for path, headers in refused:
            answer = served.request(path, client=client, headers=headers)
            _assert_viewer_answer(answer, 401)
            assert answer.headers["www-authenticate"] == 'Bearer realm="otelprof"'
            assert answer.set_cookie is None
    bearer = served.request(PREFIX, client=REMOTE[0], headers={"Authorization": f"Bearer {TOKEN}"})
    _assert_viewer_answer(bearer, 200)
    visit = served.request(f"{PREFIX}?token={QUOTED}", client=REMOTE[0])
    _assert_viewer_answer(visit, 200)
    assert visit.set_cookie is not None
    cookie = visit.set_cookie.split(";")[0]
    assert {"HttpOnly", "SameSite=Lax", f"Path={PREFIX}"} <= {
        part.strip() for part in visit.set_cookie.split(";")
    }
    followed = served.request(f"{PREFIX}/{T1}", client=REMOTE[0], headers={"Cookie": cookie})
    _assert_viewer_answer(followed, 200)


def _compares_a_secret(node: ast.Compare) -> bool:
    secret_names = ("token", "credentials", "candidate", "header_value", "cookie")
    for operand in (node.left, *node.comparators):
        if isinstance(operand, ast.Call) and ast.unparse(operand.func) == "len":
            continue  # how many were sent is no secret
        if any(name in ast.unparse(operand).lower() for name in secret_names):
            return True
    return False


@pytest.mark.parametrize(
    ("module", "function"),
    [(_access, _access.Access._is_token), (_start_policy, _start_policy.StartPolicy.is_triggered)],
    ids=["viewer", "trigger"],
)
def test_the_token_is_compared_in_constant_time(module: Any, function: Any) -> None:
    checker = ast.parse(textwrap.dedent(inspect.getsource(function)))
    calls = {ast.unparse(n.func) for n in ast.walk(checker) if isinstance(n, ast.Call)}
    assert "hmac.compare_digest" in calls
    # and nowhere in the module is a secret compared with ==, !=, <, in, ...
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.Compare) and _compares_a_secret(node):
            ops = {type(op) for op in node.ops}
            assert ops <= {ast.Is, ast.IsNot}, f"{ast.unparse(node)} is not constant time"


def test_the_token_decision_goes_through_compare_digest(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = serve(debug_route=True, debug_token=TOKEN, sample_rate=0.0)
    real = hmac.compare_digest
    seen: list[tuple[bytes, bytes]] = []

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert served.request(PREFIX, client=REMOTE[0], headers=bearer).status == 200
    assert served.request("/items/7", client=REMOTE[0], headers={"X-Otelprof": TOKEN}).status == 200
    assert (TOKEN.encode(), TOKEN.encode()) in seen
    # If compare_digest says no, the right token opens nothing: it is the only judge.
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: False)
    assert served.request(PREFIX, client=REMOTE[0], headers=bearer).status == 401
    served.flush()
    assert len(served.store.list()) == 1, "only the trigger sent while compare_digest said yes"


# where the token must never go


def test_the_token_is_never_logged(serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    served = serve(store=FailingStore(), debug_route=True, debug_token=TOKEN, sample_rate=0.0)
    for headers, path in [
        ({"Authorization": f"Bearer {TOKEN}"}, PREFIX),
        ({"Authorization": "Bearer wrong"}, PREFIX),
        ({"Authorization": f"Bearer {TOKEN}"}, f"{PREFIX}/{T1}?format=json"),
        ({}, f"{PREFIX}?token={QUOTED}"),
        ({}, f"{PREFIX}?token=wrong"),
        ({"Cookie": f"{TOKEN_COOKIE}={QUOTED}"}, f"{PREFIX}?format=json"),
        ({"X-Otelprof": TOKEN}, "/items/7"),
        ({"X-Otelprof": "wrong"}, "/items/7"),
    ]:
        served.request(path, client=REMOTE[0], headers=headers)
    served.flush()
    # The test client's own logger (httpx) prints each URL it requests: that is the
    # client's side, not the app's. Everything on the server side is checked.
    records = [r for r in caplog.records if r.name.split(".")[0] not in ("httpx", "httpcore")]
    assert any(r.name == "otelprof_middleware" for r in records), "the failures were logged"
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    for record in records:
        text = handler.format(record)  # message, arguments and the formatted traceback
        assert TOKEN not in text and QUOTED not in text, text


def _span_texts(spans: list[ReadableSpan]) -> list[str]:
    texts: list[str] = []
    for span in spans:
        texts.append(span.name)
        texts.extend(str(v) for v in (span.attributes or {}).values())
        for event in span.events:
            texts.extend(str(v) for v in (event.attributes or {}).values())
        for link in span.links:
            texts.extend(str(v) for v in (link.attributes or {}).values())
        texts.append(str(span.status.description))
    return texts


def test_the_token_never_reaches_a_span(serve: Serve) -> None:
    served = serve(debug_route=True, debug_token=TOKEN, sample_rate=0.0)
    assert served.request("/items/7", client=REMOTE[0], headers={"X-Otelprof": TOKEN}).status == 200
    served.request(PREFIX, client=REMOTE[0], headers={"Authorization": f"Bearer {TOKEN}"})
    served.request(PREFIX, client=REMOTE[0], headers={"Cookie": f"{TOKEN_COOKIE}={QUOTED}"})
    served.flush()
    linked = [s for s in served.spans() if s.attributes and PROFILE_URL in s.attributes]
    assert len(linked) == 1, "the triggered request was profiled and linked"
    assert all(TOKEN not in t and QUOTED not in t for t in _span_texts(served.spans()))


def test_a_query_token_stays_out_of_an_outer_server_span(serve: Serve) -> None:
    served = serve(store=_filled_store(), outer_otel=True, debug_route=True, debug_token=TOKEN)
    assert served.request(f"{PREFIX}?token={QUOTED}", client=REMOTE[0]).status == 200
    texts = _span_texts(served.spans())
    assert texts, "the outer middleware recorded the visit"
    assert all(TOKEN not in t and QUOTED not in t for t in texts), texts


def test_the_token_never_appears_in_a_response(serve: Serve) -> None:
    served = serve(store=_filled_store(), debug_route=True, debug_token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}", "Host": "api.example.com"}
    paths = [
        PREFIX,
        f"{PREFIX}?format=json",
        f"{PREFIX}?format=json&route=%2Fitems%2F%7Bitem_id%7D&order=slowest&limit=5",
        f"{PREFIX}/{T2}",
        f"{PREFIX}/{T2}?format=json",
        f"{PREFIX}/{T2}?format=text",
        *(
            f"{PREFIX}/{T1}?format={fmt}"
            for fmt in ("html", "speedscope", "text", "json", "folded")
        ),
        f"{PREFIX}/{T1}?format=svg",
        f"{PREFIX}/{'f' * 32}",
        f"{PREFIX}/bad",
    ]
    answers = [served.request(path, client=REMOTE[0], headers=auth) for path in paths]
    answers.append(served.request(f"{PREFIX}?token={QUOTED}&format=json", client=REMOTE[0]))
    answers.append(served.request(PREFIX, client=REMOTE[0], headers={"Authorization": "Bearer x"}))
    assert {a.status for a in answers} == {200, 400, 401, 404}
    for answer in answers:
        for where in (answer.body, json.dumps(dict(answer.headers)).encode()):
            assert TOKEN.encode() not in where and QUOTED.encode() not in where
    urls = [row["url"] for row in json.loads(answers[1].body)["profiles"]]
    assert urls and all(u.startswith("http://api.example.com/debug/profile/") for u in urls)
    assert all("token" not in u for u in urls)


def test_public_url_pins_span_links_against_a_hostile_host_header(serve: Serve) -> None:
    """Without ``public_url`` a span link follows the request's (sane) Host header, so a
    client can make links point elsewhere; ``public_url`` pins them (docs/security.md)."""
    links = []
    for settings in ({}, {"public_url": "https://api.example.com"}):
        served = serve(sample_rate=1.0, min_duration_ms=0, **settings)
        served.request("/items/7", headers={"Host": "evil.example"})
        served.request("/items/7", headers={"Host": "evil.example/x?y=<z>"})  # not a host: ignored
        served.flush()
        links.append(
            [
                str(s.attributes[PROFILE_URL])
                for s in served.spans()
                if s.attributes and PROFILE_URL in s.attributes
            ]
        )
    followed, pinned = links
    assert len(followed) == len(pinned) == 2
    assert followed[0].startswith("http://evil.example/debug/profile/")
    assert not followed[1].startswith("http://evil.example")
    assert all(link.startswith("https://api.example.com/debug/profile/") for link in pinned)


# the trigger header


TRIGGER_CASES = [
    # (settings, client, trigger value, profiled?)
    ({"debug_route": True}, REMOTE[0], "1", False),
    ({"debug_route": True}, REMOTE[1], "", False),
    ({"debug_route": True}, "2001:db8::1", "1", False),
    ({"debug_route": True}, LOOPBACK, "1", True),
    ({"debug_route": True}, "::1", "1", True),
    ({}, LOOPBACK, "1", False),  # viewer off, no token: no triggers at all
    ({"debug_route": True, "debug_token": TOKEN}, REMOTE[0], "1", False),
    ({"debug_route": True, "debug_token": TOKEN}, REMOTE[0], "wrong", False),
    ({"debug_route": True, "debug_token": TOKEN}, REMOTE[0], TOKEN + "x", False),
    ({"debug_route": True, "debug_token": TOKEN}, LOOPBACK, "1", False),
    ({"debug_route": True, "debug_token": TOKEN}, REMOTE[0], TOKEN, True),
    ({"debug_token": TOKEN}, REMOTE[0], TOKEN, True),
]


@pytest.mark.parametrize(("settings", "client", "value", "profiled"), TRIGGER_CASES)
def test_trigger_header_rules(
    serve: Serve, settings: dict[str, Any], client: str, value: str, profiled: bool
) -> None:
    served = serve(sample_rate=0.0, **settings)
    headers = {"X-Otelprof": value, **FORWARDING}  # forwarding headers change nothing
    assert served.request("/items/7", client=client, headers=headers).status == 200
    served.flush()
    assert len(served.store.list()) == (1 if profiled else 0)
    linked = [s for s in served.spans() if s.attributes and PROFILE_URL in s.attributes]
    assert len(linked) == (1 if profiled else 0)


# a real non-loopback client


def _stored_routes(state_dir: Path) -> list[str]:
    path = state_dir / "profiles.db"
    if not path.exists():
        return []
    store = SQLiteStore(path)
    try:
        return [s.route for s in store.list(limit=1000)]
    finally:
        store.close()


def _wait_for_profiles(state_dir: Path, count: int, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            routes = _stored_routes(state_dir)
        except sqlite3.Error:
            routes = []
        if len(routes) >= count or time.monotonic() > deadline:
            return routes
        time.sleep(0.1)


@pytest.mark.e2e
def test_a_real_non_loopback_client(tmp_path: Path) -> None:
    """uvicorn + the demo app on the host end of a veth pair; the client in a namespace."""
    with network_namespace() as ns:
        open_dir, tokened_dir = tmp_path / "open", tmp_path / "tokened"
        open_dir.mkdir()
        tokened_dir.mkdir()
        env = {"OTELPROF_SAMPLE_RATE": "0"}
        with uvicorn_on(ns.host_address, "demo_app.fastapi_app:app", open_dir, env) as server:
            answers = ns.requests(
                server.base_url,
                [
                    {"method": "GET", "path": PREFIX},
                    {"method": "GET", "path": PREFIX + "?format=json", "headers": FORWARDING},
                    {"method": "GET", "path": f"{PREFIX}/{T1}"},
                    {"method": "GET", "path": "/cpu?ms=5", "headers": {"x-otelprof": "1"}},
                ],
            )
        _check_real_refusals(answers[:3], 403)
        assert "loopback" in answers[0]["body"]
        assert answers[3]["status"] == 200
        # uvicorn has stopped: the writer flushed at exit; no trigger got through
        assert _stored_routes(open_dir / "state") == []

        env = {"OTELPROF_SAMPLE_RATE": "0", "OTELPROF_DEBUG_TOKEN": TOKEN}
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        with uvicorn_on(ns.host_address, "demo_app.fastapi_app:app", tokened_dir, env) as server:
            answers = ns.requests(
                server.base_url,
                [
                    {"method": "GET", "path": PREFIX},
                    {"method": "GET", "path": PREFIX, "headers": {"Authorization": "Bearer no"}},
                    {"method": "GET", "path": PREFIX, "headers": FORWARDING},
                    {"method": "GET", "path": "/cpu?ms=5", "headers": {"x-otelprof": "1"}},
                    {"method": "GET", "path": "/cpu?ms=5", "headers": {"x-otelprof": "no"}},
                    {"method": "GET", "path": "/items/3", "headers": {"x-otelprof": TOKEN}},
                ],
            )
            _check_real_refusals(answers[:3], 401)
            assert [a["status"] for a in answers[3:]] == [200, 200, 200]
            assert _wait_for_profiles(tokened_dir / "state", 1) == ["/items/{item_id}"]
            [index] = ns.requests(
                server.base_url,
                [{"method": "GET", "path": PREFIX + "?format=json", "headers": bearer}],
            )
            assert index["status"] == 200
            rows = json.loads(index["body"])["profiles"]
            assert [row["route"] for row in rows] == ["/items/{item_id}"]
            assert rows[0]["url"].startswith(server.base_url)
            assert TOKEN not in index["body"] and QUOTED not in index["body"]
        assert _stored_routes(tokened_dir / "state") == ["/items/{item_id}"]
        # the header token is in no log line (access log on) and no exported span
        assert TOKEN not in server.log.read_text()
        assert all(TOKEN not in json.dumps(span) for span in server.spans())
        assert server.spans(), "spans were exported"
        print(f"real client {ns.client_address} -> server {ns.host_address}")


def _check_real_refusals(answers: list[dict[str, Any]], status: int) -> None:
    for answer in answers:
        assert answer["status"] == status, answer
        assert "default-src 'none'" in answer["headers"]["content-security-policy"]
        assert answer["headers"]["x-content-type-options"] == "nosniff"
        assert T1 not in answer["body"]
