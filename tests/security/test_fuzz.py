"""Fuzzing every viewer route through both adapters, in-process, with hypothesis.

Requests: random paths under ``/debug/profile`` (the index, profiles, route baselines and
diffs; ids of every shape, unicode, encoded slashes, dot segments, very long values),
query parameters (``format``, ``span_id``, ``route``, ``min_duration_ms``, ``order``,
``limit``, ``token``: random, huge, unicode, repeated, more than the viewer accepts),
headers (``Authorization``, ``Cookie``, ``Host``, forwarding headers), methods (standard
and junk), client addresses (loopback and not), against a viewer with and without a
debug token.

Properties: never a 5xx (a 503 only when the store is deliberately broken), never a
stack trace, every 4xx a short one-line plain-text message, CSP and ``nosniff`` on
every viewer response, and the access rules hold for every request.
"""

from __future__ import annotations

import base64
import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl, quote, urlencode

import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from flask import Flask, Response, jsonify
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from otelprof_middleware import ProfilingMiddleware, WSGIProfilingMiddleware
from otelprof_middleware.stores import MemoryStore
from otelprof_middleware.stores._base import ProfileStore
from otelprof_middleware.viewer import TOKEN_COOKIE

from ..helpers import make_provider, marker_alpha
from ..test_viewer import FailingStore
from ..test_wsgi import Client
from ._support import TALLY

PREFIX = "/debug/profile"
TOKEN = "fuzz-T0ken/with+odd=chars"
LOOPBACK_CLIENTS = ("127.0.0.1", "::1", "127.8.9.10")
REMOTE_CLIENTS = ("10.1.2.3", "203.0.113.9", "::ffff:10.0.0.1", "2001:db8::1")
FORMATS = ("html", "speedscope", "text", "json", "folded")
PROFILED_REQUESTS = 3
# What a Python stack trace looks like (pyinstrument's page says "removeTracebackHide").
TRACEBACK = re.compile(rb'Traceback \(most recent call last\)|File "[^"\n]*", line [0-9]+')
WORKING_EXAMPLES = 300
BROKEN_EXAMPLES = 100


# the apps behind the middleware


async def _work(request: Request) -> JSONResponse:
    marker_alpha(0.01)
    return JSONResponse({"n": request.path_params["n"]})


def _starlette() -> Starlette:
    return Starlette(routes=[Route("/work/{n}", _work)])


def _flask() -> Flask:
    app = Flask(__name__)

    @app.get("/work/<int:n>")
    def work(n: int) -> Response:
        marker_alpha(0.01)
        return jsonify(n=n)

    return app


# requests


@dataclass(frozen=True)
class FuzzRequest:
    method: str
    path: str  # percent-encoded ASCII; may hold literal dot segments
    query: str  # the raw query string, ASCII
    headers: tuple[tuple[str, str], ...]  # values in latin-1
    body: bytes
    client: str
    grants: bool  # carries the right token in a form the viewer accepts
    valid: bool  # a well-formed GET/HEAD of a stored profile

    @property
    def loopback(self) -> bool:
        return self.client in LOOPBACK_CLIENTS

    @property
    def readable(self) -> bool:
        return self.method.upper() in ("GET", "HEAD")


@dataclass(frozen=True)
class Observed:
    status: int
    headers: list[tuple[str, str]]  # names lowercased
    body: bytes
    path: str  # the decoded path the adapter handed to the middleware

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key == name]
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None


_LATIN1 = st.characters(codec="latin-1", exclude_categories=("Cc",))
_TCHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~"
_JUNK_METHOD = st.text(alphabet=_TCHARS, min_size=1, max_size=20)


def _segments(trace_ids: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(trace_ids),
        st.text("0123456789abcdef", min_size=32, max_size=32),
        st.text("0123456789abcdefABCDEFxyz", max_size=40),
        st.sampled_from(
            [
                "",
                ".",
                "..",
                "%2e",
                "%2E%2E",
                "%2F",
                "%2f..%2f",
                "%5C",
                "%00",
                "%ff",
                "%c3%28",
                "%e2%80%ae",
                "%3Cscript%3E",
                "%25",
                "%252F",
                "~",
                ";x=1",
                "0" * 32,
                "F" * 32,
            ]
        ),
        st.text(max_size=30).map(lambda s: quote(s, safe="")),
        st.integers(100, 12_000).map(lambda n: "a" * n),
    )


def _paths(trace_ids: list[str]) -> st.SearchStrategy[str]:
    separator = st.sampled_from(["/", "/", "/", "%2F", "%2f", "//"])
    pieces = st.lists(st.tuples(separator, _segments(trace_ids)), max_size=4)
    trailing = st.sampled_from(["", "", "/", "%2F"])
    composed = st.builds(
        lambda parts, end: PREFIX + "".join(sep + seg for sep, seg in parts) + end,
        pieces,
        trailing,
    )
    known = st.sampled_from(trace_ids)
    return st.one_of(
        # the index, baselines (framed, and pyinstrument's page of them)
        st.sampled_from([PREFIX, PREFIX + "/", PREFIX + "/route", PREFIX + "/route/flame"]),
        known.map(lambda t: f"{PREFIX}/{t}"),  # the trace page, or a profile
        known.map(lambda t: f"{PREFIX}/{t}/diff"),  # a profile against its route
        known.map(lambda t: f"{PREFIX}/{t}/flame"),  # pyinstrument's page of a profile
        composed,
        composed,
    )


def _values(span_ids: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from([*FORMATS, "HTML", "svg", "", "newest", "slowest", "oldest"]),
        st.sampled_from(span_ids),
        st.text("0123456789abcdef", min_size=16, max_size=16),
        st.integers(-(10**30), 10**30).map(str),
        st.floats().map(repr),
        st.sampled_from(["1e309", "nan", "-0", "0x10", "١٢", "²", "1_000", " 5 ", "1000", "1001"]),
        st.sampled_from(["/work/{n}", "/work/<int:n>", "/nope"]),  # route templates
        st.text(max_size=60),
        st.integers(300, 12_000).map(lambda n: "9" * n),
        st.just(TOKEN),
        st.just("wrong"),
    )


KNOWN = ("format", "span_id", "route", "min_duration_ms", "order", "limit", "token")
_NAMES = st.one_of(st.sampled_from([*KNOWN, "Format"]), st.text(max_size=12))
_JUNK_QUERY = st.one_of(
    st.sampled_from(
        ["%", "%zz", "%ff", "%c3%28", "&&&", "==", ";", "a=%", "=x", "+", "%00", "&=&"]
    ),
    st.text(alphabet="abcdf0123456789=&;+-._~", max_size=40),
)


@st.composite
def _queries(draw: st.DrawFn, span_ids: list[str]) -> tuple[str, bool]:
    """A raw query string and whether it carries the token as the viewer accepts it."""
    mode = draw(st.integers(0, 19))
    if mode == 0:  # more fields than the viewer parses
        pairs = [("token", TOKEN)] + [("p", "1")] * draw(st.integers(45, 60))
    elif mode < 11:  # each known parameter at most once, with a random value
        pairs = [(name, draw(_values(span_ids))) for name in KNOWN if draw(st.booleans())]
    else:  # anything, repeated names too
        pairs = draw(st.lists(st.tuples(_NAMES, _values(span_ids)), max_size=8))
    query = urlencode(pairs)
    if draw(st.booleans()):
        query += ("&" if query else "") + draw(_JUNK_QUERY)
    # The viewer reads at most 50 fields (parse_qsl counts 1 + the number of "&").
    tokens = [value for name, value in pairs if name == "token"]
    return query, 1 + query.count("&") <= 50 and tokens == [TOKEN]


_QUOTED = quote(TOKEN, safe="")
_AUTHORIZATION = st.one_of(
    st.none(),
    st.sampled_from(
        [
            (f"Bearer {TOKEN}", True),
            (f"bearer {TOKEN}", True),
            (f"BEARER   {TOKEN}  ", True),
            (f"Bearer {TOKEN}x", False),
            (f"Bearer {TOKEN[:-1]}", False),
            (f"Bearer {TOKEN.upper()}", False),
            (f"Bearer {_QUOTED}", False),
            ("Bearer", False),
            ("Bearer ", False),
            ("", False),
            (f"Basic {base64.b64encode(f'user:{TOKEN}'.encode()).decode()}", False),
            (f"Token {TOKEN}", False),
        ]
    ),
    st.text(_LATIN1, max_size=300).map(lambda s: ("Bearer " + s, False)),
    st.text(_LATIN1, max_size=300).map(lambda s: (s, False)),
)
_COOKIE = st.one_of(
    st.none(),
    st.sampled_from(
        [
            (f"{TOKEN_COOKIE}={_QUOTED}", True),
            (f"a=b; {TOKEN_COOKIE}={_QUOTED}; c=d", True),
            (f'{TOKEN_COOKIE}="{_QUOTED}"', True),
            (f"{TOKEN_COOKIE}={TOKEN}", True),
            (f"{TOKEN_COOKIE}=wrong", False),
            (f"{TOKEN_COOKIE}=", False),
            (f"other={_QUOTED}", False),
            (f"{TOKEN_COOKIE.upper()}={_QUOTED}", False),
        ]
    ),
    st.text(_LATIN1, max_size=300).map(lambda s: (s, False)),
)
_HOST = st.one_of(
    st.none(),
    st.sampled_from(
        ["evil.example", "a b", "[::1]:8000", "x" * 300, "exa\u00e9mple", "127.0.0.1:1"]
    ),
    st.text(_LATIN1, max_size=80),
)
_EXTRA_HEADERS = st.lists(
    st.sampled_from(
        [
            ("X-Forwarded-For", "127.0.0.1"),
            ("Forwarded", "for=127.0.0.1"),
            ("X-Real-IP", "127.0.0.1"),
            ("X-Otelprof", "1"),
            ("X-Otelprof", TOKEN),
            ("Content-Type", "application/json"),
            ("Accept", "text/html"),
        ]
    ),
    max_size=3,
    unique=True,
)
_METHODS = st.one_of(
    st.sampled_from(
        ["GET", "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "get"]
    ),
    _JUNK_METHOD,
)


@st.composite
def _fuzzy(draw: st.DrawFn, trace_ids: list[str], span_ids: list[str]) -> FuzzRequest:
    query, query_grants = draw(_queries(span_ids))
    headers: list[tuple[str, str]] = []
    grants = query_grants
    # Mostly requests that get past the access check, so the parsing is fuzzed too.
    admitted = draw(st.integers(0, 3)) > 0
    if admitted:
        headers.append(("Authorization", f"Bearer {TOKEN}"))
        grants = True
    authorization = None if admitted else draw(_AUTHORIZATION)  # one header, never two
    for choice, name in ((authorization, "Authorization"), (draw(_COOKIE), "Cookie")):
        if choice is not None:
            headers.append((name, choice[0]))
            grants = grants or choice[1]
    host = draw(_HOST)
    if host is not None:
        headers.append(("Host", host))
    headers.extend(draw(_EXTRA_HEADERS))
    readable = st.sampled_from(["GET", "GET", "GET", "HEAD"])
    clients = LOOPBACK_CLIENTS if admitted else LOOPBACK_CLIENTS + REMOTE_CLIENTS
    return FuzzRequest(
        method=draw(st.one_of(readable, _METHODS) if admitted else _METHODS),
        path=draw(_paths(trace_ids)),
        query=query,
        headers=tuple(headers),
        body=draw(st.binary(max_size=64)),
        client=draw(st.sampled_from(clients)),
        grants=grants,
        valid=False,
    )


@st.composite
def _valid(draw: st.DrawFn, profiles: list[tuple[str, str]]) -> FuzzRequest:
    """A well-formed request for a stored profile, from loopback, with the token."""
    trace_id, span_id = draw(st.sampled_from(profiles))
    params = [("format", draw(st.sampled_from(FORMATS))), ("span_id", span_id)]
    return FuzzRequest(
        method=draw(st.sampled_from(["GET", "HEAD"])),
        path=f"{PREFIX}/{trace_id}",
        query=urlencode(params),
        headers=(("Authorization", f"Bearer {TOKEN}"),),
        body=b"",
        client=draw(st.sampled_from(LOOPBACK_CLIENTS)),
        grants=True,
        valid=True,
    )


def _requests(profiles: list[tuple[str, str]]) -> st.SearchStrategy[FuzzRequest]:
    trace_ids = sorted({t for t, _ in profiles})
    span_ids = sorted({s for _, s in profiles})
    return st.one_of(_valid(profiles), _fuzzy(trace_ids, span_ids), _fuzzy(trace_ids, span_ids))


# the properties


def _is_viewer_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def _echoes_token(request: FuzzRequest) -> bool:
    """The client sent the token as another parameter, which an error message may quote
    back to it (``unknown format '...'``): its own input, not a leak."""
    pairs = parse_qsl(request.query, keep_blank_values=True)
    return any(TOKEN in value for name, value in pairs if name != "token")


def check(request: FuzzRequest, response: Observed, *, tokened: bool, broken: bool) -> None:
    context = f"{request}\n-> {response.status} {response.body[:300]!r}"
    body = response.body
    assert response.status < 500 or (broken and response.status == 503), context
    assert not TRACEBACK.search(body), context
    if not _is_viewer_path(response.path):
        return  # a dot segment left the prefix: the app answered (no 5xx, checked above)

    csp = response.header("content-security-policy") or ""
    assert "default-src 'none'" in csp, context
    if "frame-ancestors 'self'" in csp and response.status >= 400:
        # an error of pyinstrument's page, shown in its place in the viewer's frame
        assert response.path.rstrip("/").endswith("/flame"), context
        assert csp.endswith("; sandbox"), context
        assert response.header("content-type") == "text/plain; charset=utf-8", context
        assert response.header("x-frame-options") == "SAMEORIGIN", context
    elif "frame-ancestors 'self'" in csp:  # pyinstrument's page, framed by the viewer's own
        assert response.status == 200, context
        assert request.method == "HEAD" or b"pyinstrumentHTMLRenderer.render(" in body, context
        assert response.header("x-frame-options") == "SAMEORIGIN", context
    else:
        assert "frame-ancestors 'none'" in csp, context
        assert response.header("x-frame-options") == "DENY", context
    assert response.header("x-content-type-options") == "nosniff", context
    assert response.header("content-type"), context

    # access first, then the method, as documented
    if tokened and not request.grants:
        assert response.status == 401, context
        assert response.header("www-authenticate") == 'Bearer realm="otelprof"', context
    elif not tokened and not request.loopback:
        assert response.status == 403, context
    elif not request.readable:
        assert response.status == 405, context
        assert response.header("allow") == "GET, HEAD", context
    elif request.valid and not broken:
        assert response.status == 200, context
    else:
        allowed = {200, 400, 404} | ({503} if broken else set())
        assert response.status in allowed, context

    if request.method.upper() == "HEAD":
        assert body == b"", context
    else:
        assert response.header("content-length") == str(len(body)), context
    if response.status >= 400 and body:
        text = body.decode("utf-8")
        assert response.header("content-type") == "text/plain; charset=utf-8", context
        assert len(text) <= 200 and text.endswith("\n"), context
        assert text[:-1].isprintable(), f"one printable line: {context}"
    if response.status == 200 and (response.header("content-type") or "").startswith("text/html"):
        script_src = csp.split("script-src", 1)[1].split(";", 1)[0] if "script-src" in csp else ""
        assert "unsafe" not in script_src and "http" not in csp, context
    if tokened and not _echoes_token(request):
        assert TOKEN.encode() not in body and _QUOTED.encode() not in body, context
        for name, value in response.headers:
            if name != "set-cookie":
                assert TOKEN not in value and _QUOTED not in value, context


# the two adapters


class _Asgi:
    """Requests through ``httpx.ASGITransport`` (one decoding of the path, as servers do)."""

    def __init__(self, portal: BlockingPortal, app: ProfilingMiddleware) -> None:
        self.portal = portal
        self.app = app
        self.transports: dict[str, httpx.ASGITransport] = {}

    def send(self, request: FuzzRequest) -> Observed:
        transport = self.transports.get(request.client)
        if transport is None:
            transport = httpx.ASGITransport(app=self.app, client=(request.client, 50000))
            self.transports[request.client] = transport
        url = "http://testserver" + request.path + ("?" + request.query if request.query else "")
        outgoing = httpx.Request(
            request.method,
            url,
            headers=[(name, value.encode("latin-1")) for name, value in request.headers],
            content=request.body,
        )

        async def roundtrip() -> httpx.Response:
            response = await transport.handle_async_request(outgoing)
            await response.aread()
            return response

        response = self.portal.call(roundtrip)
        return Observed(
            response.status_code,
            [(k.lower(), v) for k, v in response.headers.multi_items()],
            response.content,
            outgoing.url.path,
        )


class _Wsgi:
    """Requests through werkzeug's test client (``buffered=True``: bodies are closed)."""

    def __init__(self, app: Flask) -> None:
        # No cookie jar: every request carries exactly the headers the fuzzer chose.
        self.client = Client(app, use_cookies=False)

    def send(self, request: FuzzRequest) -> Observed:
        response = self.client.open(
            request.path,
            method=request.method,
            query_string=request.query,
            headers=list(request.headers),
            data=request.body,
            environ_base={"REMOTE_ADDR": request.client},
        )
        return Observed(
            response.status_code,
            [(k.lower(), v) for k, v in response.headers.items()],
            response.get_data(),
            response.request.environ["PATH_INFO"],
        )


@dataclass
class Target:
    """One adapter, with a viewer without and one with a debug token, over one store."""

    send: dict[bool, Callable[[FuzzRequest], Observed]]  # keyed by "has a token"
    profiles: list[tuple[str, str]]
    broken: bool


@pytest.fixture
def portal() -> Iterator[BlockingPortal]:
    with start_blocking_portal() as running:
        yield running


def _profiles(store: MemoryStore) -> list[tuple[str, str]]:
    profiles = [(s.trace_id, s.span_id) for s in store.list()]
    assert len(profiles) == PROFILED_REQUESTS
    return profiles


@contextmanager
def _asgi_target(portal: BlockingPortal, broken: bool) -> Iterator[Target]:
    provider, _ = make_provider()
    store = MemoryStore()
    recorder = ProfilingMiddleware(
        _starlette(),
        tracer_provider=provider,
        profile_store=store,
        sample_rate=1.0,
        min_duration_ms=0,
    )
    fuzzed: ProfileStore = FailingStore() if broken else store
    apps = {
        tokened: ProfilingMiddleware(
            _starlette(),
            tracer_provider=provider,
            profile_store=fuzzed,
            sample_rate=0.0,
            debug_route=True,
            **({"debug_token": TOKEN} if tokened else {}),
        )
        for tokened in (False, True)
    }
    try:
        feeder = _Asgi(portal, recorder)
        for n in range(PROFILED_REQUESTS):
            plain = FuzzRequest("GET", f"/work/{n}", "", (), b"", "127.0.0.1", False, False)
            assert feeder.send(plain).status == 200
        assert recorder.core.writer.flush()
        senders = {tokened: _Asgi(portal, app).send for tokened, app in apps.items()}
        yield Target(senders, _profiles(store), broken)
    finally:
        for middleware in (recorder, *apps.values()):
            middleware.core.writer.close()


@contextmanager
def _wsgi_target(broken: bool) -> Iterator[Target]:
    provider, _ = make_provider()
    store = MemoryStore()
    fuzzed: ProfileStore = FailingStore() if broken else store
    recorder_app = _flask()
    recorder = WSGIProfilingMiddleware(
        recorder_app.wsgi_app,
        tracer_provider=provider,
        profile_store=store,
        sample_rate=1.0,
        min_duration_ms=0,
    )
    recorder_app.wsgi_app = recorder  # type: ignore[method-assign]
    made = [recorder]
    senders: dict[bool, Callable[[FuzzRequest], Observed]] = {}
    for tokened in (False, True):
        app = _flask()
        middleware = WSGIProfilingMiddleware(
            app.wsgi_app,
            tracer_provider=provider,
            profile_store=fuzzed,
            sample_rate=0.0,
            debug_route=True,
            **({"debug_token": TOKEN} if tokened else {}),
        )
        app.wsgi_app = middleware  # type: ignore[method-assign]
        made.append(middleware)
        senders[tokened] = _Wsgi(app).send
    try:
        feeder = _Wsgi(recorder_app)
        for n in range(PROFILED_REQUESTS):
            plain = FuzzRequest("GET", f"/work/{n}", "", (), b"", "127.0.0.1", False, False)
            assert feeder.send(plain).status == 200
        assert recorder.core.writer.flush()
        yield Target(senders, _profiles(store), broken)
    finally:
        for middleware in made:
            middleware.core.writer.close()


def _pinned(profiles: list[tuple[str, str]]) -> list[tuple[FuzzRequest, bool]]:
    """One request per branch of the viewer, run on every fuzz run before the random ones."""
    trace_id, span_id = profiles[0]
    bearer = (("Authorization", f"Bearer {TOKEN}"),)

    def make(
        path: str, query: str = "", method: str = "GET", client: str = "127.0.0.1"
    ) -> FuzzRequest:
        return FuzzRequest(method, path, query, bearer, b"", client, True, False)

    return [
        (replace(make(f"{PREFIX}/{trace_id}", f"span_id={span_id}"), valid=True), True),
        (make(PREFIX, "format=json", client="10.1.2.3"), False),  # 403
        (replace(make(PREFIX), headers=(), grants=False), True),  # 401
        (make(PREFIX, method="DELETE"), True),  # 405
        (make(f"{PREFIX}/{'A' * 32}"), True),  # 400
        (make(f"{PREFIX}/{'f' * 32}"), False),  # 404 (503 when broken)
        (make(f"{PREFIX}/{trace_id}/..%2F..%2F..%2Fetc%2Fpasswd"), True),  # 404
        # a seed of bad values, one per parameter (400 each)
        (make(PREFIX, "limit=abc&order=newest"), True),
        (make(PREFIX, "min_duration_ms=1e309"), False),
        (make(PREFIX, urlencode({"order": "x" * 500})), True),
        (make(PREFIX, urlencode({"route": "r" * 3000})), True),
        (make(f"{PREFIX}/{trace_id}", urlencode({"format": "9" * 500})), True),
        (make(f"{PREFIX}/{trace_id}", "span_id=%ff%00"), False),
        (make(f"{PREFIX}/route", urlencode({"route": "/work/{n}", "limit": "0"})), True),
    ]


def _fuzz(target: Target, examples: int, label: str) -> Counter[int]:
    """Run the fuzzer; return how often each status was answered."""
    cases = 0
    statuses: Counter[int] = Counter()

    def case(request: FuzzRequest, tokened: bool) -> None:
        nonlocal cases
        cases += 1
        response = target.send[tokened](request)
        statuses[response.status] += 1
        check(request, response, tokened=tokened, broken=target.broken)

    for request, tokened in _pinned(target.profiles):
        case = example(request=request, tokened=tokened)(case)
    run = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )(given(request=_requests(target.profiles), tokened=st.booleans())(case))
    run()
    TALLY["fuzz cases"] += cases
    TALLY["requests sent"] += cases
    print(f"{label}: {cases} fuzz cases, statuses {dict(sorted(statuses.items()))}")
    assert cases >= examples // 2, f"only {cases} cases ran"
    return statuses


def assert_every_branch_reached(statuses: Counter[int], broken: bool) -> None:
    """The fuzzer got past each check of the viewer at least once."""
    expected = {400, 401, 403, 405} | ({503} if broken else {200, 404})
    assert expected <= set(statuses), f"statuses never answered: {expected - set(statuses)}"


STORES = pytest.mark.parametrize(
    ("broken", "examples"),
    [(False, WORKING_EXAMPLES), (True, BROKEN_EXAMPLES)],
    ids=["working-store", "broken-store"],
)


@STORES
def test_fuzz_viewer_through_asgi(portal: BlockingPortal, broken: bool, examples: int) -> None:
    with _asgi_target(portal, broken) as target:
        statuses = _fuzz(target, examples, f"ASGI, {'broken' if broken else 'working'} store")
    assert_every_branch_reached(statuses, broken)


@STORES
def test_fuzz_viewer_through_wsgi(broken: bool, examples: int) -> None:
    with _wsgi_target(broken) as target:
        statuses = _fuzz(target, examples, f"WSGI, {'broken' if broken else 'working'} store")
    assert_every_branch_reached(statuses, broken)


@pytest.mark.parametrize("limit", ["²", "9" * 5000], ids=["superscript", "5000-digits"])
@pytest.mark.parametrize("page", ["route", "diff"])
def test_baseline_limit_that_int_cannot_parse_is_400(
    portal: BlockingPortal, page: str, limit: str
) -> None:
    with _asgi_target(portal, broken=False) as target:
        trace_id, span_id = target.profiles[0]
        if page == "route":
            path, query = f"{PREFIX}/route", urlencode({"route": "/work/{n}", "limit": limit})
        else:
            path = f"{PREFIX}/{trace_id}/diff"
            query = urlencode({"span_id": span_id, "limit": limit})
        request = FuzzRequest("GET", path, query, (), b"", "127.0.0.1", True, False)
        response = target.send[False](request)
    TALLY["requests sent"] += 1
    assert response.status == 400, response.body
