"""Frame identifiers built for other threads' frames match pyinstrument's own."""

from __future__ import annotations

import sys
import threading
import types

from pyinstrument.low_level.stat_profile import get_frame_info

from otelprof_middleware.profiling._frames import frame_identifier, frame_stack
from otelprof_middleware.profiling.always_on import _sampler


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
