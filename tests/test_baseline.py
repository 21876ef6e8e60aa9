from __future__ import annotations

import pytest
from pyinstrument.session import Session

from otelprof_middleware.baseline import ROOT_KEY, combine, diff, diff_tree, function_times

from .helpers import make_session, make_summary

ROOT = "MainThread\x00<thread>\x001"
A = "handler\x00app.py\x0010\x01l12"
B = "query_db\x00db.py\x0020\x01l25"
B_OTHER_LINE = "query_db\x00db.py\x0020\x01l27"  # same function, another line
C = "render\x00views.py\x0030"
FIB = "fib\x00math.py\x0040"


def session(records: list[tuple[list[str], float]]) -> Session:
    return make_session(records, start_call_stack=[ROOT])


def test_function_times_are_inclusive_and_count_recursion_once() -> None:
    s = session(
        [
            ([ROOT, A, B], 0.010),
            ([ROOT, A, B_OTHER_LINE, "[await]"], 0.020),
            ([ROOT, A, C], 0.005),
            ([ROOT, A, FIB, FIB, FIB], 0.004),
        ]
    )
    times, total = function_times(s)
    assert total == pytest.approx(0.039)
    assert times[("handler", "app.py", 10)] == pytest.approx(0.039)
    assert times[("query_db", "db.py", 20)] == pytest.approx(0.030)  # lines merged, await in
    assert times[("render", "views.py", 30)] == pytest.approx(0.005)
    assert times[("fib", "math.py", 40)] == pytest.approx(0.004)  # not 0.012
    assert not any(key[1] == "<thread>" for key in times)


def test_diff_against_the_mean_of_the_baseline() -> None:
    usual = [
        session([([ROOT, A, B], 0.010), ([ROOT, A, C], 0.010)]),
        session([([ROOT, A, B], 0.030), ([ROOT, A, C], 0.010)]),
    ]
    slow = session([([ROOT, A, B], 0.100), ([ROOT, A, C], 0.005)])
    rows = {row.function: row for row in diff(slow, usual)}
    assert rows["query_db"].request_ms == pytest.approx(100.0)
    assert rows["query_db"].baseline_ms == pytest.approx(20.0)
    assert rows["query_db"].delta_ms == pytest.approx(80.0)
    assert rows["render"].delta_ms == pytest.approx(-5.0)
    assert rows["handler"].delta_ms == pytest.approx(75.0)
    assert rows["query_db"].request_share == pytest.approx(100 / 105)
    assert rows["query_db"].baseline_share == pytest.approx(40 / 60)
    ordered = [row.function for row in diff(slow, usual)]
    assert ordered == ["query_db", "handler", "render"]  # biggest |delta| first


def test_functions_only_on_one_side_appear_with_zero_on_the_other() -> None:
    rows = {
        r.function: r for r in diff(session([([ROOT, FIB], 0.01)]), [session([([ROOT, C], 0.02)])])
    }
    assert rows["fib"].baseline_ms == 0 and rows["fib"].request_ms == pytest.approx(10.0)
    assert rows["render"].request_ms == 0 and rows["render"].delta_ms == pytest.approx(-20.0)


def test_combine_and_empty_inputs() -> None:
    combined = combine([session([([ROOT, A], 0.01)]), session([([ROOT, B], 0.02)])])
    assert combined.sample_count == 2
    assert function_times(combined)[1] == pytest.approx(0.03)
    with pytest.raises(ValueError):
        combine([])
    with pytest.raises(ValueError):
        diff(session([]), [])


# -- through the viewer ------------------------------------------------------------------

from otelprof_middleware import ProfileRecord, ProfileSummary  # noqa: E402
from otelprof_middleware.stores import MemoryStore  # noqa: E402
from otelprof_middleware.viewer import Viewer, ViewerRequest  # noqa: E402

ROUTE = "/items/{item_id}"


def _put(
    store: MemoryStore,
    n: int,
    records: list[tuple[list[str], float]],
    route: str = ROUTE,
    **fields: object,
) -> ProfileSummary:
    duration_ms = sum(s for _, s in records) * 1000
    summary = make_summary(n, route=route, duration_ms=duration_ms, start_time=1000.0 + n, **fields)
    store.put(ProfileRecord.from_session(summary, session(records)))
    return summary


def _get(viewer: Viewer, path: str, query: str = "") -> tuple[int, str]:
    response = viewer.handle(
        ViewerRequest("GET", path, query.encode(), {}, client_host="127.0.0.1")
    )
    return response.status, response.body.decode()


def test_route_baseline_and_request_diff_pages() -> None:
    import json

    store = MemoryStore()
    _put(store, 0, [([ROOT, A, B], 0.010), ([ROOT, A, C], 0.010)])
    _put(store, 1, [([ROOT, A, B], 0.030), ([ROOT, A, C], 0.010)])
    slow = _put(store, 2, [([ROOT, A, B], 0.100), ([ROOT, A, C], 0.005)])
    _put(store, 3, [([ROOT, FIB], 0.5)], route="/other")
    viewer = Viewer(store)

    status, text = _get(viewer, "/debug/profile/route", "route=/items/{item_id}&format=text")
    assert status == 200
    assert "baseline of 3 recent requests" in text
    assert "query_db" in text and "fib" not in text

    status, body = _get(
        viewer, f"/debug/profile/{slow.trace_id}/diff", f"span_id={slow.span_id}&format=json"
    )
    assert status == 200
    data = json.loads(body)
    assert data["baseline_profiles"] == 2  # the request itself is not its own baseline
    rows = {row["function"]: row for row in data["functions"]}
    assert rows["query_db"]["delta_ms"] == pytest.approx(80.0)
    assert rows["render"]["delta_ms"] == pytest.approx(-5.0)

    status, page = _get(viewer, f"/debug/profile/{slow.trace_id}/diff")
    assert status == 200
    assert (
        page.index("Took more time than usual")
        < page.index("query_db", page.index("<h2>Functions</h2>"))
        < page.index("Took less time")
    )
    # The differential flame graph, above the table: query_db took 80 ms more than the
    # route's mean (20 ms), render 5 ms less; the hover text gives both sides.
    assert page.index('<svg class="flamediff"') < page.index("<h2>Functions</h2>")
    frames = _frames(page)
    assert frames["query_db"][0] == "slower" and frames["render"][0] == "faster"
    assert frames["handler"][0] == "slower"
    assert "this request: total 100.0 ms, self 100.0 ms" in frames["query_db"][1]
    assert "route mean: total 20.0 ms, self 20.0 ms" in frames["query_db"][1]
    assert "difference: total +80.0 ms, self +80.0 ms" in frames["query_db"][1]
    assert "<title>GET /items/{item_id} 105 ms vs route · otelprof</title>" in page
    assert "<script" not in page

    # The baseline page: a frame naming the route and how many requests, never "combined".
    status, frame = _get(viewer, "/debug/profile/route", "route=/items/{item_id}")
    assert status == 200
    assert "<title>Baseline /items/{item_id} · 3 requests · otelprof</title>" in frame
    assert "combined</title>" not in frame
    flame = "/debug/profile/route/flame?route=%2Fitems%2F%7Bitem_id%7D"
    assert f'<iframe src="{flame}"' in frame
    status, inner = _get(viewer, "/debug/profile/route/flame", "route=/items/{item_id}")
    assert status == 200 and "pyinstrumentHTMLRenderer.render(" in inner
    assert "baseline of 3 recent requests" in inner


def _frames(page: str) -> dict[str, tuple[str, str]]:
    """Function name -> (slower|faster|same, hover text) of each frame of the diff graph."""
    import html
    import re

    found = re.findall(
        r'<g class="frame (\w+)" data-function="([^"]*)"><title>(.*?)</title>', page, re.DOTALL
    )
    return {html.unescape(name): (kind, html.unescape(tip)) for kind, name, tip in found}


def test_diff_tree_has_self_and_total_per_path() -> None:
    request = session([([ROOT, A, B], 0.100), ([ROOT, A], 0.010), ([ROOT, A, C], 0.005)])
    others = [
        session([([ROOT, A, B], 0.010), ([ROOT, A, C], 0.010)]),
        session([([ROOT, A, B], 0.030), ([ROOT, A, C], 0.030), ([ROOT, FIB], 0.020)]),
    ]
    root = diff_tree(request, others)
    assert root.key == ROOT_KEY
    assert root.request_total == pytest.approx(0.115)
    assert root.baseline_total == pytest.approx(0.050)  # the mean of 0.020 and 0.080
    handler = root.children[("handler", "app.py", 10)]
    assert (handler.request_total, handler.request_self) == pytest.approx((0.115, 0.010))
    assert (handler.baseline_total, handler.baseline_self) == pytest.approx((0.040, 0.0))
    query = handler.children[("query_db", "db.py", 20)]
    assert query.delta_total == pytest.approx(0.080) and query.delta_self == pytest.approx(0.080)
    fib = root.children[("fib", "math.py", 40)]  # only in the baseline
    assert (fib.request_total, fib.baseline_total) == pytest.approx((0.0, 0.010))
    assert diff_tree(request, []).children[("handler", "app.py", 10)].baseline_total == 0.0


def test_diff_page_of_a_request_without_samples_draws_nothing() -> None:
    store = MemoryStore()
    _put(store, 0, [([ROOT, A], 0.01)])
    empty = _put(store, 1, [])
    status, page = _get(Viewer(store), f"/debug/profile/{empty.trace_id}/diff")
    assert status == 200
    assert "No samples in this request" in page and "<svg" not in page


def test_baseline_bad_paths() -> None:
    store = MemoryStore()
    lone = _put(store, 0, [([ROOT, A], 0.01)])
    unmatched = _put(store, 1, [([ROOT, A], 0.01)], route="")
    viewer = Viewer(store)
    assert _get(viewer, "/debug/profile/route")[0] == 400
    assert _get(viewer, "/debug/profile/route", "route=/nope")[0] == 404
    assert _get(viewer, "/debug/profile/route", f"route={ROUTE}&format=pdf")[0] == 400
    assert _get(viewer, "/debug/profile/route", f"route={ROUTE}&limit=0")[0] == 400
    # The first kept profile of a route: its span's baseline link answers, and says so.
    status, page = _get(viewer, f"/debug/profile/{lone.trace_id}/diff")
    assert status == 200 and "nothing to compare it with yet" in page
    status, body = _get(viewer, f"/debug/profile/{lone.trace_id}/diff", "format=json")
    assert status == 200 and '"baseline_profiles": 0' in body and '"functions": []' in body
    assert _get(viewer, f"/debug/profile/{unmatched.trace_id}/diff")[0] == 404
    assert _get(viewer, "/debug/profile/" + "z" * 32 + "/diff")[0] == 400
    assert _get(viewer, f"/debug/profile/{lone.trace_id}/other")[0] == 404
    assert _get(viewer, "/debug/profile/route/flame")[0] == 400
    assert _get(viewer, "/debug/profile/route/flame", "route=/nope")[0] == 404
    assert _get(viewer, "/debug/profile/route/flame", f"route={ROUTE}&format=text")[0] == 400
    assert _get(viewer, "/debug/profile/route/other", f"route={ROUTE}")[0] == 404
    # A route with markup in it: 404, and the answer is plain text that names nothing back.
    status, body = _get(viewer, "/debug/profile/route", "route=<script>alert(1)</script>")
    assert status == 404 and "<script" not in body


def test_diff_page_escapes_function_names() -> None:
    store = MemoryStore()
    evil = "<script>alert(1)</script>\x00<img src=x onerror=alert(1)>.py\x001"
    _put(store, 0, [([ROOT, A], 0.01)])
    target = _put(store, 1, [([ROOT, A, evil], 0.02)])
    status, page = _get(Viewer(store), f"/debug/profile/{target.trace_id}/diff")
    assert status == 200
    assert "<script>alert(1)" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # in the flame graph too (label and hover text)
    graph = page[page.index('<svg class="flamediff"') : page.index("</svg>")]
    assert 'data-function="&lt;script&gt;alert(1)&lt;/script&gt;"' in graph
    assert "<script" not in graph and "<img" not in graph


def test_diff_compares_a_request_with_profiles_of_its_own_mode() -> None:
    import json

    # The route's profiles come from the always-on sampler; a triggered request is
    # profiled by the hook, which also records the event loop's frames and C functions
    # that the sampler never shows. Against always-on profiles, those would all "take
    # more time than usual".
    loop_hook = "__next__\x00otelprof_middleware/profiling/_loop_hook.py\x00117"
    builtin = "sum\x00<built-in>\x000"
    store = MemoryStore()
    for n in range(3):
        _put(store, n, [([ROOT, A, B], 0.020)], mode="always_on")
    _put(store, 3, [([ROOT, loop_hook, A, B, builtin], 0.010)], mode="hook")
    for n in range(4, 7):
        _put(store, n, [([ROOT, A, B], 0.020)], mode="always_on")
    triggered = _put(
        store, 7, [([ROOT, loop_hook, A, B, builtin], 0.030)], mode="hook", kept_reason="triggered"
    )
    viewer = Viewer(store)

    status, body = _get(
        viewer,
        f"/debug/profile/{triggered.trace_id}/diff",
        f"span_id={triggered.span_id}&format=json",
    )
    assert status == 200
    data = json.loads(body)
    assert data["baseline_profiles"] == 1  # the other hook profile, not the six always-on ones
    rows = {row["function"]: row for row in data["functions"]}
    assert rows["__next__"]["baseline_ms"] == pytest.approx(10.0)
    assert rows["sum"]["delta_ms"] == pytest.approx(20.0)
    status, page = _get(viewer, f"/debug/profile/{triggered.trace_id}/diff")
    assert status == 200 and "1 other recent profile " in page
    assert "pyinstrument hook" in page

    # An always-on request is compared with the always-on profiles only.
    usual = _put(store, 8, [([ROOT, A, B], 0.040)], mode="always_on")
    status, body = _get(viewer, f"/debug/profile/{usual.trace_id}/diff", "format=json")
    data = json.loads(body)
    assert data["baseline_profiles"] == 6
    rows = {row["function"]: row for row in data["functions"]}
    assert "__next__" not in rows and "sum" not in rows
    assert rows["query_db"]["delta_ms"] == pytest.approx(20.0)

    # A hook request whose route has only always-on profiles has nothing to compare with.
    lone = _put(store, 9, [([ROOT, A], 0.01)], route="/lone", mode="always_on")
    hooked = _put(store, 10, [([ROOT, A], 0.01)], route="/lone", mode="hook")
    status, page = _get(viewer, f"/debug/profile/{hooked.trace_id}/diff")
    assert status == 200 and "nothing to compare it with yet" in page
    assert lone.trace_id not in page
