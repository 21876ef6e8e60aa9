"""A profile in one of pyinstrument's formats, with the headers that format needs.

The flame graph page (``html``) may run exactly its own inline scripts (allowed by hash)
and be framed by our pages only; the other formats run nothing; speedscope JSON comes as
a download.
"""

from __future__ import annotations

from pyinstrument.session import Session

from .._failsafe import log_failure
from .._record import ProfileRecord, is_span_id, is_trace_id
from ..render import inline_script_hashes, render
from ._http import DATA_CSP, PROFILE_CSP, Abort, ViewerResponse, response
from ._reading import decoded

__all__ = ["render_record", "render_session"]


def render_record(record: ProfileRecord, fmt: str) -> ViewerResponse:
    """One stored profile as ``fmt``; 422 when it cannot be decoded or rendered."""
    session = decoded(record)
    summary = record.summary
    name = (
        f"{summary.trace_id}-{summary.span_id}"
        if is_trace_id(summary.trace_id) and is_span_id(summary.span_id)
        else "profile"
    )
    return render_session(session, fmt, name)


def render_session(session: Session, fmt: str, name: str) -> ViewerResponse:
    """``session`` as ``fmt`` (``name``: the speedscope download's file name); 422 when
    rendering fails."""
    try:
        body, content_type = render(session, fmt)
    except Exception as exc:
        log_failure("viewer.render", exc)
        raise Abort(
            422, f"the profile could not be rendered as {fmt}; the error was logged.\n"
        ) from None
    extra: list[tuple[str, str]] = []
    if fmt == "html":
        csp = PROFILE_CSP.format(scripts=" ".join(inline_script_hashes(body)) or "'none'")
        extra.append(("x-frame-options", "SAMEORIGIN"))
    else:
        csp = DATA_CSP
    if fmt == "speedscope":
        extra.append(("content-disposition", f'attachment; filename="{name}.speedscope.json"'))
    return response(200, content_type, body.encode("utf-8"), csp, extra)
