"""The always-on tick's view of waiting requests: await stacks and first sightings.

The ticks take shortcuts over many waiting requests (an await stack cached by its
coroutine chain, a first sighting credited inline); these pin down that the shortcuts
give what the general path gives. Coroutines are stepped by hand, so nothing depends on
timing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Coroutine, Generator, Iterator
from typing import Any

import pytest
from pyinstrument.frame import AWAIT_FRAME_IDENTIFIER

from otelprof_middleware import _clock
from otelprof_middleware.profiling._request_profile import RequestProfile
from otelprof_middleware.profiling.always_on._ledger import (
    Interval,
    Ledger,
    Running,
    Waiting,
    credit,
)
from otelprof_middleware.profiling.always_on._registry import LoopState
from otelprof_middleware.profiling.always_on._stacks import await_stack, chain_stack

PREFIX = ["thread\x00<thread>\x001", "run_forever\x00loop.py\x001"]


class Pending:
    """An awaitable that suspends its awaiter on itself (as a future does)."""

    def __await__(self) -> Generator[Pending, None, None]:
        yield self


async def shared_leaf() -> None:
    await Pending()


async def endpoint_one() -> None:
    await shared_leaf()


async def endpoint_two() -> None:
    await shared_leaf()


def legacy_leaf() -> Generator[Pending, None, None]:
    yield from Pending().__await__()


async def through_a_generator() -> None:
    await _GeneratorAwaitable()


class _GeneratorAwaitable:
    def __await__(self) -> Generator[Pending, None, None]:
        return legacy_leaf()


class StubTask:
    """What a tick reads of a task: its coroutine, the future it waits on, done()."""

    def __init__(self, coro: Coroutine[Any, Any, None]) -> None:
        self.coro = coro
        self._fut_waiter: object = coro.send(None)  # suspended at its first wait
        self.finished = False

    def get_coro(self) -> Coroutine[Any, Any, None]:
        return self.coro

    def done(self) -> bool:
        return self.finished


def _names(stack: list[str]) -> list[str]:
    return [identifier.split("\x00", 1)[0] for identifier in stack]


@pytest.fixture
def tasks() -> Iterator[list[StubTask]]:
    made: list[StubTask] = []
    yield made
    for task in made:
        task.coro.close()


def _task(tasks: list[StubTask], coro: Coroutine[Any, Any, None]) -> StubTask:
    task = StubTask(coro)
    tasks.append(task)
    return task


def test_two_endpoints_awaiting_the_same_function_keep_their_own_stacks(
    tasks: list[StubTask],
) -> None:
    # The cache key follows the whole chain: keyed on the innermost coroutine alone, the
    # second endpoint's wait would be shown under the first one.
    one = _task(tasks, endpoint_one())
    two = _task(tasks, endpoint_two())
    first = await_stack(PREFIX, one.get_coro())
    second = await_stack(PREFIX, two.get_coro())
    assert _names(first)[2:] == ["endpoint_one", "shared_leaf", "__await__", "[await]"]
    assert _names(second)[2:] == ["endpoint_two", "shared_leaf", "__await__", "[await]"]
    assert first[:2] == PREFIX and first[-1] == AWAIT_FRAME_IDENTIFIER
    # the same place again: the cached list itself
    again = _task(tasks, endpoint_one())
    assert await_stack(PREFIX, again.get_coro()) is first


def test_a_chain_through_a_generator_is_followed_to_its_innermost_frame(
    tasks: list[StubTask],
) -> None:
    task = _task(tasks, through_a_generator())
    stack = await_stack(PREFIX, task.get_coro())
    assert _names(stack)[2:] == ["through_a_generator", "legacy_leaf", "__await__", "[await]"]
    assert stack == [*chain_stack(PREFIX, task.get_coro()), AWAIT_FRAME_IDENTIFIER]


async def next_event() -> AsyncIterator[str]:
    while True:
        await shared_leaf()
        yield "data: 1\n\n"


async def streams_events() -> None:
    # StreamingResponse's loop over an SSE body; ``request.stream()`` and streamed
    # database cursors are consumed the same way.
    async for _ in next_event():
        pass


def test_a_chain_through_an_async_generator_is_followed_to_its_innermost_frame(
    tasks: list[StubTask],
) -> None:
    # ``async for`` leaves the consumer awaiting the generator's ``asend`` step, which has
    # no attribute to follow: the wait was shown as an ``[await]`` in the consumer (an SSE
    # stream's 30 s under Starlette's ``stream_response``), never in the generator.
    task = _task(tasks, streams_events())
    stack = await_stack(PREFIX, task.get_coro())
    assert _names(stack)[2:] == [
        "streams_events",
        "next_event",
        "shared_leaf",
        "__await__",
        "[await]",
    ]
    assert stack == [*chain_stack(PREFIX, task.get_coro()), AWAIT_FRAME_IDENTIFIER]
    # cached by the whole chain, the generator's code included
    assert await_stack(PREFIX, _task(tasks, streams_events()).get_coro()) is stack
    assert await_stack(PREFIX, _task(tasks, endpoint_one()).get_coro()) is not stack


def _loop_state(requests: dict[RequestProfile, StubTask]) -> Iterator[LoopState]:
    loop = asyncio.new_event_loop()
    try:
        state = LoopState(loop, driven=True)
        state.prefix = PREFIX
        state.requests = requests  # type: ignore[assignment]
        yield state
    finally:
        loop.close()


def _request(age: float, now: float | None = None) -> RequestProfile:
    request = RequestProfile(0.005, 10_000, None, True)
    request.start_perf = (time.perf_counter() if now is None else now) - age
    return request


@pytest.mark.parametrize("age", [0.0005, 0.5])
def test_a_first_sighting_is_credited_as_the_general_path_credits_it(
    tasks: list[StubTask], age: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = time.perf_counter()
    monkeypatch.setattr(_clock, "perf_counter", lambda: now)
    interval = Interval(now, elapsed=0.006, slept=0.004, gil_wait=0.002)
    request = _request(age, now)
    task = _task(tasks, endpoint_one())
    ledger = Ledger()
    for state in _loop_state({request: task}):
        ledger.credit_tick([state], {}, {}, interval)
    state_now = ledger.states[request]
    assert type(state_now) is Waiting and state_now.future is task._fut_waiter
    assert state_now.seen_at == interval.end
    # the general path, on a request of the same age
    expected = _request(age, now)
    credit(expected, None, Waiting(task._fut_waiter, state_now.stack, interval.end), interval)
    [(stack, seconds)] = request.records
    assert request.records == expected.records
    assert stack is state_now.stack
    assert seconds == pytest.approx(min(age, 0.004))  # its age, or GIL wait + half the sleep


def test_an_unchanged_wait_is_skipped_and_a_new_one_closes_it(tasks: list[StubTask]) -> None:
    request = _request(1.0)
    task = _task(tasks, endpoint_one())
    ledger = Ledger()
    start = time.perf_counter()
    for state in _loop_state({request: task}):
        ledger.credit_tick([state], {}, {}, Interval(start, 0.005, 0.005, 0.0))
        first_records = list(request.records)
        ledger.credit_tick([state], {}, {}, Interval(start + 0.005, 0.005, 0.005, 0.0))
        assert request.records == first_records  # same future: nothing credited yet
        task._fut_waiter = Pending()  # a new wait (same place, another future)
        ledger.credit_tick([state], {}, {}, Interval(start + 0.010, 0.005, 0.005, 0.0))
    [(stack, seconds)] = request.records  # one record: the same stack, extended
    # first sighting 0.0025, the unchanged tick credited when the wait ended (0.005),
    # then half the last interval to each side of the change (0.0025 + 0.0025)
    assert seconds == pytest.approx(0.0125)
    assert _names(stack)[-2:] == ["__await__", "[await]"]


def test_a_request_running_or_closed_is_not_seen_waiting(tasks: list[StubTask]) -> None:
    running_request, closed_request = _request(1.0), _request(1.0)
    closed_request.closed = True
    ledger = Ledger()
    running = {running_request: Running(["thread\x00<thread>\x001"])}
    requests = {
        running_request: _task(tasks, endpoint_one()),
        closed_request: _task(tasks, endpoint_two()),
    }
    for state in _loop_state(requests):
        ledger.credit_tick(
            [state], dict(running), {}, Interval(time.perf_counter(), 0.005, 0.005, 0)
        )
    assert type(ledger.states[running_request]) is Running
    assert closed_request not in ledger.states and not closed_request.records
