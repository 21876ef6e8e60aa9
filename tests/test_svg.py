"""_svg.py: the differential flame graph and the duration histograms, as markup."""

from __future__ import annotations

import re

import pytest

from otelprof_middleware.baseline import ROOT_KEY, DiffNode
from otelprof_middleware.viewer._svg import duration_histogram, flame_diff, percentile


def _tree() -> DiffNode:
    root = DiffNode(ROOT_KEY, request_total=0.1, baseline_total=0.05)
    handler = root.child(("handler", "app.py", 1))
    handler.request_total, handler.baseline_total = 0.1, 0.05
    slow = handler.child(("<b>slow</b>", "db.py", 2))
    slow.request_total = slow.request_self = 0.09
    slow.baseline_total = slow.baseline_self = 0.02
    fast = handler.child(("fast", "v.py", 3))
    fast.request_total = fast.request_self = 0.01
    fast.baseline_total = fast.baseline_self = 0.03
    gone = handler.child(("gone", "v.py", 4))  # only in the baseline: no width, not drawn
    gone.baseline_total = 0.01
    return root


def test_flame_diff_colours_widths_and_escapes() -> None:
    svg = flame_diff(_tree())
    frames = re.findall(
        r'<g class="frame (\w+)" data-function="([^"]*)">.*?<rect x="([0-9.]+)" y="(\d+)" '
        r'width="([0-9.]+)"',
        svg,
        re.DOTALL,
    )
    by_name = {name: (kind, float(x), int(y), float(w)) for kind, name, x, y, w in frames}
    assert set(by_name) == {"handler", "&lt;b&gt;slow&lt;/b&gt;", "fast"}
    assert by_name["handler"][0] == "slower" and by_name["handler"][2] == 0
    assert by_name["&lt;b&gt;slow&lt;/b&gt;"][0] == "slower"
    assert by_name["fast"][0] == "faster"
    # Widths follow this request's time: the slow frame is 9 times the fast one.
    slow_w, fast_w = by_name["&lt;b&gt;slow&lt;/b&gt;"][3], by_name["fast"][3]
    assert slow_w / fast_w == pytest.approx(9, rel=0.02)
    assert by_name["fast"][2] == by_name["&lt;b&gt;slow&lt;/b&gt;"][2] == 18  # one row down
    assert "<b>" not in svg
    assert "difference: total +70.0 ms, self +70.0 ms" in svg


def test_flame_diff_of_nothing_is_empty() -> None:
    assert flame_diff(DiffNode(ROOT_KEY)) == ""


def test_percentile_nearest_rank() -> None:
    values = [float(n) for n in range(1, 21)]
    assert percentile(values, 50) == 10.0
    assert percentile(values, 95) == 19.0
    assert percentile(values, 100) == 20.0
    assert percentile([7.0], 95) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_histogram_marks_the_outliers() -> None:
    durations = [10.0] * 19 + [500.0]
    svg = duration_histogram(durations, 1.0, 1000.0)
    bars = re.findall(r'<rect [^>]*fill="(#[0-9a-f]+)"><title>([^<]*)</title>', svg)
    assert len(bars) == 2
    assert bars[0][1].endswith(": 19 requests") and bars[0][0] != "#d62728"
    assert bars[1][1].endswith(": 1 request") and bars[1][0] == "#d62728"
    assert 'aria-label="20 durations from 10.0 to 500.0 ms"' in svg


@pytest.mark.parametrize("durations", [[], [float("nan")], [0.0], [0.0, 0.0], [3.0], [1e9, 1e-9]])
def test_histogram_edge_cases(durations: list[float]) -> None:
    svg = duration_histogram(durations, 0.0, 0.0)
    if not [d for d in durations if d == d]:
        assert svg == ""
    else:
        assert svg.startswith('<svg class="histogram"') and "nan" not in svg


def test_a_shared_stem_is_one_row() -> None:
    root = DiffNode(ROOT_KEY, request_total=0.1, baseline_total=0.1)
    node = root
    for name in ("run", "serve", "app", "handler"):  # every sample passes through these
        node = node.child((name, "x.py", 1))
        node.request_total = node.baseline_total = 0.1
    for name, seconds in (("a", 0.06), ("b", 0.04)):
        leaf = node.child((name, "x.py", 2))
        leaf.request_total = leaf.request_self = seconds
        leaf.baseline_total = leaf.baseline_self = 0.05
    svg = flame_diff(root)
    names = re.findall(r'data-function="([^"]*)"', svg)
    assert names == ["handler", "a", "b"]
    assert '<g class="frame same stem" data-function="handler">' in svg
    assert "⋯ 4 frames ⋯ handler" in svg and "from run down" in svg
    assert re.findall(r'<rect x="[0-9.]+" y="(\d+)"', svg) == ["0", "18", "18"]
