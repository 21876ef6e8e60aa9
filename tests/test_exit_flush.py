"""A worker that multiprocessing forked ends with ``os._exit`` once its target returns:
multiprocessing runs its own exit finalizers there, never ``atexit``. granian's workers
are such processes (a WSGI app there has no lifespan to flush at either): the profiles
still queued for the writer must be written before the worker ends."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

from otelprof_middleware import WSGIProfilingMiddleware
from otelprof_middleware.profiling._keeper import Keeper
from otelprof_middleware.stores import SQLiteStore

from .helpers import make_provider, marker_alpha, slow_writes


def _app(environ: dict[str, object], start_response: object) -> list[bytes]:
    marker_alpha(0.005)
    start_response("200 OK", [("Content-Type", "text/plain")])  # type: ignore[operator]
    return [b"done"]


def _keeping_every_profile(app: Any, store: SQLiteStore) -> WSGIProfilingMiddleware:
    """``app`` behind the middleware, every request profiled and kept into ``store``."""
    return WSGIProfilingMiddleware(
        app,
        tracer_provider=make_provider()[0],
        profile_store=store,
        sample_rate=1.0,
        min_duration_ms=0,
    )


def _serve_one(middleware: WSGIProfilingMiddleware) -> None:
    """One request through ``middleware``, its body read and closed, as a server does."""
    environ: dict[str, object] = {}
    setup_testing_defaults(environ)
    body = middleware(environ, lambda status, headers, exc_info=None: None)
    assert b"".join(body) == b"done"
    body.close()  # type: ignore[attr-defined]


def _serve_one_request_then_return(path: str) -> None:
    _serve_one(_keeping_every_profile(_app, slow_writes(SQLiteStore)(path)))
    # The target returns at once: the profile is still with the writer (0.3 s to write).


def _profiles_stored_by_a_forked_worker(target: Callable[[str], None], tmp_path: Path) -> int:
    """Run ``target`` (given a SQLite store's path) in a worker multiprocessing forks, as
    granian's: how many profiles its store holds once the worker has ended."""
    path = str(tmp_path / "profiles.db")
    worker = multiprocessing.get_context("fork").Process(target=target, args=(path,))
    worker.start()
    worker.join(20)
    assert worker.exitcode == 0
    store = SQLiteStore(path)
    try:
        return len(store.list())
    finally:
        store.close()


def test_a_forked_multiprocessing_worker_writes_its_last_profiles(tmp_path: Path) -> None:
    assert _profiles_stored_by_a_forked_worker(_serve_one_request_then_return, tmp_path) == 1


def _finish_on_a_server_thread_while_the_worker_returns(path: str) -> None:
    """As in a granian worker: the request's body is closed (its profile kept) on a server
    thread, while the worker's main thread returns as soon as the response is out."""
    keep = Keeper.keep

    def slow_keep(self: Keeper, *args: object, **kwargs: object) -> None:
        time.sleep(0.3)  # (the profile is being built when the worker returns)
        keep(self, *args, **kwargs)  # type: ignore[arg-type]

    Keeper.keep = slow_keep  # type: ignore[method-assign]
    body_sent = threading.Event()

    def app(environ: dict[str, object], start_response: object) -> Iterator[bytes]:
        marker_alpha(0.005)
        start_response("200 OK", [("Content-Type", "text/plain")])  # type: ignore[operator]
        yield b"done"
        body_sent.set()  # the last bytes are out: the server's worker may now return

    middleware = _keeping_every_profile(app, SQLiteStore(path))
    threading.Thread(target=_serve_one, args=(middleware,), daemon=True).start()
    assert body_sent.wait(10)


def test_a_profile_kept_on_a_server_thread_as_the_worker_ends_is_written(
    tmp_path: Path,
) -> None:
    stored = _profiles_stored_by_a_forked_worker(
        _finish_on_a_server_thread_while_the_worker_returns, tmp_path
    )
    assert stored == 1
