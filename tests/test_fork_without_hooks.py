"""A worker forked by C code, without ``os.register_at_fork``'s hooks, as uWSGI forks its
workers from the process that loaded the app (unless ``--py-call-osafterfork``).

When that process had served a request (a warm-up at import), its sampler thread, which
no child inherits, still looked alive to the workers (the package's pid was kept by a
hook that never ran): every always-on profile of a worker came out empty, and the
workers started from the master's counters. ``libc``'s ``fork()`` through ctypes is
such a fork.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
import warnings
from typing import Any

import pytest
from flask import Flask, Response

from otelprof_middleware import WSGIProfilingMiddleware, counters
from otelprof_middleware.profiling.always_on._sampler import current_sampler
from otelprof_middleware.stores import MemoryStore

from .helpers import marker_alpha, text_of

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


def _c_fork() -> int:
    """``fork()`` as C code calls it: none of ``os.register_at_fork``'s hooks run.

    Through ``PyDLL``, which keeps the GIL during the call: ``CDLL`` releases it, and a
    thread of ours that took it at the fork (the sampler thread going idle after the
    warm-up) left it held for good in the child, which hung, and this test with it (as
    a uWSGI worker forked after a warm-up hung: see ``_fork.may_profile_here``).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid: int = ctypes.PyDLL(None).fork()
    return pid


def _get(app: Any, path: str) -> None:
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": None,
    }
    body = app(environ, lambda status, headers, exc_info=None: None)
    b"".join(body)
    body.close()  # type: ignore[attr-defined]


def test_a_worker_forked_without_the_hooks_profiles_its_requests(
    otel: Any, closing: list[Any]
) -> None:
    store = MemoryStore()
    app = Flask(__name__)

    @app.get("/work")
    def work() -> Response:
        marker_alpha(0.2)
        return Response("done")

    middleware = WSGIProfilingMiddleware(
        app.wsgi_app,
        tracer_provider=otel[0],
        profile_store=store,
        mode="always_on",
        min_duration_ms=0,
    )
    closing.append(middleware)
    _get(middleware, "/work")  # the warm-up: the sampler thread starts in this process
    middleware.core.writer.flush()
    assert "marker_alpha" in text_of(store.get(store.list()[0].trace_id)[0].session())
    assert counters().get("written") == 1

    # As in a uWSGI process that forks after a warm-up: our threads there wait (the
    # sampler thread idles with no event loop to watch). Forked while one of them ran, the
    # child's Python thread state is that thread's too, and starting a thread hung there.
    sampler = current_sampler()
    assert sampler is not None
    deadline = time.monotonic() + 5
    while not sampler.thread._idle and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    read, write = os.pipe()
    pid = _c_fork()
    if pid == 0:  # the worker
        result: dict[str, Any] = {}
        try:
            os.close(read)
            result["counters_at_start"] = counters()
            before = {s.trace_id for s in store.list()}
            _get(middleware, "/work")
            middleware.core.writer.flush()
            [summary] = [s for s in store.list() if s.trace_id not in before]
            result["has_marker"] = "marker_alpha" in text_of(
                store.get(summary.trace_id)[0].session()
            )
            result["samples"] = summary.sample_count
        except BaseException as exc:
            result["error"] = repr(exc)
        finally:
            os.write(write, json.dumps(result).encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        result = json.loads(pipe.read() or b"{}")
    os.waitpid(pid, 0)
    assert "error" not in result, result
    assert result["samples"] > 0 and result["has_marker"], result
    assert result["counters_at_start"] == {}, "the worker started from the parent's counts"
