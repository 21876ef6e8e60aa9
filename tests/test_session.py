from __future__ import annotations

import asyncio
import sys
import threading

from pyinstrument.stack_sampler import build_call_stack

from otelprof_middleware.profiling import _thread_hook
from otelprof_middleware.profiling._loop_hook import HookedCoroutine, install_task_factory
from otelprof_middleware.profiling._request_profile import RequestProfile, current_request
from otelprof_middleware.profiling._thread_hook import thread_hook

from .helpers import marker_alpha, marker_beta, text_of


def _new_request(name: str) -> RequestProfile:
    return RequestProfile(
        interval=0.001,
        max_samples=10_000,
        start_call_stack=build_call_stack(sys._getframe(1), "initial", None),
        description=name,
    )


async def _profiled(name: str, work: object, out: dict[str, str]) -> None:
    request = _new_request(name)
    token = current_request.set(request)
    install_task_factory(asyncio.get_running_loop())

    async def body() -> None:
        await asyncio.sleep(0.003)
        work()  # type: ignore[operator]
        await asyncio.sleep(0.003)

    try:
        await HookedCoroutine(body(), request, main=True)
    finally:
        request.closed = True
        current_request.reset(token)
    out[name] = text_of(request.to_session(0.05))


def test_concurrent_tasks_never_mix() -> None:
    out: dict[str, str] = {}

    async def main() -> None:
        await asyncio.gather(
            *[_profiled(f"a{i}", marker_alpha, out) for i in range(6)],
            *[_profiled(f"b{i}", marker_beta, out) for i in range(6)],
        )

    asyncio.run(main())
    assert len(out) == 12
    for name, text in out.items():
        own, other = (
            ("marker_alpha", "marker_beta") if name[0] == "a" else ("marker_beta", "marker_alpha")
        )
        assert own in text, name
        assert other not in text, f"{name} holds {other}:\n{text}"
        assert "[await]" in text  # the sleeps show as awaits, as in pyinstrument's async mode


def test_hook_is_removed_when_the_last_request_ends_and_threads_are_independent() -> None:
    seen: dict[str, str] = {}

    def worker(name: str, work: object) -> None:
        request = _new_request(name)
        token = current_request.set(request)
        hook = thread_hook(0.001)
        hook.acquire()
        work()  # type: ignore[operator]
        request.closed = True
        hook.release()
        current_request.reset(token)
        assert sys.getprofile() is None
        seen[name] = text_of(request.to_session(0.02))

    threads = [
        threading.Thread(target=worker, args=(f"t{i}", marker_alpha if i % 2 else marker_beta))
        for i in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, text in seen.items():
        own = "marker_alpha" if int(name[1]) % 2 else "marker_beta"
        other = "marker_beta" if own == "marker_alpha" else "marker_alpha"
        assert own in text and other not in text


def test_a_collection_on_another_thread_does_not_keep_this_threads_hook() -> None:
    """The garbage collector's callbacks are called here as the collector calls them: a
    collection on another thread (whose finalizers let this thread run mid-collection)
    leaves this thread's hook free to go; one on this thread keeps it until its next
    request (removing it from inside its own C hook is unsafe)."""
    _thread_hook._follow_collections()
    request = _new_request("gc")
    token = current_request.set(request)
    hook = thread_hook(0.001)
    other = threading.Thread(target=_thread_hook._note_collection, args=("start", {}))
    try:
        other.start()
        other.join()  # a collection "runs" on that thread
        hook.acquire()
        hook.release()
        assert sys.getprofile() is None
        _thread_hook._note_collection("start", {})  # one on this thread
        hook.acquire()
        hook.release()
        assert sys.getprofile() is not None  # left installed, unused
    finally:
        _thread_hook._note_collection("stop", {})
        hook.acquire()  # this thread's next request...
        hook.release()  # ...releases it from its own code
        current_request.reset(token)
    assert sys.getprofile() is None


def test_sample_cap_counts_dropped_samples() -> None:
    request = RequestProfile(interval=0.001, max_samples=10, start_call_stack=[], description="x")
    for _ in range(25):
        request.add(["root\x00file\x001"], 0.001)
    assert len(request.records) == 10
    assert request.dropped_samples == 15
    assert "15 samples dropped" in request.to_session(0.1).target_description


def test_equal_samples_in_a_row_share_a_record_and_each_still_counts() -> None:
    """Always-on merges equal stacks in a row into one record (memory); the profile's
    sample count must still say how many samples were taken: a request that spent 120 ms
    in one call at a 5 ms interval said "Samples: 1"."""
    request = RequestProfile(0.005, 10, [], True)
    spinning, waiting = ["root\x00file\x001", "spin\x00file\x002"], ["root\x00file\x001"]
    for _ in range(24):
        request.add(spinning, 0.005)
    for _ in range(3):
        request.add_wait(waiting, 0.005)
    request.add(waiting, 0.005, waiting=True)
    assert len(request.records) == 3
    assert request.samples == 28
    session = request.to_session(0.14)
    assert session.sample_count == 28
    assert len(session.frame_records) == 3


def test_dropped_samples_are_not_counted_as_recorded() -> None:
    request = RequestProfile(0.005, 10, [], True)
    for index in range(25):  # each stack differs from the last: a record each
        request.add([f"f{index}\x00file\x001"], 0.005)
    assert (request.samples, request.dropped_samples) == (10, 15)
    assert request.to_session(0.1).sample_count == 10


def test_a_hook_exception_never_reaches_user_code() -> None:
    class Exploding(RequestProfile):
        def add(self, stack: list[str], seconds: float) -> None:
            raise RuntimeError("boom")

    request = Exploding(interval=0.0001, max_samples=10, start_call_stack=[], description="x")
    token = current_request.set(request)
    hook = thread_hook(0.0001)
    hook.acquire()
    try:
        assert marker_alpha(0.01) > 0  # user code runs normally
    finally:
        request.closed = True
        hook.release()
        current_request.reset(token)
    from otelprof_middleware._failsafe import snapshot

    assert snapshot().get("failed.sample", 0) > 0
