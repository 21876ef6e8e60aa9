"""Always-on: where a request is at a tick, as pyinstrument frame identifiers.

The stacks of running threads (root first, under a synthetic thread frame) and of
suspended tasks (the loop's frames, the task's coroutine chain, then ``[await]``). Frames
of other threads are named read-only (``_frames``); await stacks are cached.
"""

from __future__ import annotations

import contextvars
import functools
import gc
import threading
import types
from collections.abc import Callable
from typing import Any

from pyinstrument.frame import AWAIT_FRAME_IDENTIFIER

from ..._identifiers import UNKNOWN_FILE, identifier, thread_root
from .._frames import ON_CLEAR, code_head, frame_identifier, frame_stack

__all__ = [
    "AWAIT_STACKS",
    "await_stack",
    "chain_stack",
    "job_identifier",
    "job_stack",
    "running_stack",
    "submission_stack",
    "thread_identifier",
    "thread_stack",
]


def thread_identifier(ident: int) -> str:
    thread = threading._active.get(ident)  # type: ignore[attr-defined]
    name = thread.name if thread is not None else "Thread"
    return thread_root(name, ident)


def thread_stack(
    ident: int, frame: types.FrameType | None, stop: types.CodeType | None = None
) -> list[str]:
    """Root-first frame identifiers of ``frame``'s chain, stopping below ``stop``'s frame."""
    stack = frame_stack(frame, stop)
    stack.append(thread_identifier(ident))
    stack.reverse()
    return stack


def submission_stack(ident: int, frame: types.FrameType | None) -> list[str]:
    """``thread_stack(ident, frame)`` where a request submits a worker job, shared by
    every submission from the same place: do not change the list.

    Every ``def`` endpoint, sync dependency and ``run_in_threadpool`` call submits one,
    from a loop stack 30 to 40 frames deep in FastAPI. Naming those frames each time cost
    about 5 µs a job; reading the codes and instruction offsets that fix the names costs
    a third of that. (The cache is keyed by code ids, kept valid as :data:`AWAIT_STACKS`'s
    are; the thread's name is read when an entry is made.)
    """
    key = [ident]
    append = key.append
    current = frame
    while current is not None:
        append(id(current.f_code))
        append(current.f_lasti)
        current = current.f_back
    cache_key = tuple(key)
    stack = _SUBMISSION_STACKS.get(cache_key)
    if stack is None:
        stack = thread_stack(ident, frame)
        if len(_SUBMISSION_STACKS) >= _MAX_SUBMISSION_STACKS:
            _SUBMISSION_STACKS.clear()
        _SUBMISSION_STACKS[cache_key] = stack
    return stack


_SUBMISSION_STACKS: dict[tuple[int, ...], list[str]] = {}
_MAX_SUBMISSION_STACKS = 4096
ON_CLEAR.append(_SUBMISSION_STACKS.clear)


def job_stack(
    submitted_from: list[str], func: Callable[..., Any], args: tuple[Any, ...] = ()
) -> list[str]:
    """``submitted_from`` and the job's function: where a job's time goes when no sample
    says where inside it (shared by jobs of one function from one place: do not change
    the list). ``func`` is named as :func:`job_identifier` names it."""
    code = _job_code(func, args)
    if code is None:
        return [*submitted_from, job_identifier(func)]
    key = (id(submitted_from), id(code))
    entry = _JOB_STACKS.get(key)
    if entry is not None and entry[0] is submitted_from and entry[1] is code:
        return entry[2]
    stack = [*submitted_from, code_head(code)]
    if len(_JOB_STACKS) >= _MAX_SUBMISSION_STACKS:
        _JOB_STACKS.clear()
    _JOB_STACKS[key] = (submitted_from, code, stack)  # (holds what its key's ids name)
    return stack


_JOB_STACKS: dict[tuple[int, int], tuple[list[str], types.CodeType, list[str]]] = {}


def job_identifier(func: Callable[..., Any], args: tuple[Any, ...] = ()) -> str:
    """The frame identifier standing for a job, ``func(*args)`` (no frame of it was seen).

    A job that steps a generator (``func(generator)``: Starlette runs a sync
    ``StreamingResponse`` body as ``_next(iterator)``, one job a chunk) is named after
    the generator, the user's code, not the function that steps it.
    """
    code = _job_code(func, args)
    if code is not None:
        return code_head(code)
    func = _unwrapped(func)
    name = getattr(func, "__qualname__", None) or type(func).__name__
    return identifier(name, UNKNOWN_FILE)


def _job_code(func: Callable[..., Any], args: tuple[Any, ...]) -> types.CodeType | None:
    """The code a job ``func(*args)`` runs for the user, where there is one."""
    stepped = args[0] if len(args) == 1 else None
    if type(stepped) is types.GeneratorType:
        return stepped.gi_code
    code = getattr(_unwrapped(func), "__code__", None)
    return code if type(code) is types.CodeType else None


def _unwrapped(func: Callable[..., Any]) -> Callable[..., Any]:
    while isinstance(func, functools.partial):  # run_in_threadpool wraps the call in one
        # FastAPI runs a ``def`` endpoint as ``_run_sync_endpoint(function=endpoint, ...)``:
        # the endpoint, the user's code, names the job rather than FastAPI's wrapper.
        endpoint = func.keywords.get("function")
        if callable(endpoint):
            func = endpoint
        elif func.args and _runs_in_a_context(func.func):
            # ``asyncio.to_thread(f, ...)`` submits ``partial(context.run, f, ...)``.
            func = func.args[0]
        else:
            func = func.func
    return func


def _runs_in_a_context(func: Callable[..., Any]) -> bool:
    """Whether ``func`` is some context's bound ``run`` (``contextvars.Context.run``)."""
    return type(getattr(func, "__self__", None)) is contextvars.Context and (
        getattr(func, "__name__", None) == "run"
    )


AWAIT_STACKS: dict[tuple[int, ...], list[str]] = {}
_MAXAWAIT_STACKS = 4096
_MAX_AWAIT_DEPTH = 200  # coroutines followed down an awaited chain
# Keys hold code ids: every code in a key went through frame_identifier, whose cache
# keeps it alive, and this cache is emptied whenever that one is.
ON_CLEAR.append(AWAIT_STACKS.clear)


async def _an_async_generator() -> Any:
    yield None


def _step_types() -> tuple[type, type]:
    """The types of the awaitables ``async for`` and ``aclose()`` of an async generator
    hand to the coroutine that awaits them (not in ``types``)."""
    agen = _an_async_generator()
    send, throw = agen.asend(None), agen.athrow(GeneratorExit)
    kinds = (type(send), type(throw))
    send.close()
    throw.close()
    return kinds


_AGEN_SEND, _AGEN_THROW = _step_types()
"""``async for`` over an async generator (an SSE stream's body, ``request.stream()``,
a streamed database cursor) leaves the consuming coroutine awaiting one of these, and
what the generator itself awaits lies behind it."""


def _async_generator_of(step: object) -> types.AsyncGeneratorType[Any, Any] | None:
    """The async generator an ``asend``/``athrow`` awaitable steps. It has no attribute
    for it; its only references (the generator and the value sent) are what the garbage
    collector's traversal reports, read in C with no Python code of the object's run."""
    for referent in gc.get_referents(step):
        if type(referent) is types.AsyncGeneratorType:
            return referent
    return None


def _await_chain(coro: object) -> list[Any]:
    """A suspended coroutine and what it awaits, outermost first.

    Only real coroutines, generators and async generators are followed (``cr_await``,
    ``gi_yieldfrom``, ``ag_await``), so no user-defined attribute lookup ever runs on
    the sampler thread.
    """
    chain: list[Any] = []
    while len(chain) < _MAX_AWAIT_DEPTH:
        kind = type(coro)
        if kind is types.CoroutineType:
            chain.append(coro)
            coro = coro.cr_await  # type: ignore[attr-defined]
        elif kind is types.GeneratorType:
            chain.append(coro)
            coro = coro.gi_yieldfrom  # type: ignore[attr-defined]
        elif kind is _AGEN_SEND or kind is _AGEN_THROW:
            agen = _async_generator_of(coro)
            if agen is None:
                break
            chain.append(agen)
            coro = agen.ag_await
        else:
            break
    return chain


def await_stack(prefix: list[str], coro: object) -> list[str]:
    """Where a suspended task waits: ``prefix``, its coroutine chain, then ``[await]``.

    Concurrent requests mostly wait at the same few places, so the stack is cached by the
    chain's code objects and the innermost one's instruction offset: reading those needs
    no frame object, and naming frames costs far more. (An outer function that awaits the
    same function from two lines shares one entry: only its line attribute may be off.)
    """
    # The key is read in one tight loop: this runs once per wait of every request.
    coroutine = types.CoroutineType
    key = [id(prefix)]
    append = key.append
    node: Any = coro
    innermost: Any = None
    while type(node) is coroutine:  # the common case: coroutines all the way
        append(id(node.cr_code))
        innermost = node
        node = node.cr_await
    kind = type(node)
    if kind is types.GeneratorType or kind is _AGEN_SEND or kind is _AGEN_THROW:
        # generators (``yield from``) or async generators (``async for``) in the chain
        for _ in range(_MAX_AWAIT_DEPTH):
            kind = type(node)
            if kind is coroutine:
                append(id(node.cr_code))
                innermost, node = node, node.cr_await
            elif kind is types.GeneratorType:
                append(id(node.gi_code))
                innermost, node = node, node.gi_yieldfrom
            elif kind is _AGEN_SEND or kind is _AGEN_THROW:
                agen = _async_generator_of(node)
                if agen is None:
                    break
                append(id(agen.ag_code))
                innermost, node = agen, agen.ag_await
            else:
                break
        frame = _frame_of(innermost)
    else:  # (as ``_frame_of``, without its call)
        frame = innermost.cr_frame if innermost is not None else None
    append(frame.f_lasti if frame is not None else -1)
    cache_key = tuple(key)
    stack = AWAIT_STACKS.get(cache_key)
    if stack is None:
        stack = chain_stack(prefix, coro)
        stack.append(AWAIT_FRAME_IDENTIFIER)
        if len(AWAIT_STACKS) >= _MAXAWAIT_STACKS:
            AWAIT_STACKS.clear()
        AWAIT_STACKS[cache_key] = stack
    return stack


def chain_stack(prefix: list[str], coro: object) -> list[str]:
    """``prefix`` and the frames of a suspended coroutine's await chain, root first (a new
    list; no ``[await]``)."""
    stack = list(prefix)
    for link in _await_chain(coro):
        link_frame = _frame_of(link)
        if link_frame is None:
            break
        stack.append(frame_identifier(link_frame))
    return stack


def _frame_of(node: Any) -> types.FrameType | None:
    """The frame of a coroutine or generator from :func:`_await_chain` (None: finished)."""
    kind = type(node)
    frame: types.FrameType | None = (
        node.cr_frame
        if kind is types.CoroutineType
        else node.gi_frame
        if kind is types.GeneratorType
        else node.ag_frame
    )
    return frame


def running_stack(
    ident: int, frame: types.FrameType, root: types.FrameType | None
) -> tuple[list[str], int]:
    """The loop thread's stack, root first, and how many entries lie below ``root``.

    ``root`` is the running task's outermost coroutine frame: what lies below it (the
    thread and the loop's own frames) is where the loop's waiting tasks hang too.
    """
    stack = thread_stack(ident, frame)
    if root is None:
        return stack, 0
    depth = 0  # frames from the root coroutine up to ``frame``
    current: types.FrameType | None = frame
    while current is not None:
        depth += 1
        if current is root:
            return stack, len(stack) - depth
        current = current.f_back
    return stack, 0
