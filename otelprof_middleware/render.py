"""Render a stored pyinstrument session on demand, with pyinstrument's own renderers.

Formats:

- ``html``: pyinstrument's interactive page (flame graph, call tree, timeline);
- ``speedscope``: a file for https://www.speedscope.app (``SpeedscopeRenderer``);
- ``text``: the call tree as plain text (``ConsoleRenderer``, unicode, no colour);
- ``json``: pyinstrument's processed frame tree (``JSONRenderer``);
- ``folded``: collapsed stacks, one ``frame;frame;frame weight`` line per distinct
  stack, for ``flamegraph.pl``, speedscope or Pyroscope. The weight is wall time in
  microseconds (pyinstrument's samples carry unequal times, so counts would lie).

pyinstrument's HTML page embeds the session JSON in an inline ``<script>`` without
escaping ``<``: a frame or file name such as ``</script><script>...`` would end the
script element and run. :func:`render` rewrites that embedded JSON so ``<``, ``>``
and ``&`` are ``\\u003c``-style escapes (still the same JSON and the same JavaScript
value), and refuses to return a page where the rewrite did not take.

pyinstrument's page script also adds a ``<link>`` to a Google Fonts stylesheet. No
page may reach a third party (and the viewer's Content-Security-Policy would block it,
with a console error): :func:`render` blanks that URL, so the browser fetches nothing
and the page uses local fonts, and refuses a page that still names a font host.
"""

from __future__ import annotations

import base64
import hashlib
import re

from pyinstrument.frame_info import frame_info_get_identifier
from pyinstrument.renderers import (
    ConsoleRenderer,
    HTMLRenderer,
    JSONRenderer,
    SpeedscopeRenderer,
)
from pyinstrument.session import Session

from ._identifiers import NO_START_STACK, frame_parts, identifier

__all__ = ["CONTENT_TYPES", "FORMATS", "RenderError", "inline_script_hashes", "render"]

FORMATS = ("html", "speedscope", "text", "json", "folded")
"""Every format :func:`render` accepts."""

CONTENT_TYPES = {
    "html": "text/html; charset=utf-8",
    "speedscope": "application/json; charset=utf-8",
    "text": "text/plain; charset=utf-8",
    "json": "application/json; charset=utf-8",
    "folded": "text/plain; charset=utf-8",
}
"""The ``Content-Type`` of each format."""

# pyinstrument 5.x's page ends with:
#     <script>
#         const sessionData = {session_json};
#         pyinstrumentHTMLRenderer.render(document.getElementById('app'), sessionData);
#     </script>
# The start marker is searched from the front (it precedes every untrusted byte), the
# end marker from the back (it follows every untrusted byte).
_DATA_START = "const sessionData = "
_DATA_END = "pyinstrumentHTMLRenderer.render("
_SCRIPT_CLOSE = re.compile(r"</script", re.IGNORECASE)
_TEMPLATE_SCRIPTS = 2
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)
# Characters that can end or confuse an inline script, escaped inside JSON strings
# (where, in valid JSON, they only ever occur).
_JSON_ESCAPES = str.maketrans(
    {
        "<": "\\u003c",
        ">": "\\u003e",
        "&": "\\u0026",
        "\u2028": "\\u2028",
        "\u2029": "\\u2029",
    }
)
# Stands in for an empty ``start_call_stack``: pyinstrument's stem trimming pops from
# it unconditionally and raises IndexError on sessions built from frame records alone.
_NO_START_STACK = [NO_START_STACK]
# The web-font stylesheet pyinstrument's app.js links to, a string literal in the
# script (before the session data): blanked, as an empty ``href`` fetches nothing.
_FONT_URL = re.compile(r"https://fonts\.(?:googleapis|gstatic)\.com/[^\"'`\s]*")
_FONT_HOST = re.compile(r"fonts\.(?:googleapis|gstatic)\.com")
# The page script titles the tab with the session's description cut to its last word
# (for a script's "app.py:12"): "0.06s - ms - pyinstrument" for "GET /cpu · always-on
# sampler, interval 5 ms". Its pattern becomes one that takes the whole first line. A
# pyinstrument without this pattern keeps its own title.
_TITLE_WORD = r"/[^\s/]+(:\d+)?$/.exec("
_TITLE_WHOLE = "/.+/.exec("
# pyinstrument's tree renderers (and its page's script) recurse once per frame of depth:
# a stack deeper than the recursion limit (an app that raised ``sys.setrecursionlimit``)
# made every format but ``folded`` fail with RecursionError. Deeper stacks keep their
# root-side and leaf-side frames and one frame saying how many were left out between.
_MAX_DEPTH = 400
_KEEP_ROOT = 100
_KEEP_LEAF = _MAX_DEPTH - _KEEP_ROOT - 1


class RenderError(RuntimeError):
    """The session could not be rendered safely in the requested format."""


def render(session: Session, fmt: str) -> tuple[str, str]:
    """Render ``session`` in ``fmt`` with pyinstrument's renderers.

    A session without samples renders too: the text format says why it is empty,
    the others give pyinstrument's empty page, tree or file.

    Args:
        session: a pyinstrument session, e.g. from ``ProfileRecord.session()``.
        fmt: one of :data:`FORMATS`.

    Returns:
        ``(body, content_type)``.

    Raises:
        ValueError: ``fmt`` is not in :data:`FORMATS`.
        RenderError: the HTML page's embedded data could not be made safe.
        Exception: whatever pyinstrument raises on a malformed session; callers
            catch it (the viewer answers 422).

    Example::

        body, content_type = render(record.session(), "text")
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt != "folded":
        session = _shallow(session)
    session = _renderable(session)
    body: str
    if fmt == "html":
        body = _safe_html(HTMLRenderer().render(session))
    elif fmt == "speedscope":
        body = SpeedscopeRenderer().render(session)
    elif fmt == "text":
        body = _text(session)
    elif fmt == "json":
        body = JSONRenderer().render(session)
    else:
        body = _folded(session)
    return body, CONTENT_TYPES[fmt]


def inline_script_hashes(page: str) -> list[str]:
    """CSP source expressions (``'sha256-...'``) for each inline script of ``page``.

    Lets the viewer allow exactly the scripts of the page it serves, and nothing an
    attacker might have slipped in.

    Args:
        page: an HTML page from :func:`render` (``fmt="html"``).

    Returns:
        One ``'sha256-<base64>'`` per ``<script>`` element, in page order.
    """
    hashes = []
    for match in _INLINE_SCRIPT.finditer(page):
        digest = hashlib.sha256(match.group(1).encode("utf-8")).digest()
        hashes.append("'sha256-" + base64.b64encode(digest).decode("ascii") + "'")
    return hashes


def _renderable(session: Session) -> Session:
    """``session``, or a copy pyinstrument can build a frame tree from."""
    if session.start_call_stack:
        return session
    return _copy(session, session.frame_records, list(_NO_START_STACK))


def _shallow(session: Session) -> Session:
    """``session``, or a copy whose stacks deeper than ``_MAX_DEPTH`` lose their middle."""
    if all(len(stack) <= _MAX_DEPTH for stack, _ in session.frame_records):
        return session
    records = []
    for stack, seconds in session.frame_records:
        if len(stack) > _MAX_DEPTH:
            elided = len(stack) - _KEEP_ROOT - _KEEP_LEAF
            marker = identifier(f"[{elided} frames elided]")
            stack = [*stack[:_KEEP_ROOT], marker, *stack[-_KEEP_LEAF:]]
        records.append((stack, seconds))
    return _copy(session, records, session.start_call_stack)


def _copy(
    session: Session, frame_records: list[tuple[list[str], float]], start_call_stack: list[str]
) -> Session:
    """``session`` with other samples or another start stack (the rest as it was)."""
    return Session(
        frame_records=frame_records,
        start_time=session.start_time,
        duration=session.duration,
        min_interval=session.min_interval,
        max_interval=session.max_interval,
        sample_count=session.sample_count,
        start_call_stack=start_call_stack,
        target_description=session.target_description,
        cpu_time=session.cpu_time,
        sys_path=session.sys_path,
        sys_prefixes=session.sys_prefixes,
    )


def _safe_html(page: str) -> str:
    """Escape the session JSON embedded in pyinstrument's page (see the module doc)."""
    start = page.find(_DATA_START)
    end = page.rfind(_DATA_END)
    if start < 0 or end < start:
        raise RenderError("pyinstrument's HTML page has an unexpected layout; not serving it")
    start += len(_DATA_START)
    # Only the template (before the data) loses its font URL: a frame or file name in
    # the data is the profiled program's, kept as it is (escaped, never fetched).
    head = _FONT_URL.sub("", page[:start]).replace(_TITLE_WORD, _TITLE_WHOLE, 1)
    if _FONT_HOST.search(head):
        raise RenderError("could not remove the web-font link from pyinstrument's page")
    page = head + page[start:end].translate(_JSON_ESCAPES) + page[end:]
    # The template has exactly two scripts (app.js, then the data); any other
    # "</script" would mean untrusted data still shapes the page.
    if len(_SCRIPT_CLOSE.findall(page)) != _TEMPLATE_SCRIPTS:
        raise RenderError("could not make the embedded profile data safe; not serving it")
    return page


def _text(session: Session) -> str:
    text: str = ConsoleRenderer(unicode=True, color=False).render(session)
    if session.frame_records:
        return text
    note = _no_samples_note(session)
    marker = "No samples were recorded."
    if marker in text:
        return text.replace(marker, note, 1)
    return text.rstrip("\n") + "\n\n" + note + "\n"


def _no_samples_note(session: Session) -> str:
    duration_ms = session.duration * 1000.0
    interval_ms = session.min_interval * 1000.0
    if duration_ms < interval_ms:
        return (
            f"No samples were taken: the request took {duration_ms:.3f} ms, "
            f"shorter than the sampling interval ({interval_ms:.3f} ms)."
        )
    return (
        f"No samples were taken during the request's {duration_ms:.3f} ms "
        f"(sampling interval {interval_ms:.3f} ms)."
    )


def _folded(session: Session) -> str:
    totals: dict[str, float] = {}
    for stack, seconds in session.frame_records:
        key = ";".join(_folded_name(session, info) for info in stack)
        totals[key] = totals.get(key, 0.0) + seconds
    lines = [
        f"{stack} {max(1, round(seconds * 1_000_000))}"
        for stack, seconds in sorted(totals.items())
        if stack and seconds > 0
    ]
    return "".join(line + "\n" for line in lines)


def _folded_name(session: Session, frame_info: str) -> str:
    parts = frame_parts(frame_info_get_identifier(frame_info))
    name = parts.bare_name or "<unknown>"
    if parts.path:
        name = f"{name} ({session.shorten_path(parts.path)}:{parts.first_line})"
    # ';' separates frames and a newline separates stacks: neither may appear inside.
    return name.replace(";", ":").replace("\n", " ").replace("\r", " ")
