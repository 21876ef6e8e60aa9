"""Frame identifiers built for other threads' frames match pyinstrument's own."""

from __future__ import annotations

import contextvars
import functools
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

from pyinstrument.low_level.stat_profile import get_frame_info

from otelprof_middleware._identifiers import UNKNOWN_FILE, identifier
from otelprof_middleware.profiling._frames import code_head, frame_identifier, frame_stack
from otelprof_middleware.profiling.always_on import _sampler
from otelprof_middleware.profiling.always_on._stacks import (
    job_identifier,
    job_stack,
    submission_stack,
    thread_stack,
)


class Shape:
    def method(self) -> types.FrameType:
        return sys._getframe()

    @classmethod
    def klass(cls) -> types.FrameType:
        return sys._getframe()

    @staticmethod
    def static() -> types.FrameType:
        return sys._getframe()

    def hidden(self) -> types.FrameType:
        __tracebackhide__ = True  # pyinstrument's marker for hidden frames
        return sys._getframe()


def outer() -> types.FrameType:
    def inner() -> types.FrameType:
        return sys._getframe()

    return inner()


def test_identifiers_equal_pyinstruments_for_functions_methods_and_hidden_frames() -> None:
    for frame in (
        Shape().method(),
        Shape.klass(),
        Shape.static(),
        Shape().hidden(),
        outer(),
        sys._getframe(),
    ):
        assert frame_identifier(frame) == get_frame_info(frame)


def test_a_method_is_named_by_its_defining_class() -> None:
    class Sub(Shape):
        pass

    identifier = frame_identifier(Sub().method())
    assert "\x01cShape" in identifier  # pyinstrument would say Sub: read-only costs that


def test_frame_stack_of_another_running_thread_stops_at_the_given_code() -> None:
    ready, done = threading.Event(), threading.Event()

    def spin() -> None:
        ready.set()
        done.wait(5)

    thread = threading.Thread(target=spin)
    thread.start()
    ready.wait(5)
    try:
        frame = sys._current_frames()[thread.ident or 0]
        stack = frame_stack(frame, stop=threading.Thread.run.__code__)
    finally:
        done.set()
        thread.join()
    assert stack[-1].startswith("spin\x00")
    assert stack[0].startswith("wait\x00")
    assert not any(part.startswith("run\x00") for part in stack)


def test_the_sampler_never_calls_pyinstruments_get_frame_info() -> None:
    # get_frame_info reads a method frame's locals; on another thread's frame that
    # crashed the interpreter. The sampler must only use the read-only identifiers.
    assert not hasattr(_sampler, "get_frame_info")


# -- worker jobs: the stacks a job's time goes under, shared between jobs -----------------


def _submitting_here(ident: int) -> tuple[list[str], list[str]]:
    """(the submission stack here, the same stack named afresh)."""
    frame = sys._getframe()
    return submission_stack(ident, frame), thread_stack(ident, frame)


def _submitting_there(ident: int) -> tuple[list[str], list[str]]:
    frame = sys._getframe()
    return submission_stack(ident, frame), thread_stack(ident, frame)


def test_jobs_submitted_from_one_place_share_its_stack_and_other_places_get_their_own() -> None:
    ident = threading.get_ident()
    stacks = []
    for _ in range(2):
        stacks.append(_submitting_here(ident))
    (first, named), (again, _) = stacks
    assert first == named
    assert again is first  # one list for every submission from this place
    other, other_named = _submitting_there(ident)
    assert other == other_named
    assert first[-1].startswith("_submitting_here\x00")
    assert other[-1].startswith("_submitting_there\x00")
    assert first[:-2] == other[:-2]  # the same callers below this test
    # The same function called from another line of this test is another place.
    from_another_line, _ = _submitting_here(ident)
    assert from_another_line is not first
    assert from_another_line[-2] != first[-2]  # this test's line
    assert from_another_line[-1] == first[-1]


def _a_job() -> None:
    """A job's function."""


def test_a_job_no_sample_saw_goes_under_its_function_named_through_partials() -> None:
    submitted_from = ["thread\x00<thread>\x001", "endpoint\x00app.py\x0010"]
    stack = job_stack(submitted_from, functools.partial(functools.partial(_a_job)))
    assert stack == [*submitted_from, code_head(_a_job.__code__)]
    assert job_stack(submitted_from, _a_job) is stack  # shared: same place, same function
    assert submitted_from == ["thread\x00<thread>\x001", "endpoint\x00app.py\x0010"]
    # Another submitting stack (equal, but another list) is another entry.
    assert job_stack(list(submitted_from), _a_job) is not stack
    # A callable with no code of its own: its class, in no file.
    assert job_stack(submitted_from, print)[-1] == identifier("print", UNKNOWN_FILE)
    assert job_identifier(functools.partial(_a_job)) == code_head(_a_job.__code__)


def _chunks() -> Iterator[str]:
    """A sync ``StreamingResponse`` body."""
    yield "chunk"


def _next(iterator: Iterator[str]) -> str:
    """As Starlette steps a sync body on a worker thread (``iterate_in_threadpool``)."""
    return next(iterator)


def test_a_job_stepping_a_generator_no_sample_saw_goes_under_the_generator() -> None:
    submitted_from = ["thread\x00<thread>\x001", "stream_response\x00responses.py\x00250"]
    body = _chunks()
    stack = job_stack(submitted_from, _next, (body,))
    assert stack == [*submitted_from, code_head(_chunks.__code__)]
    assert job_stack(submitted_from, _next, (_chunks(),)) is stack  # (one per place and code)
    # (hook mode names the tail of a job after its last sample the same way)
    assert job_identifier(_next, (body,)) == code_head(_chunks.__code__)
    # Anything else stepped, or more arguments: the function, as before.
    assert job_stack(submitted_from, _next, (iter(["x"]),))[-1] == code_head(_next.__code__)
    assert job_stack(submitted_from, _next, (body, 1))[-1] == code_head(_next.__code__)


def _run_sync_endpoint(*, function: Callable[..., Any], arguments: dict[str, Any]) -> Any:
    """As FastAPI runs a ``def`` endpoint on a worker thread."""
    return function(**arguments)


def test_a_def_endpoint_no_sample_saw_goes_under_the_endpoint_not_fastapis_wrapper() -> None:
    submitted_from = ["thread\x00<thread>\x001", "run_endpoint_function\x00routing.py\x00383"]
    job = functools.partial(_run_sync_endpoint, function=_a_job, arguments={})
    assert job_stack(submitted_from, job)[-1] == code_head(_a_job.__code__)
    assert job_identifier(job) == code_head(_a_job.__code__)
    # A ``function`` keyword that is no callable is an argument like any other.
    other = functools.partial(_run_sync_endpoint, function=None, arguments={})
    assert job_identifier(other) == code_head(_run_sync_endpoint.__code__)


def test_an_asyncio_to_thread_job_no_sample_saw_goes_under_its_function() -> None:
    # asyncio.to_thread(f, ...) runs partial(copy_context().run, f, ...) in the executor;
    # before, such a job went under "Context.run" (no file), not under the user's code.
    submitted_from = ["thread\x00<thread>\x001", "to_thread\x00threads.py\x0012"]
    job = functools.partial(contextvars.copy_context().run, _a_job, 1)
    assert job_stack(submitted_from, job)[-1] == code_head(_a_job.__code__)
    assert job_identifier(job) == code_head(_a_job.__code__)
    # A bare context.run (nothing to run in it named): the method, as before.
    assert job_identifier(functools.partial(contextvars.copy_context().run)).startswith(
        "Context.run\x00"
    )
