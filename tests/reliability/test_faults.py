"""Fault injection: whatever breaks inside the profiler, the app's responses do not change.

For each fault, against both adapters: 20 requests, 0 failures (status, headers and
body identical to the unprofiled twin), no hang, the fault counted and logged once,
and profiling back once the fault is gone. Store-level faults on a real SQLite file
(locked, full, read-only, unusable directory) are in ``test_store_faults.py``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from pyinstrument.low_level.stat_profile import setstatprofile

from otelprof_middleware import counters
from otelprof_middleware.profiling import _loop_hook, _thread_hook, _worker_threads
from otelprof_middleware.profiling._thread_hook import ThreadHook
from otelprof_middleware.viewer import _render as viewer_render

from ..helpers import server_spans, text_of
from .harness import (
    BATCH,
    FaultyStore,
    Harness,
    Kind,
    assert_profiling_resumes,
    check_batch,
    logged_stages,
    record,
    send_batch,
)

MakeHarness = Callable[..., Harness]
SYNC_REQUESTS = BATCH.count("/sync")


def _raising_when(real: Callable[..., Any], *, installing: bool) -> Callable[..., Any]:
    """``setstatprofile`` that raises when installing (``installing``) or removing a hook."""

    def setstatprofile(*args: Any, **kwargs: Any) -> Any:
        target = args[0] if args else kwargs.get("target")
        if (target is not None) == installing:
            raise RuntimeError("injected: pyinstrument could not change the hook")
        return real(*args, **kwargs)

    return setstatprofile


def _raising_release(self: ThreadHook) -> None:
    raise RuntimeError("injected: release failed")


def _one_profile_page(harness: Harness) -> str:
    """The viewer page (path and query) of the one profile kept of a ``/cpu`` request."""
    assert harness.get("/cpu").status == 200
    assert harness.core.writer.flush(10)
    [summary] = harness.current_store().list()
    return f"/debug/profile/{summary.trace_id}?span_id={summary.span_id}"


def test_hook_install_raising(
    kind: Kind,
    harnesses: MakeHarness,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    harness = harnesses(kind, FaultyStore())
    with monkeypatch.context() as patch:
        raising = _raising_when(setstatprofile, installing=True)
        patch.setattr(_thread_hook, "setstatprofile", raising)  # a thread's hook (WSGI)
        patch.setattr(_loop_hook, "setstatprofile", raising)  # a task's steps (ASGI)
        check_batch(
            "hook install raises",
            harness,
            counter="failed.profiler.start",
            expected=len(BATCH),
        )
        assert logged_stages(caplog) == ["profiler.start"]
        assert harness.core.hook_start.slots_in_use == 0, "a concurrency slot was not given back"
        assert not harness.hook_left()
        assert len(harness.current_store().list()) == 0
    assert_profiling_resumes(harness)


def test_hook_removal_raising(
    kind: Kind,
    harnesses: MakeHarness,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """pyinstrument refuses to remove the hook (ThreadHook.release raises)."""
    harness = harnesses(kind, FaultyStore())
    with monkeypatch.context() as patch:
        raising = _raising_when(setstatprofile, installing=False)
        patch.setattr(_thread_hook, "setstatprofile", raising)
        patch.setattr(_loop_hook, "setstatprofile", raising)
        seen = check_batch(
            "hook removal raises",
            harness,
            counter="failed.profiler.stop",
            expected=len(BATCH),
            at_least=kind == "asgi",  # once per step of the request's task: several
        )
        assert logged_stages(caplog) == ["profiler.stop"]
        # The profile is still kept: stopping failed, not the request's samples.
        assert len(harness.current_store().list()) == len(BATCH)
        # The orphaned hook stays (it never removes itself from inside pyinstrument's
        # callback: that freed state the C code still used); it samples nothing.
        assert seen.get("failed.sample", 0) == 0
        assert harness.hook_left()
    assert_profiling_resumes(harness)  # ... and, once removing works, it is gone


def test_release_raising_is_counted_and_profiling_resumes(
    kind: Kind,
    harnesses: MakeHarness,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``ThreadHook.release`` itself raises before doing anything."""
    if kind == "asgi":
        pytest.skip("on an event loop the hook lives in the task's steps, not a ThreadHook")
    harness = harnesses(kind, FaultyStore())
    with monkeypatch.context() as patch:
        patch.setattr(ThreadHook, "release", _raising_release)
        check_batch(
            "ThreadHook.release raises",
            harness,
            counter="failed.profiler.stop",
            expected=len(BATCH),
        )
        assert logged_stages(caplog) == ["profiler.stop"]
    harness.exporter.clear()
    result = send_batch(harness, BATCH[:4])
    assert result.failures == []
    assert harness.core.writer.flush(10)
    assert all(
        s.attributes and "otelprof.profile.url" in s.attributes
        for s in server_spans(harness.exporter)
    )


def test_release_raising_leaves_no_hook_behind(
    kind: Kind, harnesses: MakeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kind == "asgi":
        pytest.skip("on an event loop the hook lives in the task's steps, not a ThreadHook")
    harness = harnesses(kind, FaultyStore())
    with monkeypatch.context() as patch:
        patch.setattr(ThreadHook, "release", _raising_release)
        assert send_batch(harness, BATCH[:4]).failures == []
    assert send_batch(harness, BATCH[:4]).failures == []
    assert not harness.hook_left(), "the hook is still installed after the fault cleared"


def test_worker_thread_hook_raising(
    kind: Kind, harnesses: MakeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = harnesses(kind, FaultyStore())
    with monkeypatch.context() as patch:
        patch.setattr(
            _worker_threads, "setstatprofile", _raising_when(setstatprofile, installing=True)
        )
        check_batch(
            "worker-thread hook raises (_worker_threads.run_profiled)",
            harness,
            counter="failed.profiler.worker",
            expected=SYNC_REQUESTS,
        )
        # the request's own profile is still kept, only the worker's frames are missing
        assert len(harness.current_store().list()) == len(BATCH)
    assert_profiling_resumes(harness)  # /sync shows marker_beta from the worker again


def test_worker_thread_hook_raising_is_logged_once(
    kind: Kind,
    harnesses: MakeHarness,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    harness = harnesses(kind, FaultyStore())
    with monkeypatch.context() as patch:
        patch.setattr(
            _worker_threads, "setstatprofile", _raising_when(setstatprofile, installing=True)
        )
        assert send_batch(harness).failures == []
    assert counters().get("failed.profiler.worker") == SYNC_REQUESTS
    assert logged_stages(caplog) == ["profiler.worker"]


def test_store_put_raising(
    kind: Kind, harnesses: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    store = FaultyStore()
    harness = harnesses(kind, store)
    store.failing = {"put"}
    check_batch(
        "store put raises",
        harness,
        counter="failed.store.put",
        expected=len(BATCH),
    )
    assert logged_stages(caplog) == ["store.put"]
    store.failing = set()
    assert_profiling_resumes(harness)


def test_store_get_and_list_raising(
    kind: Kind, harnesses: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """Reading fails: the viewer answers 503, the app and the writer are unaffected."""
    store = FaultyStore()
    harness = harnesses(kind, store)
    page = _one_profile_page(harness) + "&format=text"
    store.failing = {"get", "list"}
    check_batch("store get/list raise", harness, counter="written", expected=len(BATCH) + 1)
    statuses = [harness.get(path).status for path in ("/debug/profile", page) * 3]
    assert statuses == [503] * 6
    assert counters()["failed.viewer.store"] == 6
    assert logged_stages(caplog) == ["viewer.store"]
    store.failing = set()
    assert harness.get("/debug/profile").status == 200
    assert harness.get(page).status == 200
    assert_profiling_resumes(harness)


def test_renderer_raising(
    kind: Kind,
    harnesses: MakeHarness,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    harness = harnesses(kind, FaultyStore())
    page = _one_profile_page(harness)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected: renderer failed")

    with monkeypatch.context() as patch:
        patch.setattr(viewer_render, "render", broken)
        check_batch("renderer raises", harness, counter="written", expected=len(BATCH) + 1)
        formats = ("html", "text", "speedscope", "json", "folded")
        # The html format's frame renders nothing; pyinstrument's page inside it does.
        flame = page.replace("?span_id=", "/flame?span_id=")
        answers = [harness.get(f"{page}&format={fmt}") for fmt in formats[1:]]
        answers.append(harness.get(flame))
        assert harness.get(page).status == 200
        assert [a.status for a in answers] == [422] * len(formats)
        assert all(b"Traceback" not in a.body and b"injected" not in a.body for a in answers)
        assert counters()["failed.viewer.render"] == len(formats)
        assert logged_stages(caplog) == ["viewer.render"]
    assert harness.get(f"{page}&format=text").status == 200
    assert_profiling_resumes(harness)


def test_corrupt_stored_profile(
    kind: Kind, harnesses: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    store = FaultyStore()
    harness = harnesses(kind, store)
    page = _one_profile_page(harness) + "&format=text"
    store.corrupt = True
    assert [harness.get(page).status for _ in range(3)] == [422] * 3
    assert counters()["failed.viewer.decode"] == 3
    assert logged_stages(caplog) == ["viewer.decode"]
    store.corrupt = False
    assert harness.get(page).status == 200


def test_writer_queue_full(kind: Kind, harnesses: MakeHarness) -> None:
    """A store that blocks: the queue (size 1) fills, profiles are dropped, never waited for."""
    store = FaultyStore()
    store.put_gate = gate = threading.Event()
    harness = harnesses(kind, store, writer_queue_size=1)
    result = send_batch(harness)
    seen = counters()
    record("writer queue full (size 1, store blocked)", harness, result, seen)
    assert result.failures == []
    # one profile in the writer's hands, one queued, the rest dropped
    dropped = seen.get("dropped.queue_full", 0)
    assert len(BATCH) - 2 <= dropped <= len(BATCH) - 1, seen
    assert len(store.list()) == 0  # nothing written while the store blocks
    gate.set()
    assert harness.core.writer.flush(10)
    assert counters()["written"] == len(BATCH) - dropped
    store.put_gate = None
    assert_profiling_resumes(harness, one_at_a_time=True)


def test_writer_queue_full_is_logged_once(
    kind: Kind, harnesses: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    store = FaultyStore()
    store.put_gate = threading.Event()
    harness = harnesses(kind, store, writer_queue_size=1)
    assert send_batch(harness).failures == []
    assert counters().get("dropped.queue_full", 0) >= len(BATCH) - 2
    store.put_gate.set()
    warnings = [r for r in caplog.records if r.name == "otelprof_middleware"]
    assert len([r for r in warnings if "queue" in r.getMessage()]) == 1


def test_worker_thread_that_never_returns(kind: Kind, harnesses: MakeHarness) -> None:
    """A ``def`` endpoint blocks: its request waits for it, nothing else does."""
    harness = harnesses(kind, FaultyStore())
    blocked = harness.submit("/block")
    assert harness.gate.entered.wait(10), "the blocking endpoint never started"
    result = send_batch(harness)
    record("worker thread never returns (/block)", harness, result, counters())
    assert result.failures == []
    assert harness.core.writer.flush(10), "the writer hung behind the blocked request"
    assert len(harness.current_store().list()) == len(BATCH)  # profiled and stored meanwhile
    assert not blocked.done(), "the blocked request should still be waiting for its work"
    harness.gate.release.set()
    harness.plain_gate.release.set()
    assert blocked.result(10) == harness.plain("/block")
    assert harness.core.writer.flush(10)
    [block] = [s for s in harness.current_store().list(limit=1000) if s.route == "/block"]
    assert block.status_code == 200
    [stored] = harness.current_store().get(block.trace_id, block.span_id)
    assert "wait" in text_of(stored.session())
    assert harness.core.hook_start.slots_in_use == 0
    assert_profiling_resumes(harness)


def _assert_kept_as_failed(harness: Harness, count: int) -> None:
    """``count`` profiles kept, all of failed (500) requests that ran marker_alpha."""
    assert harness.core.writer.flush(10)
    summaries = harness.current_store().list()
    assert len(summaries) == count
    assert {s.status_code for s in summaries} == {500}
    [stored] = harness.current_store().get(summaries[0].trace_id)
    assert "marker_alpha" in text_of(stored.session())


def test_app_exception_response_identical_and_profile_kept(
    kind: Kind, harnesses: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    harness = harnesses(kind, FaultyStore())
    result = send_batch(harness, ["/fail"] * 5)
    record("app raises (/fail)", harness, result, counters())
    assert result.failures == []
    assert harness.get("/fail").status == 500
    _assert_kept_as_failed(harness, 6)
    assert logged_stages(caplog) == []
    assert not harness.hook_left()


@pytest.mark.parametrize("path", ["/fail", "/crash"])
def test_app_exception_propagates_unchanged(kind: Kind, harnesses: MakeHarness, path: str) -> None:
    """A server that sees app exceptions sees the very same one; the profile is kept.

    ``/fail`` raises inside the framework (Starlette answers 500 then re-raises; Flask
    propagates), ``/crash`` raises before any response was started.
    """
    harness = harnesses(kind, FaultyStore())
    if kind == "wsgi":
        harness.app.config["PROPAGATE_EXCEPTIONS"] = True  # type: ignore[attr-defined]
        harness.plain_app.config["PROPAGATE_EXCEPTIONS"] = True  # type: ignore[attr-defined]
    ours = harness.submit(path, raise_app_exceptions=True).exception(10)
    theirs = harness.submit_plain(path, raise_app_exceptions=True).exception(10)
    assert ours is not None and theirs is not None
    assert (type(ours), str(ours)) == (type(theirs), str(theirs))
    if kind == "asgi":  # a server that answers app exceptions itself: same answer
        assert harness.get(path) == harness.plain(path)
    _assert_kept_as_failed(harness, 2 if kind == "asgi" else 1)
    assert not harness.hook_left()


def test_faults_are_logged_again_after_the_interval(
    harnesses: MakeHarness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Rate-limited, not silenced: one warning per stage per interval."""
    from otelprof_middleware import _failsafe

    store = FaultyStore()
    store.failing = {"put"}
    harness = harnesses("asgi", store)
    monkeypatch.setattr(_failsafe, "LOG_INTERVAL_SECONDS", 0.2)
    assert send_batch(harness, BATCH[:4]).failures == []
    assert harness.core.writer.flush(10)
    assert logged_stages(caplog) == ["store.put"]
    time.sleep(0.3)
    assert send_batch(harness, BATCH[:4]).failures == []
    assert harness.core.writer.flush(10)
    assert logged_stages(caplog) == ["store.put", "store.put"]
    assert counters()["failed.store.put"] == 8
