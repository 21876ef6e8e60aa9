"""Starlette app for the SIGPROF safety e2e tests (tests/e2e/test_sigprof_safety.py).

Wrapped in ``ProfilingMiddleware(mode="always_on", always_on_sigprof=True)``: under uvicorn
(one worker, event loop on the main thread) its requests are ticked by ``SIGPROF``. Each
endpoint runs one kind of blocking call (sqlite3, sockets, subprocess, sleep, select, pipes,
exec) *while SIGPROF ticks land*: a burner thread keeps the process CPU clock running during
the call (hashing, GIL released, with SIGPROF blocked in that thread so the kernel delivers
the signal to the other threads: the loop thread blocked in the call, mostly). The call runs
on the loop thread (``where=loop``, the default) or a worker thread (``where=thread``).

Every endpoint answers JSON with its result and ``ticks``: how many times the middleware's
SIGPROF handler ran during the call. The count comes from a wrapper around
``SigprofDriver.on_sigprof`` put on the class before any sampler exists (the driver
compares ``signal.getsignal()`` with its bound method, which stays equal), so the package
itself is not changed. A failing call answers 500 with the exception.

Environment:
    SIGPROF_APP_DIR: a writable directory (sqlite file, reports).
    SIGPROF_ECHO_URL: base URL of tests/e2e/sigprof_echo.py.
    SIGPROF_REDIS_URL: a redis-server.
    SIGPROF_USER_HANDLER: ``before``: install a user SIGPROF handler (and its own
        ITIMER_PROF timer) at import, before the middleware sees a request.
    SIGPROF_PROFILERS: comma-separated ``sentry``, ``pyroscope``: start those profilers at
        import, sending to SIGPROF_COLLECTOR_URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
import types
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from demo_app.telemetry import configure_tracing
from otelprof_middleware import ProfilingMiddleware, testing
from otelprof_middleware.profiling.always_on._sigprof import SigprofDriver

from .sigprof_echo import pattern

configure_tracing("otelprof-e2e-sigprof")

DATA_DIR = os.environ.get("SIGPROF_APP_DIR", "/tmp")
ECHO_URL = os.environ.get("SIGPROF_ECHO_URL", "")
REDIS_URL = os.environ.get("SIGPROF_REDIS_URL", "")
PYTHON = sys.executable

# -- counting the middleware's SIGPROF handler runs --------------------------------------

HANDLER_RUNS = [0]
SPINS_STARTED = [0]  # /spin requests that reached the endpoint (tests wait for one)
_original_on_sigprof = SigprofDriver.on_sigprof


def _counting_on_sigprof(self: SigprofDriver, signum: int, frame: types.FrameType | None) -> None:
    HANDLER_RUNS[0] += 1
    _original_on_sigprof(self, signum, frame)


SigprofDriver.on_sigprof = _counting_on_sigprof  # type: ignore[method-assign]


# -- a user's own SIGPROF handler ---------------------------------------------------------

USER_RUNS = [0]
USER_INTERVAL = [0.0]


def user_sigprof_handler(signum: int, frame: types.FrameType | None) -> None:
    USER_RUNS[0] += 1


def install_user_handler(interval: float) -> None:
    signal.signal(signal.SIGPROF, user_sigprof_handler)
    if interval > 0:
        signal.setitimer(signal.ITIMER_PROF, interval, interval)
    USER_INTERVAL[0] = interval


if os.environ.get("SIGPROF_USER_HANDLER") == "before":
    install_user_handler(0.01)


# -- other profilers in the same process --------------------------------------------------

PROFILERS = {p for p in os.environ.get("SIGPROF_PROFILERS", "").split(",") if p}
COLLECTOR_URL = os.environ.get("SIGPROF_COLLECTOR_URL", "")

if "sentry" in PROFILERS:
    import sentry_sdk

    host = COLLECTOR_URL.removeprefix("http://")
    sentry_sdk.init(
        dsn=f"http://publickey@{host}/1",
        profile_session_sample_rate=1.0,
        profile_lifecycle="manual",
        _experiments={"transport_compression_level": 0},
    )
    sentry_sdk.profiler.start_profiler()

if "pyroscope" in PROFILERS:
    import pyroscope  # type: ignore[import-untyped]

    pyroscope.configure(
        application_name="otelprof.sigprof-e2e",
        server_address=COLLECTOR_URL,
        sample_rate=100,
        upload_interval=1,
    )


# -- helpers ------------------------------------------------------------------------------


def sigprof_marker_spin(seconds: float) -> int:
    """Pure-Python CPU work (the handler runs between its bytecodes)."""
    start = time.thread_time()
    deadline = time.perf_counter() + 5 * seconds + 1.0
    total = 0
    while time.thread_time() - start < seconds and time.perf_counter() < deadline:
        total += sum(range(50))
    return total


AIM_EVERY = 0.005  # seconds between aimed signals (the middleware's default interval)


@contextmanager
def cpu_burner(target: list[int] | None = None) -> Iterator[None]:
    """Keep the process CPU clock running (GIL released) while the block runs, so the
    SIGPROF timer fires during a call that itself waits. The burner blocks SIGPROF: the
    kernel delivers the signal to a thread that does not.

    Which one is the kernel's choice (and sticky: the last thread chosen, while it can take
    it), so the timer's signal may keep landing on an idle thread. ``target``: also send
    SIGPROF to thread ``target[0]`` (the one in the call) every 5 ms with
    ``pthread_kill``: the same handler and flags as the timer's, aimed at the call."""
    stop = threading.Event()
    started = threading.Event()

    def burn() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPROF})
        started.set()
        data = b"\x5a" * (1 << 18)
        next_aim = time.perf_counter()
        while not stop.is_set():
            hashlib.sha256(data).digest()
            if target is not None and time.perf_counter() >= next_aim:
                next_aim += AIM_EVERY
                with contextlib.suppress(ProcessLookupError, OSError):
                    signal.pthread_kill(target[0], signal.SIGPROF)

    thread = threading.Thread(target=burn, name="sigprof-burner", daemon=True)
    thread.start()
    started.wait(5)
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def _settle() -> int:
    """A few bytecodes and a call: a pending Python signal handler runs here."""
    total = 0
    for i in range(100):
        total += i
    return total


async def measured(request: Request, call: Callable[[], Any]) -> Response:
    """Run ``call`` (on the loop or a worker thread) with the burner on, and answer its
    result with how many SIGPROF handler runs happened meanwhile.

    Query: ``where`` (``loop``/``thread``), ``burn=0`` (no burner), ``aim=0`` (the timer's
    signals only, none aimed at the call's thread)."""
    where = request.query_params.get("where", "loop")
    burn = request.query_params.get("burn", "1") == "1"
    aim = request.query_params.get("aim", "1") == "1"
    target = [threading.get_ident()]  # the loop thread, or the worker once it runs
    try:
        sigprof_marker_spin(0.01)  # in-request ticks before the call
        before = HANDLER_RUNS[0]
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if burn:
            with cpu_burner(target if aim else None):
                result = await _run(where, call, target)
        else:
            result = await _run(where, call, target)
        _settle()
        ticks = HANDLER_RUNS[0] - before
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        sigprof_marker_spin(0.01)
    except BaseException as exc:
        return JSONResponse(
            {"error": f"{type(exc).__name__}: {exc!r}", "traceback": traceback.format_exc()},
            status_code=500,
        )
    return JSONResponse(
        {"result": result, "ticks": ticks, "cpu": cpu, "wall": wall, "where": where}
    )


async def _run(where: str, call: Callable[[], Any], target: list[int]) -> Any:
    if where == "thread":

        def in_worker() -> Any:
            target[0] = threading.get_ident()
            return call()

        return await anyio.to_thread.run_sync(in_worker)
    result = call()
    if isinstance(result, Awaitable):
        result = await result
    return result


def _int(request: Request, name: str, default: int) -> int:
    return int(request.query_params.get(name, str(default)))


# -- 1. sqlite3 ---------------------------------------------------------------------------


def _sqlite_work(n: int, tag: str) -> dict[str, int]:
    path = os.path.join(DATA_DIR, "sigprof.sqlite")
    connection = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("CREATE TABLE IF NOT EXISTS rows (tag TEXT, i INTEGER, v TEXT)")
        total = connection.execute(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
            "SELECT sum(x), count(*) FROM c",
            (n,),
        ).fetchone()
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(
            "INSERT INTO rows VALUES (?, ?, ?)",
            ((tag, i, "v" * 200) for i in range(2000)),
        )
        connection.execute("COMMIT")
        rows = connection.execute(
            "SELECT count(*), sum(i), sum(length(v)) FROM rows WHERE tag = ?", (tag,)
        ).fetchone()
        connection.execute("DELETE FROM rows WHERE tag = ?", (tag,))
        return {
            "sum": total[0],
            "count": total[1],
            "rows": rows[0],
            "rows_sum": rows[1],
            "bytes": rows[2],
        }
    finally:
        connection.close()


async def sqlite_endpoint(request: Request) -> Response:
    n = _int(request, "n", 400_000)
    tag = request.query_params.get("tag", "t")
    return await measured(request, lambda: _sqlite_work(n, tag))


# -- 2. sockets: httpx to the echo server, redis-py ---------------------------------------


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _http_sync(size: int, seed: int) -> dict[str, Any]:
    import httpx

    payload = pattern(size, seed)
    with httpx.Client(base_url=ECHO_URL, timeout=30) as client:
        echoed = client.post("/echo", content=payload)
        got = client.get("/bytes", params={"n": size, "seed": seed + 1})
    return {
        "echo_ok": echoed.status_code == 200 and echoed.content == payload,
        "echo_len": len(echoed.content),
        "get_ok": got.status_code == 200 and got.content == pattern(size, seed + 1),
        "get_len": len(got.content),
    }


async def _http_async(size: int, seed: int) -> dict[str, Any]:
    import httpx

    payload = pattern(size, seed)
    async with httpx.AsyncClient(base_url=ECHO_URL, timeout=30) as client:
        echoed, got = await asyncio.gather(
            client.post("/echo", content=payload),
            client.get("/bytes", params={"n": size, "seed": seed + 1}),
        )
    return {
        "echo_ok": echoed.status_code == 200 and echoed.content == payload,
        "echo_len": len(echoed.content),
        "get_ok": got.status_code == 200 and got.content == pattern(size, seed + 1),
        "get_len": len(got.content),
    }


async def http_endpoint(request: Request) -> Response:
    size, seed = _int(request, "size", 2 << 20), _int(request, "seed", 3)
    if request.query_params.get("client") == "async":
        return await measured(request, lambda: _http_async(size, seed))
    return await measured(request, lambda: _http_sync(size, seed))


def _redis_sync(size: int, key: str) -> dict[str, Any]:
    import redis

    value = pattern(size, len(key))
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=30)
    try:
        client.set(key, value)
        got = client.get(key)
        pipe = client.pipeline()
        for i in range(4):
            pipe.set(f"{key}:{i}", value[i:])
        for i in range(4):
            pipe.get(f"{key}:{i}")
        results = pipe.execute()
        client.delete(key, *(f"{key}:{i}" for i in range(4)))
    finally:
        client.close()
    return {
        "ok": got == value,
        "len": len(got or b""),
        "pipeline_ok": all(results[4 + i] == value[i:] for i in range(4)),
    }


async def _redis_async(size: int, key: str) -> dict[str, Any]:
    import redis.asyncio

    value = pattern(size, len(key))
    client = redis.asyncio.Redis.from_url(REDIS_URL, socket_timeout=30)
    try:
        await client.set(key, value)
        got = await client.get(key)
        keys = [f"{key}:{i}" for i in range(4)]
        await asyncio.gather(*(client.set(k, value[i:]) for i, k in enumerate(keys)))
        gots = await asyncio.gather(*(client.get(k) for k in keys))
        await client.delete(key, *keys)
    finally:
        await client.aclose()
    return {
        "ok": got == value,
        "len": len(got or b""),
        "pipeline_ok": all(g == value[i:] for i, g in enumerate(gots)),
    }


async def redis_endpoint(request: Request) -> Response:
    size = _int(request, "size", 8 << 20)
    key = request.query_params.get("key", "sigprof")
    if request.query_params.get("client") == "async":
        return await measured(request, lambda: _redis_async(size, key))
    return await measured(request, lambda: _redis_sync(size, key))


# -- 3. subprocess, sleep, select, pipes --------------------------------------------------

CHILD_SPIN_PRINT = (
    "import time, sys\n"
    "end = time.perf_counter() + 0.1\n"
    "n = 0\n"
    "while time.perf_counter() < end: n += 1\n"
    "print('child-ok', sys.argv[1])\n"
)


def _subprocess_work(token: str) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run(
        [PYTHON, "-c", CHILD_SPIN_PRINT, token], capture_output=True, timeout=30, check=False
    )
    return {
        "returncode": done.returncode,
        "stdout": done.stdout.decode(),
        "stderr": done.stderr.decode()[-2000:],
        "elapsed": time.perf_counter() - started,
    }


async def subprocess_endpoint(request: Request) -> Response:
    token = request.query_params.get("token", "x")
    return await measured(request, lambda: _subprocess_work(token))


def _sleep_work(seconds: float) -> dict[str, float]:
    started = time.perf_counter()
    time.sleep(seconds)
    return {"elapsed": time.perf_counter() - started}


async def sleep_endpoint(request: Request) -> Response:
    seconds = float(request.query_params.get("seconds", "0.2"))
    return await measured(request, lambda: _sleep_work(seconds))


def _select_work(mode: str, timeout: float) -> dict[str, Any]:
    """``select`` on a pipe: nothing comes (``timeout``), or a thread writes after 0.1 s
    (``data``). ``elapsed`` counts from before that thread starts."""
    read_fd, write_fd = os.pipe()
    writer = None
    slept: list[float] = []
    try:
        started = time.perf_counter()
        if mode == "data":

            def write_later() -> None:
                begin = time.perf_counter()
                time.sleep(0.1)
                slept.append(time.perf_counter() - begin)
                os.write(write_fd, b"select-data")

            writer = threading.Thread(target=write_later)
            writer.start()
        readable, writable, errored = select.select([read_fd], [], [], timeout)
        elapsed = time.perf_counter() - started
        data = os.read(read_fd, 100).decode() if readable else ""
        if writer is not None:
            writer.join()
        return {
            "readable": len(readable),
            "writable": len(writable),
            "errored": len(errored),
            "elapsed": elapsed,
            "data": data,
            "writer_slept": slept[0] if slept else None,
        }
    finally:
        if writer is not None:
            writer.join()
        os.close(read_fd)
        os.close(write_fd)


async def select_endpoint(request: Request) -> Response:
    mode = request.query_params.get("mode", "timeout")
    timeout = float(request.query_params.get("timeout", "0.2"))
    return await measured(request, lambda: _select_work(mode, timeout))


def _pipe_work(size: int) -> dict[str, Any]:
    """One ``os.write`` of ``size`` bytes into a pipe a slow reader drains, and one
    ``os.read`` per chunk on the other side: what each single call returned."""
    read_fd, write_fd = os.pipe()
    received = bytearray()

    def reader() -> None:
        while True:
            time.sleep(0.001)
            chunk = os.read(read_fd, 16384)
            if not chunk:
                return
            received.extend(chunk)

    thread = threading.Thread(target=reader)
    thread.start()
    payload = pattern(size, 5)
    try:
        written = os.write(write_fd, payload)  # a blocking pipe: all of it, unless interrupted
        rest = written
        while rest < size:  # complete it, so the reader ends
            rest += os.write(write_fd, payload[rest:])
    finally:
        os.close(write_fd)
        thread.join(30)
        os.close(read_fd)
    return {
        "size": size,
        "first_write": written,
        "received_ok": bytes(received) == payload,
    }


async def pipe_endpoint(request: Request) -> Response:
    size = _int(request, "size", 4 << 20)
    return await measured(request, lambda: _pipe_work(size))


# -- 4. exec ------------------------------------------------------------------------------

# The exec'd program: reports what it inherited, then runs ~1 s of CPU and exits 0.
EXEC_PROGRAM = (
    "import json, signal, sys, time\n"
    "report = {'itimer_prof': signal.getitimer(signal.ITIMER_PROF),\n"
    "          'sigprof': str(signal.getsignal(signal.SIGPROF))}\n"
    "with open(sys.argv[1], 'w') as f: json.dump(report, f)\n"
    "end = time.process_time() + float(sys.argv[2])\n"
    "n = 0\n"
    "while time.process_time() < end: n += 1\n"
    "with open(sys.argv[1] + '.done', 'w') as f: f.write(str(n))\n"
)


def exec_program_argv(report: str, cpu_seconds: float = 1.0) -> list[str]:
    return [PYTHON, "-c", EXEC_PROGRAM, report, str(cpu_seconds)]


def _fork_exec_work(report: str) -> dict[str, Any]:
    """Fork; the child execs the program at once. The parent waits for it."""
    argv = exec_program_argv(report)
    pid = os.fork()
    if pid == 0:  # the child: nothing but exec (a failure exits 99)
        try:
            os.execv(argv[0], argv)
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    return {
        "exitcode": os.waitstatus_to_exitcode(status),
        "report": _read_json(report),
        "done": os.path.exists(report + ".done"),
    }


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


async def fork_exec_endpoint(request: Request) -> Response:
    report = os.path.join(DATA_DIR, request.query_params.get("report", "fork-exec.json"))
    return await measured(request, lambda: _fork_exec_work(report))


async def execv_endpoint(request: Request) -> Response:
    """Replace this server process with the program: now, from the request itself (its
    profile is running), or ``delay`` seconds later from a thread (no request in flight)."""
    report = os.path.join(DATA_DIR, request.query_params.get("report", "execv.json"))
    delay = float(request.query_params.get("delay", "0"))
    argv = exec_program_argv(report)
    state = _sigprof_state()
    with open(report + ".before", "w") as f:
        json.dump(state, f)
    if delay <= 0:
        sigprof_marker_spin(0.02)  # the request is being ticked: the timer is armed
        os.execv(argv[0], argv)

    def later() -> None:
        time.sleep(delay)
        with open(report + ".before", "w") as f:
            json.dump(_sigprof_state(), f)
        os.execv(argv[0], argv)

    threading.Thread(target=later, daemon=True).start()
    return JSONResponse({"scheduled": delay, "state": state})


# -- state, CPU load, user handler, other profilers ----------------------------------------


def _sigprof_state() -> dict[str, Any]:
    status = testing.always_on_status()
    handler = signal.getsignal(signal.SIGPROF)
    return {
        "handler": getattr(handler, "__qualname__", str(handler)),
        "handler_is_ours": status.sigprof_handler_is_ours,
        "handler_is_user": handler is user_sigprof_handler,
        "itimer_prof": list(signal.getitimer(signal.ITIMER_PROF)),
        "timer_armed": status.timer_armed,
        "handler_runs": HANDLER_RUNS[0],
        "spins_started": SPINS_STARTED[0],
        "user_runs": USER_RUNS[0],
        "user_interval": USER_INTERVAL[0],
        "driven": status.main_loop_driven,
        "samples": status.ticks,
        "sampler_interval": None if status.interval_ms is None else status.interval_ms / 1000,
        "pid": os.getpid(),
        "loop": _loop_kind(),
    }


def _loop_kind() -> str:
    try:
        return type(asyncio.get_running_loop()).__module__
    except RuntimeError:  # not on the loop thread
        return ""


async def state_endpoint(request: Request) -> Response:
    return JSONResponse(_sigprof_state())


async def spin_endpoint(request: Request) -> Response:
    SPINS_STARTED[0] += 1
    ms = float(request.query_params.get("ms", "30"))
    before = HANDLER_RUNS[0]
    user_before = USER_RUNS[0]
    value = sigprof_marker_spin(ms / 1000)
    await asyncio.sleep(0.001)
    value += sigprof_marker_spin(ms / 1000)
    _settle()
    return JSONResponse(
        {
            "value": value,
            "ticks": HANDLER_RUNS[0] - before,
            "user_ticks": USER_RUNS[0] - user_before,
        }
    )


async def install_user_handler_endpoint(request: Request) -> Response:
    interval = float(request.query_params.get("interval", "0.01"))
    before = _sigprof_state()
    install_user_handler(interval)
    return JSONResponse({"before": before, "after": _sigprof_state()})


async def flush_profilers_endpoint(request: Request) -> Response:
    flushed: dict[str, Any] = {}
    if "sentry" in PROFILERS:
        import sentry_sdk

        sentry_sdk.profiler.stop_profiler()  # ends the chunk: the buffer is sent
        sentry_sdk.flush(timeout=10)
        flushed["sentry"] = True
    if "pyroscope" in PROFILERS:
        import pyroscope

        await asyncio.sleep(1.0)  # one more upload interval
        flushed["pyroscope"] = bool(pyroscope.shutdown())
    return JSONResponse(flushed)


app = ProfilingMiddleware(
    Starlette(
        routes=[
            Route("/sqlite", sqlite_endpoint),
            Route("/http", http_endpoint),
            Route("/redis", redis_endpoint),
            Route("/subprocess", subprocess_endpoint),
            Route("/sleep", sleep_endpoint),
            Route("/select", select_endpoint),
            Route("/pipe", pipe_endpoint),
            Route("/fork-exec", fork_exec_endpoint),
            Route("/execv", execv_endpoint),
            Route("/state", state_endpoint),
            Route("/spin", spin_endpoint),
            Route("/user-handler/install", install_user_handler_endpoint),
            Route("/profilers/flush", flush_profilers_endpoint),
        ]
    ),
    mode="always_on",
    sample_rate=1.0,
    min_duration_ms=0,
    store="memory://",
    # SIGPROF_TEST_DRIVER=default: the package's own default driver (no SIGPROF).
    always_on_sigprof=None if os.environ.get("SIGPROF_TEST_DRIVER") == "default" else True,
    debug_route=True,
    max_concurrent=64,
)
