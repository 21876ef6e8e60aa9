"""Server-side SVG for the viewer: the differential flame graph and duration histograms.

Drawn here, not in the browser: the pages run no script of ours, the viewer's
Content-Security-Policy stays ``default-src 'none'``, and nothing is fetched. Hovering a
frame or a bar shows its figures through SVG ``<title>`` elements (the browser's own
tooltip). Every text is escaped; every number is formatted by us.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from .baseline import DiffNode

__all__ = ["duration_histogram", "flame_diff", "percentile"]

FLAME_WIDTH = 1200
ROW_HEIGHT = 18
_CHAR_WIDTH = 6.6  # of the 11px monospace labels, in viewBox units
_MIN_WIDTH = 0.8  # frames narrower than this (viewBox units) are not drawn
_MAX_FRAMES = 4000
_MAX_DEPTH = 200
SIGNIFICANT = 0.02
"""A frame is "slower"/"faster" when its total time moved by at least this share of the
request's (or the baseline's, if larger) sampled time."""

_NEUTRAL = (232, 232, 232)
_SLOWER = (214, 39, 40)
_FASTER = (31, 119, 180)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _mix(strength: float, target: tuple[int, int, int]) -> str:
    strength = max(0.0, min(1.0, strength))
    r, g, b = (round(n + (t - n) * strength) for n, t in zip(_NEUTRAL, target, strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000.0:.1f} ms"


def _signed_ms(seconds: float) -> str:
    return f"{seconds * 1000.0:+.1f} ms"


def flame_diff(root: DiffNode) -> str:
    """An icicle (root on top) of this request's call paths, coloured by the baseline.

    Widths are this request's total time per path. Red: the path took longer than the
    route's mean, blue: shorter, grey: about the same; the stronger the colour, the
    bigger the change relative to the request. Each frame's ``<title>`` gives self and
    total time here and in the baseline. Paths the baseline has and this request lacks
    take no width (the function table lists them). Each frame is a ``<g>`` with
    ``class="frame slower|faster|same"`` and ``data-function`` (the function name).
    A stem of three or more frames that every sample shares (the server's and the
    framework's frames above the app) is drawn as one row, named by its last frame.

    Returns:
        The ``<svg>`` element, or ``""`` when the request has no samples.
    """
    total = root.request_total
    if total <= 0:
        return ""
    scale = FLAME_WIDTH / total
    reference = max(total, root.baseline_total)
    parts: list[str] = []
    depth_reached = 0
    top, stem = _stem(root, scale)
    if len(stem) >= 3:
        parts.append(_frame(top, 0.0, 0, FLAME_WIDTH, reference, stem=stem))
        first = [(child, x, 1) for child, x in reversed(_placed(top, 0.0, scale))]
    else:
        first = [(child, x, 0) for child, x in reversed(_placed(root, 0.0, scale))]
    # Depth-first, children by name for a stable picture; explicit stack (deep recursion).
    stack: list[tuple[DiffNode, float, int]] = first
    while stack and len(parts) < _MAX_FRAMES:
        node, x, depth = stack.pop()
        width = node.request_total * scale
        depth_reached = max(depth_reached, depth)
        parts.append(_frame(node, x, depth, width, reference))
        if depth + 1 < _MAX_DEPTH:
            stack.extend((c, cx, depth + 1) for c, cx in reversed(_placed(node, x, scale)))
    height = (depth_reached + 1) * ROW_HEIGHT
    return (
        f'<svg class="flamediff" xmlns="http://www.w3.org/2000/svg" role="img" '
        f'viewBox="0 0 {FLAME_WIDTH} {height}" width="100%" '
        f'preserveAspectRatio="xMinYMin meet" font-family="ui-monospace, monospace" '
        f'font-size="11">\n' + "".join(parts) + "</svg>\n"
    )


def _stem(root: DiffNode, scale: float) -> tuple[DiffNode, list[DiffNode]]:
    """The frames every drawn sample passes through, outermost first, and the last one."""
    node, stem = root, list[DiffNode]()
    while node.request_self == 0 and node.baseline_self == 0:
        drawn = _placed(node, 0.0, scale)
        if len(drawn) != 1 or len(stem) >= _MAX_DEPTH:
            break
        node = drawn[0][0]
        stem.append(node)
    return node, stem


def _placed(node: DiffNode, x: float, scale: float) -> list[tuple[DiffNode, float]]:
    placed = []
    for child in sorted(node.children.values(), key=lambda c: (c.key[0], c.key[1], c.key[2])):
        width = child.request_total * scale
        if width >= _MIN_WIDTH:
            placed.append((child, x))
        x += width
    return placed


def _frame(
    node: DiffNode,
    x: float,
    depth: int,
    width: float,
    reference: float,
    stem: Sequence[DiffNode] = (),
) -> str:
    name, filename, line = node.key
    delta = node.delta_total
    share = delta / reference if reference > 0 else 0.0
    if share >= SIGNIFICANT:
        kind, fill = "slower", _mix(0.25 + share * 3, _SLOWER)
    elif share <= -SIGNIFICANT:
        kind, fill = "faster", _mix(0.25 - share * 3, _FASTER)
    else:
        kind, fill = "same", _mix(0, _NEUTRAL)
    where = f"{filename}:{line}" if filename else ""
    if stem:
        kind += " stem"
        where += f"\n(the last of {len(stem)} frames every sample passes through, from "
        where += f"{stem[0].key[0]} down)"
    tip = (
        f"{name} {where}\n"
        f"this request: total {_ms(node.request_total)}, self {_ms(node.request_self)}\n"
        f"route mean: total {_ms(node.baseline_total)}, self {_ms(node.baseline_self)}\n"
        f"difference: total {_signed_ms(delta)}, self {_signed_ms(node.delta_self)}"
    )
    y = depth * ROW_HEIGHT
    label = ""
    fits = int((width - 6) / _CHAR_WIDTH)
    shown = f"⋯ {len(stem)} frames ⋯ {name}" if stem else name
    if fits >= 3:
        text = shown if len(shown) <= fits else shown[: fits - 1] + "…"
        label = f'<text x="{x + 3:.2f}" y="{y + 13}">{_e(text)}</text>'
    return (
        f'<g class="frame {kind}" data-function="{_e(name)}"><title>{_e(tip)}</title>'
        f'<rect x="{x:.2f}" y="{y}" width="{max(width - 0.5, 0.3):.2f}" '
        f'height="{ROW_HEIGHT - 1}" fill="{fill}" rx="1"/>{label}</g>\n'
    )


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` percentile (0..100) of already sorted values.

    Raises:
        ValueError: no values.
    """
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def duration_histogram(
    durations_ms: Sequence[float],
    low_ms: float,
    high_ms: float,
    *,
    bins: int = 24,
    width: int = 192,
    height: int = 28,
) -> str:
    """A small histogram of request durations on a log scale from ``low_ms`` to ``high_ms``.

    Give every route of a page the same bounds so their pictures compare. Bars of
    requests slower than the route's 95th percentile are drawn red: the outliers.
    Each bar's ``<title>`` gives its range and count.

    Returns:
        The ``<svg>`` element, or ``""`` without durations.
    """
    values = sorted(d for d in durations_ms if math.isfinite(d) and d >= 0)
    if not values:
        return ""
    low = max(min(low_ms, values[0]), 0.01)
    high = max(high_ms, values[-1], low * 1.0001)
    span = math.log10(high) - math.log10(low)
    counts = [0] * bins
    smallest = [math.inf] * bins
    for value in values:
        position = (math.log10(max(value, low)) - math.log10(low)) / span
        n = min(bins - 1, int(position * bins))
        counts[n] += 1
        smallest[n] = min(smallest[n], value)
    p95 = percentile(values, 95)
    most = max(counts)
    bar = width / bins
    parts = []
    for n, count in enumerate(counts):
        if not count:
            continue
        start = 10 ** (math.log10(low) + span * n / bins)
        end = 10 ** (math.log10(low) + span * (n + 1) / bins)
        tall = max(2.0, (height - 2) * count / most)
        outlier = smallest[n] > p95  # every request of this bar is slower than the p95
        fill = "#d62728" if outlier else "#6b8fb5"
        parts.append(
            f'<rect x="{n * bar:.2f}" y="{height - tall:.2f}" width="{bar - 1:.2f}" '
            f'height="{tall:.2f}" fill="{fill}"><title>{start:.1f} to {end:.1f} ms: '
            f"{count} request{'s' if count != 1 else ''}</title></rect>"
        )
    return (
        f'<svg class="histogram" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{len(values)} duration{"s" if len(values) != 1 else ""} from '
        f'{values[0]:.1f} to {values[-1]:.1f} ms">'
        f'<line x1="0" y1="{height - 0.5}" x2="{width}" y2="{height - 0.5}" stroke="#ccc"/>'
        + "".join(parts)
        + "</svg>"
    )
