"""viewer.py: routes, formats, validation, failures, access control and headers."""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Mapping, Sequence

import pytest
from pyinstrument.session import Session

from otelprof_middleware import _failsafe
from otelprof_middleware._record import ProfileRecord, ProfileSummary
from otelprof_middleware.render import inline_script_hashes
from otelprof_middleware.stores._base import ProfileStore
from otelprof_middleware.stores.memory import MemoryStore
from otelprof_middleware.viewer import TOKEN_COOKIE, Viewer, ViewerRequest, ViewerResponse

from .helpers import make_record, make_session, make_summary, profile

PREFIX = "/debug/profile"
TOKEN = "s3cret-t0ken/with+odd=chars"
T1, T2, T3 = "1" * 32, "2" * 32, "3" * 32
S1, S2, S3 = "a" * 16, "b" * 16, "c" * 16
EVIL_ROUTE = "<script>alert(1)</script>"
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def marker_viewer_work(rounds: int = 20_000) -> int:
    total = 0
    for _ in range(rounds):
        total += sum(range(50))
    return total


@pytest.fixture(scope="module")
def session() -> Session:
    session = profile(marker_viewer_work)
    assert session.frame_records
    return session


@pytest.fixture(scope="module")
def empty_session() -> Session:
    session = profile(lambda: None, interval=0.5)
    assert not session.frame_records
    return session


@pytest.fixture
def store(session: Session) -> MemoryStore:
    """T1: fast, oldest, kept for an unknown reason (older version); T2: slowest, other
    route, kept as an error; T3: newest, two spans."""
    store = MemoryStore()
    store.put(
        ProfileRecord.from_session(make_summary(trace_id=T1, span_id=S1, duration_ms=5.0), session)
    )
    store.put(
        ProfileRecord.from_session(
            make_summary(
                trace_id=T2,
                span_id=S1,
                route="/slow",
                method="POST",
                status_code=500,
                duration_ms=900.0,
                start_time=1_700_000_100.0,
                kept_reason="error",
            ),
            session,
        )
    )
    store.put(
        ProfileRecord.from_session(
            make_summary(trace_id=T3, span_id=S1, duration_ms=50.0, start_time=1_700_000_200.0),
            session,
        )
    )
    store.put(
        ProfileRecord.from_session(
            make_summary(trace_id=T3, span_id=S2, duration_ms=60.0, start_time=1_700_000_201.0),
            session,
        )
    )
    return store


class FailingStore:
    """A store whose every method raises."""

    url = "failing://"

    def put(self, record: ProfileRecord) -> None:
        raise RuntimeError("boom: disk on fire")

    def put_many(self, records: Sequence[ProfileRecord]) -> None:
        raise RuntimeError("boom: disk on fire")

    def get(self, trace_id: str, span_id: str | None = None) -> Sequence[ProfileRecord]:
        raise RuntimeError("boom: disk on fire")

    def list(
        self,
        *,
        limit: int = 100,
        route: str | None = None,
        min_duration_ms: float | None = None,
        since: float | None = None,
        until: float | None = None,
        order: str = "newest",
    ) -> Sequence[ProfileSummary]:
        raise RuntimeError("boom: disk on fire")

    def delete(self, trace_id: str, span_id: str | None = None) -> int:
        raise RuntimeError("boom: disk on fire")

    def stats(self) -> tuple[int, int]:
        raise RuntimeError("boom: disk on fire")

    def close(self) -> None:
        pass


class GarbageStore(FailingStore):
    """A store that answers with things that are not summaries."""

    def list(
        self,
        *,
        limit: int = 100,
        route: str | None = None,
        min_duration_ms: float | None = None,
        since: float | None = None,
        until: float | None = None,
        order: str = "newest",
    ) -> Sequence[ProfileSummary]:
        return [object()]  # type: ignore[list-item]


def call(
    viewer: Viewer,
    path: str = PREFIX,
    query: str = "",
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    client: str | None = "127.0.0.1",
    scheme: str = "http",
    host: str | None = "testserver:8000",
) -> ViewerResponse:
    return viewer.handle(
        ViewerRequest(
            method=method,
            path=path,
            query_string=query.encode("latin-1"),
            headers=dict(headers or {}),
            client_host=client,
            scheme=scheme,
            host=host,
        )
    )


def header(response: ViewerResponse, name: str) -> str | None:
    values = [v for k, v in response.headers if k.lower() == name]
    assert len(values) <= 1, f"{name} given {len(values)} times"
    return values[0] if values else None


def text(response: ViewerResponse) -> str:
    return response.body.decode("utf-8")


def assert_security_headers(response: ViewerResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert header(response, name) == value, name
    csp = header(response, "content-security-policy")
    assert csp is not None and "default-src 'none'" in csp
    # Only pyinstrument's page (or its error, sandboxed, shown in its place) may be framed,
    # and only by our own pages (the profile frame).
    if "frame-ancestors 'self'" in csp:
        assert header(response, "x-frame-options") == "SAMEORIGIN"
        is_error = response.status >= 400 and csp.endswith("; sandbox")
        assert is_error or "pyinstrumentHTMLRenderer.render(" in text(response)
    else:
        assert "frame-ancestors 'none'" in csp and header(response, "x-frame-options") == "DENY"
    content_type = header(response, "content-type")
    assert content_type is not None and "charset=utf-8" in content_type
    assert header(response, "content-length") == str(len(response.body))


def assert_plain_error(response: ViewerResponse, status: int) -> str:
    assert response.status == status
    assert header(response, "content-type") == "text/plain; charset=utf-8"
    assert_security_headers(response)
    body = text(response)
    assert "Traceback" not in body and "boom" not in body
    return body


# routing


def test_handles_only_its_prefix(store: MemoryStore) -> None:
    viewer = Viewer(store)
    assert viewer.handles(PREFIX)
    assert viewer.handles(PREFIX + "/")
    assert viewer.handles(f"{PREFIX}/{T1}")
    assert not viewer.handles("/debug/profiles")
    assert not viewer.handles("/debug")
    assert not viewer.handles("/")


def test_custom_prefix(store: MemoryStore) -> None:
    viewer = Viewer(store, prefix="/_prof/")
    assert viewer.prefix == "/_prof"
    assert viewer.handles("/_prof") and not viewer.handles(PREFIX)
    response = call(viewer, "/_prof", "format=json")
    assert response.status == 200
    assert json.loads(response.body)["profiles"][0]["url"].startswith(
        "http://testserver:8000/_prof/"
    )


def test_invalid_construction(store: MemoryStore) -> None:
    with pytest.raises(ValueError, match="token"):
        Viewer(store, token="")
    with pytest.raises(ValueError, match="prefix"):
        Viewer(store, prefix="debug")


def test_path_outside_prefix_is_404(store: MemoryStore) -> None:
    assert_plain_error(call(Viewer(store), "/elsewhere"), 404)


def test_nested_path_is_404(store: MemoryStore) -> None:
    assert_plain_error(call(Viewer(store), f"{PREFIX}/{T1}/extra"), 404)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
def test_other_methods_are_405(store: MemoryStore, method: str) -> None:
    response = call(Viewer(store), f"{PREFIX}/{T1}", method=method)
    assert_plain_error(response, 405)
    assert header(response, "allow") == "GET, HEAD"


@pytest.mark.parametrize("path", [PREFIX, f"{PREFIX}/{T1}", f"{PREFIX}/{'f' * 32}", "/x"])
def test_head_is_get_without_body(store: MemoryStore, path: str) -> None:
    viewer = Viewer(store)
    got = call(viewer, path)
    head = call(viewer, path, method="HEAD")
    assert head.status == got.status
    assert head.body == b""
    assert header(head, "content-length") == str(len(got.body))
    assert header(head, "content-type") == header(got, "content-type")
    assert header(head, "x-content-type-options") == "nosniff"


# index


def test_index_html_newest_first(store: MemoryStore) -> None:
    response = call(Viewer(store), PREFIX)
    assert response.status == 200
    assert header(response, "content-type") == "text/html; charset=utf-8"
    assert_security_headers(response)
    assert header(response, "content-security-policy") == (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    body = text(response)
    assert "<title>Recent profiles · otelprof</title>" in body
    positions = [body.index(f">{t}</a>") for t in (T3, T2, T1)]
    assert positions == sorted(positions)
    assert f'href="{PREFIX}/{T1}?span_id={S1}"' in body
    assert f'href="{PREFIX}/{T3}?span_id={S2}"' in body
    assert "2023-11-14T22:13:20.000Z" in body, "UTC ISO time of T1"
    assert "/slow" in body and "POST" in body and "900.0" in body and ">500<" in body


def test_index_with_trailing_slash(store: MemoryStore) -> None:
    response = call(Viewer(store), PREFIX + "/")
    assert response.status == 200 and T1 in text(response)


def test_index_json_shape_and_order(store: MemoryStore) -> None:
    response = call(Viewer(store), PREFIX, "format=json")
    assert response.status == 200
    assert header(response, "content-type") == "application/json; charset=utf-8"
    assert_security_headers(response)
    rows = json.loads(response.body)["profiles"]
    assert [(r["trace_id"], r["span_id"]) for r in rows] == [(T3, S2), (T3, S1), (T2, S1), (T1, S1)]
    assert set(rows[0]) == {
        "trace_id",
        "span_id",
        "method",
        "route",
        "status_code",
        "duration_ms",
        "start_time",
        "sample_count",
        "mode",
        "interval_ms",
        "kept_reason",
        "service",
        "url",
    }
    slow = rows[2]
    assert slow == {
        "trace_id": T2,
        "span_id": S1,
        "method": "POST",
        "route": "/slow",
        "status_code": 500,
        "duration_ms": 900.0,
        "start_time": 1_700_000_100.0,
        "sample_count": 0,
        "mode": "hook",
        "interval_ms": 1.0,
        "kept_reason": "error",
        "service": "",
        "url": f"http://testserver:8000{PREFIX}/{T2}?span_id={S1}",
    }
    assert rows[3]["kept_reason"] == "", "T1: stored without a reason"


def _kept_cells(body: str) -> list[str]:
    return re.findall(r'<td class="kept[^"]*"[^>]*>(.*?)</td>', body)


def test_index_html_shows_why_each_profile_was_kept(session: Session) -> None:
    store = MemoryStore()
    reasons = ["slow", "error", "triggered", "min_duration", ""]
    for n, reason in enumerate(reasons):
        store.put(
            ProfileRecord.from_session(
                make_summary(n, span_id=S1, kept_reason=reason),
                session,
            )
        )
    body = text(call(Viewer(store), PREFIX))
    body = body[body.index("<h2>Profiles</h2>") :]  # the table of profiles, after the routes
    headers = re.findall(r"<th>(.*?)</th>", body)
    assert headers[headers.index("Duration (ms)") + 1] == "Kept"
    # Newest first; the last was stored by an older version: a muted dash, explained.
    assert _kept_cells(body) == ["—", "min_duration", "triggered", "error", "slow"]
    assert '<td class="kept">slow</td>' in body
    assert 'class="kept muted" title="not recorded (stored by an older version)">—<' in body
    for row in re.findall(r"<tr>.*?</tr>", body)[1:]:  # one cell per header in every row
        assert row.count("<td") == len(headers)

    rows = json.loads(call(Viewer(store), PREFIX, "format=json").body)["profiles"]
    assert [r["kept_reason"] for r in rows] == reasons[::-1]
    assert [(r["mode"], r["interval_ms"]) for r in rows] == [("hook", 1.0)] * 5


def test_index_json_carries_mode_interval_and_kept_reason(session: Session) -> None:
    store = MemoryStore()
    store.put(
        ProfileRecord.from_session(
            make_summary(
                trace_id=T1,
                span_id=S1,
                route="/r",
                duration_ms=3.0,
                sample_count=42,
                mode="always_on",
                interval_ms=5.0,
                kept_reason="triggered",
            ),
            session,
        )
    )
    [row] = json.loads(call(Viewer(store), PREFIX, "format=json").body)["profiles"]
    assert (row["sample_count"], row["mode"], row["interval_ms"], row["kept_reason"]) == (
        42,
        "always_on",
        5.0,
        "triggered",
    )


def test_trace_page_shows_why_each_profile_was_kept(session: Session) -> None:
    store = MemoryStore()
    store.put(
        ProfileRecord.from_session(
            make_summary(trace_id=T3, span_id=S1, kept_reason="slow"), session
        )
    )
    store.put(
        ProfileRecord.from_session(
            make_summary(trace_id=T3, span_id=S2, start_time=1_700_000_001.0, kept_reason="error"),
            session,
        )
    )
    viewer = Viewer(store)
    body = text(call(viewer, f"{PREFIX}/{T3}"))
    assert "<th>Kept</th>" in body
    assert _kept_cells(body) == ["slow", "error"], "in start order"
    rows = json.loads(call(viewer, f"{PREFIX}/{T3}", "format=json").body)["profiles"]
    assert [r["kept_reason"] for r in rows] == ["error", "slow"]


def test_index_json_urls_use_public_url(store: MemoryStore) -> None:
    viewer = Viewer(store, public_url="https://api.example.com/")
    rows = json.loads(call(viewer, PREFIX, "format=json").body)["profiles"]
    assert rows[-1]["url"] == f"https://api.example.com{PREFIX}/{T1}?span_id={S1}"


def test_index_json_urls_use_request_scheme_and_host_header(store: MemoryStore) -> None:
    response = call(
        Viewer(store),
        PREFIX,
        "format=json",
        scheme="https",
        host=None,
        headers={"host": "Example.org"},
    )
    assert json.loads(response.body)["profiles"][-1]["url"] == (
        f"https://example.org{PREFIX}/{T1}?span_id={S1}"
    )


@pytest.mark.parametrize("host", [None, "evil.com/path", "a b", "x\r\nSet-Cookie: y"])
def test_index_json_urls_are_relative_without_a_sane_host(
    store: MemoryStore, host: str | None
) -> None:
    response = call(Viewer(store), PREFIX, "format=json", host=host)
    assert json.loads(response.body)["profiles"][-1]["url"] == f"{PREFIX}/{T1}?span_id={S1}"


def test_index_order_slowest(store: MemoryStore) -> None:
    rows = json.loads(call(Viewer(store), PREFIX, "format=json&order=slowest").body)["profiles"]
    assert [r["duration_ms"] for r in rows] == [900.0, 60.0, 50.0, 5.0]


def test_index_filters(store: MemoryStore) -> None:
    viewer = Viewer(store)

    def ids(query: str) -> list[tuple[str, str]]:
        response = call(viewer, PREFIX, "format=json&" + query)
        assert response.status == 200, text(response)
        return [(r["trace_id"], r["span_id"]) for r in json.loads(response.body)["profiles"]]

    assert ids("route=/slow") == [(T2, S1)]
    assert ids("route=%2Fitems%2F%7Bitem_id%7D") == [(T3, S2), (T3, S1), (T1, S1)]
    assert ids("min_duration_ms=50") == [(T3, S2), (T3, S1), (T2, S1)]
    assert ids("min_duration_ms=55.5&order=slowest") == [(T2, S1), (T3, S2)]
    assert ids("limit=2") == [(T3, S2), (T3, S1)]
    assert ids("limit=1&order=slowest") == [(T2, S1)]
    assert ids("route=&min_duration_ms=&order=&limit=") == ids(""), "empty form fields"
    assert ids("route=/nope") == []
    assert ids("unknown=1") == ids("")


def test_index_route_table_reads_the_newest_1000_whatever_the_order() -> None:
    # 1100 stored: the oldest 100 took 500 ms, the newest 1000 took 1 ms. The route table
    # reads 1000 (MAX_LIMIT); it must be the same 1000 for every order and limit, and say
    # that it is not the whole store.
    store = MemoryStore(max_profiles=2000)
    for n in range(1100):
        store.put(make_record(n, route="/r", duration_ms=500.0 if n < 100 else 1.0))
    viewer = Viewer(store)

    def route_table(query: str) -> tuple[str, list[str]]:
        body = text(call(viewer, PREFIX, query))
        table = body[body.index("<h2>Routes</h2>") : body.index("<h2>Profiles</h2>")]
        label = re.findall(r"Durations of [^,]*", table)[0]
        return label, re.findall(r'<td class="num">([^<]*)</td>', table)

    label, cells = route_table("")
    assert label.startswith("Durations of the newest 1000 stored profiles (the most"), label
    assert cells == ["1000", "1.0", "1.0", "1.0"], cells  # count, median, p95, slowest
    for query in ("order=slowest", "limit=1000", "limit=1000&order=slowest", "limit=7"):
        assert route_table(query) == (label, cells), query


def test_index_route_table_counts_what_it_read(store: MemoryStore) -> None:
    body = text(call(Viewer(store), PREFIX, "route=/slow"))
    assert "Durations of 1 stored profile, per route" in body


def test_index_shows_an_unmatched_request_without_a_route_link() -> None:
    # A request no route matched is stored with route "": its cells were an empty <a>
    # (invisible) whose href, route=, is no filter at all (every profile).
    store = MemoryStore()
    store.put(make_record(0, route="", status_code=404))
    store.put(make_record(1))
    body = text(call(Viewer(store), PREFIX))
    assert 'route="' not in body and "route=&" not in body
    assert "></a>" not in body
    rows = re.findall(r"<tr>.*?</tr>", body, re.S)
    unmatched = [row for row in rows if "(no route matched)" in row]
    assert len(unmatched) == 2, unmatched  # the routes table and the profile's row
    assert all("route=" not in row for row in unmatched)


def test_index_route_table_says_how_many_routes_it_leaves_out() -> None:
    # 32 routes; the table draws the 30 with the most profiles and says so, or an on-call
    # engineer looking for a route with fewer profiles could think it has none.
    store = MemoryStore()
    n = 0
    for r in range(32):
        for _ in range(2 if r < 30 else 1):
            store.put(make_record(n, route=f"/r{r}"))
            n += 1
    body = text(call(Viewer(store), PREFIX))
    routes = body[body.index("<h2>Routes</h2>") : body.index("<h2>Profiles</h2>")]
    assert routes.count('<svg class="histogram"') == 30
    assert "and 2 more routes with fewer profiles, not shown: filter by route" in routes
    assert "more route" not in text(call(Viewer(store), PREFIX, "route=/r31"))


def test_index_html_keeps_filters_in_form_and_links(store: MemoryStore) -> None:
    body = text(call(Viewer(store), PREFIX, "route=/slow&order=slowest&limit=7"))
    assert 'name="route" value="/slow"' in body
    assert '<option value="slowest" selected>' in body
    assert 'name="limit" value="7"' in body
    assert f'href="{PREFIX}?route=%2Fslow&amp;order=slowest&amp;limit=7&amp;format=json"' in body
    assert T2 in body and T1 not in body


def test_index_empty_explains_how_profiles_appear() -> None:
    body = text(call(Viewer(MemoryStore()), PREFIX))
    assert "No profiles yet" in body
    assert "OTELPROF_SAMPLE_RATE" in body and "trigger header" in body
    assert "<table>" not in body
    assert json.loads(call(Viewer(MemoryStore()), PREFIX, "format=json").body) == {"profiles": []}


def test_index_empty_with_filters_says_so(store: MemoryStore) -> None:
    body = text(call(Viewer(store), PREFIX, "route=/nope"))
    assert "No profiles match these filters." in body
    assert "No profiles yet" not in body


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("format=xml", "unknown format 'xml'"),
        ("format=text", "unknown format 'text'"),
        ("limit=abc", "limit must be an integer from 1 to 1000"),
        ("limit=0", "limit must be an integer"),
        ("limit=1001", "limit must be an integer"),
        ("limit=-5", "limit must be an integer"),
        ("limit=1.5", "limit must be an integer"),
        ("min_duration_ms=abc", "min_duration_ms must be a number >= 0"),
        ("min_duration_ms=-1", "min_duration_ms must be a number >= 0"),
        ("min_duration_ms=nan", "min_duration_ms must be a number >= 0"),
        ("min_duration_ms=inf", "min_duration_ms must be a number >= 0"),
        ("order=oldest", "order must be newest or slowest"),
        ("limit=5&limit=6", "'limit' given more than once"),
        ("route=" + "x" * 3000, "route is too long"),
        ("&".join(f"p{i}=1" for i in range(60)), "too many query parameters"),
    ],
)
def test_index_bad_query_is_400(store: MemoryStore, query: str, message: str) -> None:
    body = assert_plain_error(call(Viewer(store), PREFIX, query), 400)
    assert message in body


def test_index_escapes_everything(session: Session) -> None:
    store = MemoryStore()
    store.put(
        ProfileRecord.from_session(
            make_summary(
                trace_id=T1,
                span_id=S1,
                route=EVIL_ROUTE,
                method='"><img src=x onerror=alert(2)>',
                kept_reason="<b onmouseover=alert(3)>slow</b>",
            ),
            session,
        )
    )
    viewer = Viewer(store)
    body = text(call(viewer, PREFIX))
    assert "<script>alert(1)" not in body
    assert "<img" not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in body
    assert "<b " not in body
    assert '<td class="kept">&lt;b onmouseover=alert(3)&gt;slow&lt;/b&gt;</td>' in body
    assert "<script" not in body, "the index runs no script at all"
    filtered = text(call(viewer, PREFIX, "route=%3Cscript%3Ealert(1)%3C%2Fscript%3E"))
    assert 'value="&lt;script&gt;alert(1)&lt;/script&gt;"' in filtered
    assert "<script" not in filtered
    data = json.loads(call(viewer, PREFIX, "format=json").body)
    assert data["profiles"][0]["route"] == EVIL_ROUTE
    assert data["profiles"][0]["kept_reason"] == "<b onmouseover=alert(3)>slow</b>"


# one profile


def test_profile_html_is_a_frame_around_pyinstrument(session: Session) -> None:
    store = MemoryStore()
    store.put(
        ProfileRecord.from_session(
            make_summary(
                trace_id=T1,
                span_id=S1,
                status_code=503,
                duration_ms=312.4,
                sample_count=42,
                mode="always_on",
                interval_ms=5.0,
                kept_reason="error",
                service="shop-api",
            ),
            session,
        )
    )
    response = call(Viewer(store), f"{PREFIX}/{T1}", f"span_id={S1}")
    assert response.status == 200
    assert header(response, "content-type") == "text/html; charset=utf-8"
    assert_security_headers(response)
    body = text(response)
    assert "<title>GET /items/{item_id} 312 ms · otelprof</title>" in body
    for fact in (T1, S1, "shop-api", "GET", "/items/{item_id}", "503", "312.4 ms"):
        assert fact in body, fact
    assert "2023-11-14T22:13:20.000Z" in body and "always-on sampler, every 5 ms" in body
    assert "error (it failed)" in body
    flame = f"{PREFIX}/{T1}/flame?span_id={S1}"
    links = re.findall(r'href="([^"]+)"', body)
    assert f"{PREFIX}/{T1}/diff?span_id={S1}" in links  # this request vs its route
    assert f"{PREFIX}/route?route=%2Fitems%2F%7Bitem_id%7D" in links  # the route baseline
    assert f"{PREFIX}/{T1}" in links  # the trace page
    assert PREFIX in links  # the index
    for fmt in ("text", "speedscope", "json", "folded"):
        assert f"{PREFIX}/{T1}?span_id={S1}&amp;format={fmt}" in links, fmt
    assert f'<iframe src="{flame}"' in body
    assert "<script" not in body and "pyinstrumentHTMLRenderer" not in body
    assert header(response, "content-security-policy") == (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    # Every link of the frame answers (the viewer itself, no browser).
    viewer = Viewer(store)
    for link in links:
        path, _, query = link.replace("&amp;", "&").partition("?")
        assert call(viewer, path, query).status == 200, link
    assert call(viewer, f"{PREFIX}/{T1}/flame", f"span_id={S1}").status == 200
    # ?format=html is this page (framed by nobody), not pyinstrument's (docs/quickstart.md).
    as_html = call(viewer, f"{PREFIX}/{T1}", f"span_id={S1}&format=html")
    assert as_html.body == response.body and header(as_html, "x-frame-options") == "DENY"


def test_profile_frame_of_an_unmatched_request_has_no_route_links(session: Session) -> None:
    store = MemoryStore()
    store.put(ProfileRecord.from_session(make_summary(trace_id=T1, span_id=S1, route=""), session))
    body = text(call(Viewer(store), f"{PREFIX}/{T1}", f"span_id={S1}"))
    assert "<title>GET (no route matched) 10 ms · otelprof</title>" in body
    assert "/diff?" not in body and "/route?" not in body
    assert "not recorded" in body, "kept reason of an older version"


def test_flame_page_is_pyinstrument(store: MemoryStore) -> None:
    response = call(Viewer(store), f"{PREFIX}/{T1}/flame", f"span_id={S1}")
    assert response.status == 200
    assert header(response, "content-type") == "text/html; charset=utf-8"
    assert_security_headers(response)
    body = text(response)
    assert "pyinstrumentHTMLRenderer.render(" in body and "marker_viewer_work" in body
    assert "fonts.googleapis" not in body
    csp = header(response, "content-security-policy")
    assert csp is not None
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == " ".join(inline_script_hashes(body))
    assert "unsafe" not in directives["script-src"] and "http" not in csp
    assert directives["style-src"] == "'unsafe-inline'"
    assert directives["img-src"] == "data:"
    assert directives["base-uri"] == "'none'" and directives["frame-ancestors"] == "'self'"
    # One profile without span_id: the same page; the format must be html.
    assert text(call(Viewer(store), f"{PREFIX}/{T1}/flame")) == body
    assert_plain_error(call(Viewer(store), f"{PREFIX}/{T1}/flame", "format=text"), 400)
    # Several: pick one.
    assert_plain_error(call(Viewer(store), f"{PREFIX}/{T3}/flame"), 400)
    assert_plain_error(call(Viewer(store), f"{PREFIX}/{T3}/flame", "span_id=zz"), 400)
    assert_plain_error(call(Viewer(store), f"{PREFIX}/{T3}/flame", f"span_id={S3}"), 404)


def test_profile_text(store: MemoryStore) -> None:
    response = call(Viewer(store), f"{PREFIX}/{T1}", "format=text")
    assert response.status == 200
    assert header(response, "content-type") == "text/plain; charset=utf-8"
    assert_security_headers(response)
    assert "marker_viewer_work" in text(response)


def test_profile_json(store: MemoryStore) -> None:
    response = call(Viewer(store), f"{PREFIX}/{T1}", "format=json")
    assert response.status == 200
    assert header(response, "content-type") == "application/json; charset=utf-8"
    data = json.loads(response.body)
    assert "marker_viewer_work" in json.dumps(data["root_frame"])


def test_profile_speedscope_is_a_download(store: MemoryStore) -> None:
    response = call(Viewer(store), f"{PREFIX}/{T1}", "format=speedscope")
    assert response.status == 200
    assert header(response, "content-type") == "application/json; charset=utf-8"
    assert header(response, "content-disposition") == (
        f'attachment; filename="{T1}-{S1}.speedscope.json"'
    )
    assert_security_headers(response)
    assert json.loads(response.body)["exporter"] == "pyinstrument"


def test_profile_folded(store: MemoryStore) -> None:
    response = call(Viewer(store), f"{PREFIX}/{T1}", "format=folded")
    assert response.status == 200
    assert header(response, "content-type") == "text/plain; charset=utf-8"
    lines = text(response).splitlines()
    assert any("marker_viewer_work (" in line for line in lines)
    assert all(re.fullmatch(r".+ [0-9]+", line) for line in lines)


def test_profile_with_trailing_slash(store: MemoryStore) -> None:
    assert call(Viewer(store), f"{PREFIX}/{T1}/", "format=text").status == 200


def test_profile_span_id_picks_one(store: MemoryStore) -> None:
    viewer = Viewer(store)
    response = call(viewer, f"{PREFIX}/{T3}", f"span_id={S2}&format=speedscope")
    assert response.status == 200
    assert f'"{T3}-{S2}.speedscope.json"' in (header(response, "content-disposition") or "")
    assert call(viewer, f"{PREFIX}/{T3}", f"span_id={S1}&format=text").status == 200


def test_profile_several_spans_lists_them(store: MemoryStore) -> None:
    viewer = Viewer(store)
    response = call(viewer, f"{PREFIX}/{T3}")
    assert response.status == 200
    assert header(response, "content-type") == "text/html; charset=utf-8"
    assert_security_headers(response)
    body = text(response)
    assert f'href="{PREFIX}/{T3}?span_id={S1}"' in body
    assert f'href="{PREFIX}/{T3}?span_id={S2}"' in body
    assert body.index(S1) < body.index(S2), "in start order"
    assert "pyinstrumentHTMLRenderer" not in body

    as_text = text(call(viewer, f"{PREFIX}/{T3}", "format=text"))
    assert f'href="{PREFIX}/{T3}?span_id={S1}&amp;format=text"' in as_text

    rows = json.loads(call(viewer, f"{PREFIX}/{T3}", "format=json").body)["profiles"]
    assert [(r["trace_id"], r["span_id"]) for r in rows] == [(T3, S2), (T3, S1)]
    assert rows[0]["url"] == f"http://testserver:8000{PREFIX}/{T3}?span_id={S2}"


def test_profile_of_empty_session_renders(empty_session: Session) -> None:
    store = MemoryStore()
    store.put(
        ProfileRecord.from_session(
            make_summary(trace_id=T1, span_id=S1, duration_ms=0.1), empty_session
        )
    )
    viewer = Viewer(store)
    body = text(call(viewer, f"{PREFIX}/{T1}", "format=text"))
    assert "No samples were taken: the request took" in body
    assert "shorter than the sampling interval (500.000 ms)" in body
    for fmt in ("html", "speedscope", "json", "folded"):
        assert call(viewer, f"{PREFIX}/{T1}", f"format={fmt}").status == 200, fmt


@pytest.mark.parametrize(
    "trace_id", ["abc", "1" * 31, "1" * 33, "A" * 32, "0" * 32, "g" * 32, "1" * 30 + "%2F"]
)
def test_malformed_trace_id_is_400(store: MemoryStore, trace_id: str) -> None:
    body = assert_plain_error(call(Viewer(store), f"{PREFIX}/{trace_id}"), 400)
    assert "malformed trace id" in body


@pytest.mark.parametrize("span_id", ["abc", "A" * 16, "0" * 16, "a" * 17, "z" * 16])
def test_malformed_span_id_is_400(store: MemoryStore, span_id: str) -> None:
    body = assert_plain_error(call(Viewer(store), f"{PREFIX}/{T1}", f"span_id={span_id}"), 400)
    assert "malformed span id" in body


@pytest.mark.parametrize("query", ["format=svg", "format=HTML", "format=html&format=json"])
def test_profile_bad_query_is_400(store: MemoryStore, query: str) -> None:
    assert_plain_error(call(Viewer(store), f"{PREFIX}/{T1}", query), 400)


def test_unknown_trace_is_404(store: MemoryStore) -> None:
    body = assert_plain_error(call(Viewer(store), f"{PREFIX}/{'f' * 32}"), 404)
    assert "no profile for this trace" in body


def test_unknown_span_is_404(store: MemoryStore) -> None:
    body = assert_plain_error(call(Viewer(store), f"{PREFIX}/{T1}", f"span_id={S3}"), 404)
    assert "no profile for this trace and span" in body


# failures: never a 500, never a stack trace


@pytest.mark.parametrize(
    ("path", "query"),
    [
        (PREFIX, ""),
        (PREFIX, "format=json"),
        (f"{PREFIX}/{T1}", ""),
        (f"{PREFIX}/{T1}", "format=json"),
    ],
)
def test_failing_store_is_503(path: str, query: str) -> None:
    body = assert_plain_error(call(Viewer(FailingStore()), path, query), 503)
    assert body == "profile store unavailable.\n"
    assert _failsafe.snapshot()["failed.viewer.store"] == 1


def test_corrupt_payload_is_422() -> None:
    store = MemoryStore()
    store.put(make_record(trace_id=T1, span_id=S1, payload=b"not zlib at all"))
    # The frame and the trace page read the summary only; the flame graph decodes.
    assert call(Viewer(store), f"{PREFIX}/{T1}", f"span_id={S1}").status == 200
    assert call(Viewer(store), f"{PREFIX}/{T1}").status == 200
    body = assert_plain_error(call(Viewer(store), f"{PREFIX}/{T1}/flame"), 422)
    assert "corrupt" in body
    assert _failsafe.snapshot()["failed.viewer.decode"] == 1


def test_payload_missing_fields_is_422() -> None:
    store = MemoryStore()
    payload = zlib.compress(json.dumps({"frame_records": []}).encode())
    store.put(make_record(trace_id=T1, span_id=S1, payload=payload))
    assert_plain_error(call(Viewer(store), f"{PREFIX}/{T1}", "format=text"), 422)


def test_unrenderable_session_is_422(session: Session) -> None:
    data = session.to_json()
    data["frame_records"] = [[[12345], "not a time"]]
    store = MemoryStore()
    store.put(
        make_record(trace_id=T1, span_id=S1, payload=zlib.compress(json.dumps(data).encode()))
    )
    body = assert_plain_error(call(Viewer(store), f"{PREFIX}/{T1}", "format=text"), 422)
    assert "could not be rendered as text" in body
    assert _failsafe.snapshot()["failed.viewer.render"] == 1


def test_unexpected_error_is_503_not_500() -> None:
    response = call(Viewer(GarbageStore()), PREFIX)
    body = assert_plain_error(response, 503)
    assert "AttributeError" not in body
    assert _failsafe.snapshot()["failed.viewer"] == 1


def test_a_store_opener_is_called_at_the_first_page_and_its_store_kept(
    store: MemoryStore,
) -> None:
    calls: list[int] = []

    def open_store() -> ProfileStore:
        calls.append(1)
        return store

    viewer = Viewer(open_store)
    assert calls == []  # building the viewer opens nothing
    assert call(viewer, PREFIX).status == 200
    assert call(viewer, f"{PREFIX}/{T1}", "format=json").status == 200
    assert calls == [1]


def test_a_failing_store_opener_is_503_and_tried_again() -> None:
    stores: list[ProfileStore] = []

    def open_store() -> ProfileStore:
        if not stores:
            raise RuntimeError("boom: store not reachable")
        return stores[0]

    viewer = Viewer(open_store)
    body = assert_plain_error(call(viewer, PREFIX), 503)
    assert body == "profile store unavailable.\n"
    assert _failsafe.snapshot()["failed.viewer.store"] == 1
    stores.append(MemoryStore())
    assert call(viewer, PREFIX).status == 200


def test_store_protocol_fakes_are_stores() -> None:
    for fake in (FailingStore(), GarbageStore(), MemoryStore()):
        assert isinstance(fake, ProfileStore)


# access without a token: loopback only


@pytest.mark.parametrize("client", ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"])
def test_loopback_clients_get_through(store: MemoryStore, client: str) -> None:
    assert call(Viewer(store), PREFIX, client=client).status == 200


@pytest.mark.parametrize(
    "client",
    [
        "10.1.2.3",
        "192.168.1.10",
        "8.8.8.8",
        "::ffff:10.1.2.3",
        "2001:db8::1",
        "0.0.0.0",
        "localhost",
        "testclient",
        "",
        None,
    ],
)
def test_other_clients_are_refused(store: MemoryStore, client: str | None) -> None:
    viewer = Viewer(store)
    for path in (PREFIX, f"{PREFIX}/{T1}", f"{PREFIX}/not-an-id"):
        response = call(viewer, path, client=client)
        body = assert_plain_error(response, 403)
        assert "loopback" in body
        assert T1 not in body


def test_forwarded_for_is_not_trusted(store: MemoryStore) -> None:
    response = call(
        Viewer(store),
        PREFIX,
        client="10.1.2.3",
        headers={
            "x-forwarded-for": "127.0.0.1",
            "x-real-ip": "127.0.0.1",
            "forwarded": "for=127.0.0.1",
        },
    )
    assert response.status == 403


# access with a token


def test_token_required_even_from_loopback(store: MemoryStore) -> None:
    response = call(Viewer(store, token=TOKEN), PREFIX, client="127.0.0.1")
    assert_plain_error(response, 401)
    assert header(response, "www-authenticate") == 'Bearer realm="otelprof"'


def test_token_in_bearer_header(store: MemoryStore) -> None:
    viewer = Viewer(store, token=TOKEN)
    response = call(viewer, PREFIX, client="10.1.2.3", headers={"authorization": f"Bearer {TOKEN}"})
    assert response.status == 200
    assert header(response, "set-cookie") is None
    lowercase_scheme = call(
        viewer, PREFIX, client=None, headers={"authorization": f"bearer {TOKEN}"}
    )
    assert lowercase_scheme.status == 200


def test_token_in_query_sets_cookie(store: MemoryStore) -> None:
    viewer = Viewer(store, token=TOKEN)
    quoted = "s3cret-t0ken%2Fwith%2Bodd%3Dchars"
    response = call(viewer, PREFIX, f"token={quoted}", client="10.1.2.3")
    assert response.status == 200
    cookie = header(response, "set-cookie")
    assert cookie is not None
    parts = [p.strip() for p in cookie.split(";")]
    assert parts[0] == f"{TOKEN_COOKIE}={quoted}"
    assert set(parts[1:]) == {f"Path={PREFIX}", "HttpOnly", "SameSite=Lax"}
    assert TOKEN not in text(response)

    # the cookie alone then opens every page, as a browser following links would send it
    for path, query in [(PREFIX, ""), (f"{PREFIX}/{T1}", ""), (f"{PREFIX}/{T3}", "")]:
        followed = call(
            viewer, path, query, client="10.1.2.3", headers={"cookie": f"a=b; {parts[0]}"}
        )
        assert followed.status == 200, path
        assert header(followed, "set-cookie") is None


def test_query_token_cookie_is_secure_over_https(store: MemoryStore) -> None:
    response = call(
        Viewer(store, token=TOKEN), PREFIX, f"token={TOKEN}".replace("+", "%2B"), scheme="https"
    )
    assert response.status == 200
    assert "Secure" in (header(response, "set-cookie") or "")


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ("", {}),
        ("token=wrong", {}),
        ("token=", {}),
        ("", {"authorization": "Bearer wrong"}),
        ("", {"authorization": f"Basic {TOKEN}"}),
        ("", {"authorization": f"Bearer {TOKEN}x"}),
        ("", {"cookie": f"{TOKEN_COOKIE}=wrong"}),
        ("", {"cookie": f"other={TOKEN}"}),
        ("token=a&token=b", {}),
    ],
)
def test_wrong_or_missing_token_is_401(
    store: MemoryStore, query: str, headers: dict[str, str]
) -> None:
    viewer = Viewer(store, token=TOKEN)
    response = call(viewer, PREFIX, query, client="127.0.0.1", headers=headers)
    assert_plain_error(response, 401)
    assert header(response, "www-authenticate") == 'Bearer realm="otelprof"'
    assert header(response, "set-cookie") is None
    assert _failsafe.snapshot()["viewer.refused"] == 1


def test_token_never_appears_in_any_body(store: MemoryStore, session: Session) -> None:
    store.put(
        ProfileRecord.from_session(
            make_summary(trace_id="4" * 32, span_id=S1, route=EVIL_ROUTE), session
        )
    )
    viewer = Viewer(store, token=TOKEN)
    auth = {"authorization": f"Bearer {TOKEN}"}
    requests: list[tuple[str, str, Mapping[str, str]]] = [
        (PREFIX, f"token={TOKEN.replace('+', '%2B')}", {}),
        (PREFIX, "format=json", auth),
        (PREFIX, "route=/slow&order=slowest", auth),
        (f"{PREFIX}/{T3}", "", auth),
        (f"{PREFIX}/{T3}", "format=json", auth),
        (f"{PREFIX}/{T3}", "format=text", auth),
        *(
            (f"{PREFIX}/{T1}", f"format={fmt}", auth)
            for fmt in ("html", "speedscope", "text", "json", "folded")
        ),
        (f"{PREFIX}/{T1}", "format=bad", auth),
        (f"{PREFIX}/bad", "", auth),
        (PREFIX, "", {}),
        (PREFIX, "token=wrong", {}),
    ]
    for path, query, headers in requests:
        response = call(viewer, path, query, headers=headers, client="10.1.2.3")
        assert TOKEN.encode() not in response.body, (path, query)
        assert b"s3cret" not in response.body, (path, query)


# headers on every response


def _every_kind_of_response(store: MemoryStore) -> list[Callable[[], ViewerResponse]]:
    open_viewer = Viewer(store)
    locked = Viewer(store, token=TOKEN)
    return [
        lambda: call(open_viewer, PREFIX),
        lambda: call(open_viewer, PREFIX, "format=json"),
        lambda: call(open_viewer, f"{PREFIX}/{T1}"),
        lambda: call(open_viewer, f"{PREFIX}/{T1}", "format=text"),
        lambda: call(open_viewer, f"{PREFIX}/{T1}", "format=speedscope"),
        lambda: call(open_viewer, f"{PREFIX}/{T1}", "format=folded"),
        lambda: call(open_viewer, f"{PREFIX}/{T3}"),
        lambda: call(open_viewer, f"{PREFIX}/{T1}", method="HEAD"),
        lambda: call(open_viewer, f"{PREFIX}/bad"),
        lambda: call(open_viewer, f"{PREFIX}/{'f' * 32}"),
        lambda: call(open_viewer, PREFIX, method="POST"),
        lambda: call(open_viewer, PREFIX, "limit=x"),
        lambda: call(open_viewer, PREFIX, client="10.1.2.3"),
        lambda: call(locked, PREFIX),
        lambda: call(Viewer(FailingStore()), PREFIX),
        lambda: call(Viewer(GarbageStore()), PREFIX),
    ]


def test_security_headers_on_every_response(store: MemoryStore) -> None:
    statuses = set()
    for make in _every_kind_of_response(store):
        response = make()
        statuses.add(response.status)
        if response.body:
            assert_security_headers(response)
        else:
            for name, value in SECURITY_HEADERS.items():
                assert header(response, name) == value
        assert header(response, "content-security-policy")
    assert statuses == {200, 400, 401, 403, 404, 405, 503}


def test_non_html_responses_are_sandboxed(store: MemoryStore) -> None:
    viewer = Viewer(store)
    for path, query in [
        (PREFIX, "format=json"),
        (f"{PREFIX}/{T1}", "format=text"),
        (f"{PREFIX}/{T1}", "format=json"),
        (f"{PREFIX}/{T1}", "format=speedscope"),
        (f"{PREFIX}/bad", ""),
    ]:
        csp = header(call(viewer, path, query), "content-security-policy") or ""
        assert "sandbox" in csp and "script-src" not in csp, (path, query)


# the HTML profile page is safe against hostile frame names


def test_profile_html_escapes_hostile_frame_names() -> None:
    evil = "</script><script>alert(1)</script>"
    session = make_session(
        [([f"{evil}\x00/app/{evil}.py\x0012", "handler\x00/app/main.py\x003"], 0.02)],
        start_time=1_700_000_000.0,
        target_description=evil,
        cpu_time=0.01,
    )
    store = MemoryStore()
    store.put(ProfileRecord.from_session(make_summary(trace_id=T1, span_id=S1), session))
    response = call(Viewer(store), f"{PREFIX}/{T1}/flame")
    assert response.status == 200
    body = text(response)
    assert evil not in body and "<script>alert(1)" not in body
    assert len(re.findall("</script", body, re.IGNORECASE)) == 2
    assert "\\u003cscript\\u003ealert(1)" in body
    csp = header(response, "content-security-policy") or ""
    assert "'unsafe-inline'" not in csp.split("script-src", 1)[1].split(";", 1)[0]
