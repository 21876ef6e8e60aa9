"""pyinstrument frame identifiers for *other threads'* frames, built read-only.

pyinstrument's C ``get_frame_info`` is meant for the calling thread's own frames: to
name a method's class it reads the frame's locals (``PyFrame_GetLocals``), which on
Python 3.11 rewrites the frame's fast locals into a dict and can run its free-variable
setup. Done from the sampler to a frame another thread is executing, that corrupted
memory and crashed the interpreter (seen as segfaults under uvicorn). Here only
``f_code``, ``f_lineno`` and ``f_back`` are read, which is what ``traceback`` does with
``sys._current_frames()``; the class comes from the code's ``co_qualname`` (the class
that defines the method, where pyinstrument shows the instance's class).

The identifier format is pyinstrument's, written and read in ``_identifiers``.
"""

from __future__ import annotations

import types
from collections.abc import Callable

from .._identifiers import BUILT_IN_FILE, HIDDEN, class_attribute, identifier, line_attribute

__all__ = ["code_head", "frame_identifier", "frame_stack", "stack_above"]

# Keyed by id(): hashing a code object hashes its bytecode and constants every time.
# The entry keeps its code alive and is checked by identity, so an id is never reused
# for a different code while it is cached.
_CODE_PARTS: dict[int, tuple[types.CodeType, str, str]] = {}
_MAX_CODES = 8192
_IDENTIFIERS: dict[tuple[int, int], str] = {}  # (id(code), f_lasti): codes kept alive above
_MAX_IDENTIFIERS = 65536
ON_CLEAR: list[Callable[[], None]] = [_IDENTIFIERS.clear]
"""Called when the code cache is cleared: other caches keyed by ``id(code)`` must go too."""


def code_head(code: types.CodeType) -> str:
    """``name\\x00file\\x00first_line``: the start of every identifier of ``code``'s frames."""
    return identifier(code.co_name, code.co_filename, code.co_firstlineno)


def _code_parts(code: types.CodeType) -> tuple[str, str]:
    """(``name\\x00file\\x00first[\\x01cClass]``, ``\\x01h1`` or ``""``) for ``code``."""
    entry = _CODE_PARTS.get(id(code))
    if entry is not None and entry[0] is code:
        return entry[1], entry[2]
    head = code_head(code)
    varnames = code.co_varnames
    if varnames and varnames[0] in ("self", "cls"):
        owner = code.co_qualname.rpartition(".")[0].rpartition(".")[2]
        if owner and owner != "<locals>":
            head += class_attribute(owner)
    hidden = HIDDEN if "__tracebackhide__" in varnames else ""
    if len(_CODE_PARTS) >= _MAX_CODES:
        _CODE_PARTS.clear()
        for forget in ON_CLEAR:  # caches keyed by code ids relied on these staying alive
            forget()
    _CODE_PARTS[id(code)] = (code, head, hidden)
    return head, hidden


def frame_identifier(frame: types.FrameType) -> str:
    """pyinstrument's identifier of ``frame``, without touching its locals.

    Cached by code and instruction offset (which fix the line): the sampler names the same
    few hundred frames over and over.
    """
    code = frame.f_code
    key = (id(code), frame.f_lasti)
    cached = _IDENTIFIERS.get(key)
    if cached is not None:
        return cached
    head, hidden = _code_parts(code)  # keeps ``code`` alive while its key is cached
    line = frame.f_lineno
    has_line = line is not None and line > 0
    named = head + line_attribute(line) + hidden if has_line else head + hidden
    if len(_IDENTIFIERS) >= _MAX_IDENTIFIERS:
        _IDENTIFIERS.clear()
    _IDENTIFIERS[key] = named
    return named


def frame_stack(frame: types.FrameType | None, stop: types.CodeType | None = None) -> list[str]:
    """Identifiers of ``frame`` and its callers, innermost first, up to ``stop``'s frame."""
    stack: list[str] = []
    while frame is not None and frame.f_code is not stop:
        stack.append(frame_identifier(frame))
        frame = frame.f_back
    return stack


def stack_above(
    frame: types.FrameType | None, event: str, arg: object, stop: tuple[types.CodeType, ...]
) -> list[str]:
    """A hook sample's frames above the first frame of a ``stop`` code, root first.

    As pyinstrument's ``build_call_stack``: a ``call`` event's frame has only just been
    entered (the time was spent in its caller), a C function's return adds that function.
    """
    stack: list[str] = []
    if event == "call" and frame is not None:
        frame = frame.f_back
    elif event in ("c_return", "c_exception"):
        name = str(getattr(arg, "__qualname__", None) or getattr(arg, "__name__", "?"))
        stack.append(identifier(name, BUILT_IN_FILE))
    while frame is not None and frame.f_code not in stop:
        stack.append(frame_identifier(frame))
        frame = frame.f_back
    stack.reverse()
    return stack
