"""Run the benchmark: real servers, ``wrk`` load, every variant in the same run.

Usage::

    python -m bench.run            # quick (~2 min): 2 s per measurement, 1 round
    python -m bench.run --full     # 10 s, 3 rounds, /io connection sweep, 5 min memory phase
    python -m bench.run --rounds 3 --duration 5 --sweep --memory-minutes 3 --out DIR

For each server (uvicorn + Starlette, gunicorn gthread + Flask), each round and each
variant (order rotated every round), a fresh server is started pinned to CPU 0, warmed
up, then each endpoint is loaded by ``wrk`` pinned to CPU 1. Per measurement: req/s,
p50/p99, non-2xx and socket errors, server CPU time per request (``/proc``), and per
server run: RSS at the end and our drop/failure counters. Also measured: the in-process
start+stop cost of one profile (``bench.overhead``) and, when asked, RSS under sustained
fully profiled load.

Writes ``OUT/results.json`` (every measurement, machine info) and ``OUT/results.md``
(tables and the budget of issue 5). The benchmark reports; it never fails because of
the numbers. Exit status 1 only when the harness itself broke (a server did not start).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    COMPETITOR_VARIANTS,
    CONNECTIONS,
    ENDPOINTS,
    SERVER_NAMES,
    SINK_VARIANTS,
    SWEEP_CONNECTIONS,
    SWEEP_VARIANTS,
    VARIANTS,
    package_versions,
)
from bench.report import render

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
MEMORY_SAMPLE_SECONDS = 10.0
CPU_BOUND = ("/tiny", "/cpu")
"""Endpoints that keep the (one-CPU) server busy: it should get all of its CPU."""
MIN_CPU_SHARE = 0.85
"""Below this share of its CPU on a CPU-bound endpoint, other load disturbed the server."""
VERSIONED = (
    "otelprof-middleware",
    "pyinstrument",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-instrumentation-asgi",
    "opentelemetry-instrumentation-wsgi",
    "uvicorn",
    "uvloop",
    "httptools",
    "gunicorn",
    "starlette",
    "flask",
)


# --- plan --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """What to run; built from the command line."""

    mode: str
    rounds: int
    duration: int
    warmup: int
    servers: tuple[str, ...]
    variants: tuple[str, ...]
    sweep: bool
    memory_minutes: float
    overhead_repeats: int
    out: Path
    pin: bool
    retries: int
    code: str
    code_dir: Path = ROOT
    """Where the servers import ``bench`` and ``otelprof_middleware`` from."""


def _parse_args(argv: Sequence[str] | None) -> Plan:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description="otelprof-middleware benchmark"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="~2 minutes (default)")
    mode.add_argument("--full", action="store_true", help="10 s x 3 rounds, sweep, memory")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--rounds", type=int, help="rounds (quick 1, full 3)")
    parser.add_argument("--duration", type=int, help="seconds per measurement (quick 2, full 10)")
    parser.add_argument("--warmup", type=int, help="warm-up seconds per server (quick 1, full 3)")
    parser.add_argument(
        "--sweep",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="/io connection sweep 8/32/64 for otel, reference, ours_all, ours_defaults and "
        "ours_1pct (default: full only)",
    )
    parser.add_argument(
        "--memory-minutes",
        type=float,
        help="memory phase length: ours_all on /io, 64 connections (quick 0 = off, full 5)",
    )
    parser.add_argument("--servers", default="asgi,wsgi", help="comma-separated: asgi,wsgi")
    parser.add_argument(
        "--variants",
        default=",".join(v for v in VARIANTS if v not in COMPETITOR_VARIANTS),
        help="comma-separated (default: all but the other profilers, "
        + ", ".join(COMPETITOR_VARIANTS)
        + ")",
    )
    parser.add_argument("--overhead-repeats", type=int, help="in-process repeats (1000 / 5000)")
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="repeat a disturbed /tiny or /cpu measurement (server below "
        f"{MIN_CPU_SHARE * 100:.0f}%% of its CPU: other load on the machine) up to N times",
    )
    parser.add_argument(
        "--code",
        choices=("head", "worktree", "live"),
        default="head",
        help="which otelprof_middleware the servers run: 'head' (default) a copy of the "
        "committed HEAD, 'worktree' a copy of the working tree, both taken at start so "
        "edits during the run do not mix versions; 'live' the tree as it is at each start",
    )
    args = parser.parse_args(argv)
    full = bool(args.full)
    servers = tuple(s for s in args.servers.split(",") if s)
    variants = tuple(v for v in args.variants.split(",") if v)
    for server in servers:
        if server not in SERVER_NAMES:
            parser.error(f"unknown server {server!r}")
    for variant in variants:
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant!r}")

    def pick(value: Any, quick: Any, long: Any) -> Any:
        return value if value is not None else (long if full else quick)

    return Plan(
        mode="full" if full else "quick",
        rounds=max(1, pick(args.rounds, 1, 3)),
        duration=max(1, pick(args.duration, 2, 10)),
        warmup=max(1, pick(args.warmup, 1, 3)),
        servers=servers,
        variants=variants,
        sweep=pick(args.sweep, False, True),
        memory_minutes=max(0.0, pick(args.memory_minutes, 0.0, 5.0)),
        overhead_repeats=max(10, pick(args.overhead_repeats, 1000, 5000)),
        out=args.out,
        pin=len(os.sched_getaffinity(0)) >= 2,
        retries=max(0, args.retries),
        code=args.code,
    )


# --- processes ---------------------------------------------------------------------


def _pinned(cpu: int, argv: list[str], plan: Plan) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if plan.pin else argv


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _server_argv(server: str, port: int) -> list[str]:
    if server == "asgi":
        return [
            PYTHON,
            "-m",
            "uvicorn",
            "bench.apps:asgi_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--workers",
            "1",
            "--log-level",
            "warning",
        ]
    return [
        PYTHON,
        "-m",
        "gunicorn",
        "bench.apps:wsgi_app",
        "-k",
        "gthread",
        "--threads",
        "8",
        "-w",
        "1",
        "-b",
        f"127.0.0.1:{port}",
        "--graceful-timeout",
        "3",
        "--log-level",
        "warning",
    ]


def _server_env(
    server: str, variant: str, cpu_iterations: int, state_dir: str, code_dir: Path
) -> dict[str, str]:
    # No OTEL_* / OTELPROF_* from the caller's shell: every run sees the same settings.
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OTEL_", "OTELPROF_"))
    }
    env.update(
        OTELPROF_BENCH_VARIANT=variant,
        OTELPROF_BENCH_SERVER=server,
        OTELPROF_BENCH_CPU_ITERATIONS=str(cpu_iterations),
        OTELPROF_STATE_DIR=state_dir,
        OTEL_SERVICE_NAME="otelprof-bench",
        PYTHONPATH=os.pathsep.join(p for p in (str(code_dir), env.get("PYTHONPATH", "")) if p),
    )
    return env


@dataclass(slots=True)
class Server:
    """A running server subprocess, in its own process group."""

    server: str
    variant: str
    port: int
    process: subprocess.Popen[bytes]
    state_dir: str
    log_path: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def _running(
    server: str, variant: str, plan: Plan, cpu_iterations: int, log_name: str
) -> Iterator[Server]:
    state_dir = tempfile.mkdtemp(prefix="otelprof-bench-")
    port = _free_port()
    log_path = plan.out / "logs" / f"{log_name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = _server_env(server, variant, cpu_iterations, state_dir, plan.code_dir)
    sink: subprocess.Popen[bytes] | None = None
    if variant in SINK_VARIANTS:
        # The profiles go to a local sink on the load generator's core, as they would
        # go to a collector (or Pyroscope, or Sentry) on another machine.
        sink_port = _free_port()
        sink = subprocess.Popen(
            _pinned(1, [PYTHON, "-m", "bench.otlp_sink", str(sink_port)], plan),
            cwd=plan.code_dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{sink_port}"
        env["OTELPROF_BENCH_SINK"] = f"http://127.0.0.1:{sink_port}"
    try:
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                _pinned(0, _server_argv(server, port), plan),
                cwd=plan.code_dir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as one, by its id
            )
        running = Server(server, variant, port, process, state_dir, log_path)
        try:
            _wait_ready(running)
            yield running
        finally:
            _stop(process)
            shutil.rmtree(state_dir, ignore_errors=True)
    finally:
        if sink is not None:
            _stop(sink)


def _wait_ready(server: Server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{server.server}/{server.variant} exited with {server.process.returncode}; "
                f"see {server.log_path}"
            )
        try:
            with urllib.request.urlopen(server.base + "/tiny", timeout=2.0) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{server.server}/{server.variant} not ready after {timeout:.0f} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _fetch_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30.0) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


# --- /proc -------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # after "pid (comm) "


def _tree(root: int) -> list[int]:
    """``root`` and all its live descendants (gunicorn master + worker)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                parents[int(entry)] = int(_stat_fields(int(entry))[1])
    found = [root]
    index = 0
    while index < len(found):
        found.extend(pid for pid, ppid in parents.items() if ppid == found[index])
        index += 1
    return found


def _cpu_ticks(root: int) -> int:
    total = 0
    for pid in _tree(root):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = _stat_fields(pid)
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total


def _thread_ticks(root: int) -> dict[str, int]:
    """CPU ticks per thread, keyed ``"pid/tid"`` (``tid == pid``: the main thread)."""
    result: dict[str, int] = {}
    for pid in _tree(root):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                    fields = text[text.rindex(")") + 2 :].split()
                    result[f"{pid}/{tid}"] = int(fields[11]) + int(fields[12])
    return result


def _thread_split(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """CPU seconds of the processes' main threads and of all their other threads."""
    main = other = 0
    for key, ticks in after.items():
        delta = ticks - before.get(key, 0)
        pid, tid = key.split("/")
        if pid == tid:
            main += delta
        else:
            other += delta
    return {"main_thread_cpu_s": main / CLK_TCK, "other_threads_cpu_s": other / CLK_TCK}


def _rss_kb(root: int) -> dict[int, int]:
    result: dict[int, int] = {}
    for pid in _tree(root):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    result[pid] = int(line.split()[1])
    return result


# --- wrk ---------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_PERCENTILE = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_REQUESTS = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)")
_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def parse_wrk(text: str) -> dict[str, Any]:
    """req/s, requests, latency percentiles (ms), non-2xx and socket errors from wrk."""
    percentiles = {
        f"p{m.group(1)}_ms": float(m.group(2)) * _UNITS[m.group(3)]
        for m in _PERCENTILE.finditer(text)
    }
    requests = _REQUESTS.search(text)
    rps = _RPS.search(text)
    if requests is None or rps is None:
        raise ValueError(f"unexpected wrk output:\n{text}")
    socket_errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    if found := _SOCKET.search(text):
        socket_errors = dict(zip(socket_errors, map(int, found.groups()), strict=True))
    non_2xx = _NON_2XX.search(text)
    return {
        "rps": float(rps.group(1)),
        "requests": int(requests.group(1)),
        "elapsed_s": float(requests.group(2)) * _UNITS[requests.group(3)] / 1e3,
        **percentiles,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": socket_errors,
    }


def _wrk_argv(url: str, connections: int, seconds: float, plan: Plan) -> list[str]:
    return _pinned(
        1,
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "--latency",
            url,
        ],
        plan,
    )


def _warm_up(server: Server, plan: Plan) -> None:
    """All endpoints at once, so the warm-up costs ``plan.warmup`` seconds per server."""
    runs = [
        subprocess.Popen(
            _wrk_argv(server.base + endpoint, 8, plan.warmup, plan),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for endpoint in ENDPOINTS
    ]
    for run in runs:
        run.wait(timeout=plan.warmup + 60)


def _settle(root: int, timeout: float = 15.0, window: float = 0.25) -> float:
    """Wait until the server is idle (requests left over from the last load finished).

    Returns the seconds waited. Idle: under 5% of a CPU over ``window``.
    """
    began = time.monotonic()
    last = _cpu_ticks(root)
    while time.monotonic() - began < timeout:
        time.sleep(window)
        now = _cpu_ticks(root)
        if (now - last) / CLK_TCK <= window * 0.05:
            break
        last = now
    return time.monotonic() - began


def _measure(
    server: Server, endpoint: str, connections: int, plan: Plan, round_no: int, kind: str
) -> dict[str, Any]:
    root = server.process.pid
    settle_s = _settle(root)
    before = _cpu_ticks(root)
    threads_before = _thread_ticks(root)
    completed = subprocess.run(
        _wrk_argv(server.base + endpoint, connections, plan.duration, plan),
        capture_output=True,
        text=True,
        timeout=plan.duration + 120,
        check=True,
    )
    after = _cpu_ticks(root)
    threads = _thread_split(threads_before, _thread_ticks(root))
    result = parse_wrk(completed.stdout)
    cpu_seconds = (after - before) / CLK_TCK
    share = cpu_seconds / result["elapsed_s"] if result["elapsed_s"] else 0.0
    return {
        "server": server.server,
        "variant": server.variant,
        "endpoint": endpoint,
        "connections": connections,
        "round": round_no,
        "kind": kind,
        **result,
        "server_cpu_s": cpu_seconds,
        **threads,
        "cpu_share": share,
        "disturbed": endpoint in CPU_BOUND and share < MIN_CPU_SHARE,
        "settle_s": round(settle_s, 2),
        "cpu_us_per_req": cpu_seconds * 1e6 / result["requests"] if result["requests"] else None,
    }


# --- phases ------------------------------------------------------------------------


@dataclass(slots=True)
class Results:
    """Everything ``results.json`` holds."""

    meta: dict[str, Any]
    measurements: list[dict[str, Any]] = field(default_factory=list)
    server_runs: list[dict[str, Any]] = field(default_factory=list)
    overhead: dict[str, Any] = field(default_factory=dict)
    memory: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _rotated(variants: tuple[str, ...], round_no: int) -> tuple[str, ...]:
    shift = round_no % len(variants)
    return variants[shift:] + variants[:shift]


def _load_phase(plan: Plan, results: Results, cpu_iterations: int) -> None:
    for round_no in range(plan.rounds):
        for server_name in plan.servers:
            for variant in _rotated(plan.variants, round_no):
                _log(f"round {round_no + 1}/{plan.rounds} {server_name} {variant}")
                try:
                    _run_variant(server_name, variant, round_no, plan, results, cpu_iterations)
                except Exception as exc:  # the harness broke: record, go on, exit 1
                    message = f"{server_name}/{variant} round {round_no + 1}: {exc!r}"
                    _log("ERROR " + message)
                    results.errors.append(message)


def _run_variant(
    server_name: str,
    variant: str,
    round_no: int,
    plan: Plan,
    results: Results,
    cpu_iterations: int,
) -> None:
    began = time.monotonic()
    log_name = f"{server_name}-{variant}-r{round_no + 1}"
    measurements: list[dict[str, Any]] = []
    with _running(server_name, variant, plan, cpu_iterations, log_name) as server:
        _warm_up(server, plan)
        for endpoint in ENDPOINTS:
            connections = CONNECTIONS[endpoint]
            for attempt in range(plan.retries + 1):
                row = _measure(server, endpoint, connections, plan, round_no, "main")
                row["attempt"] = attempt
                measurements.append(row)
                if not (row["disturbed"] and attempt < plan.retries):
                    break
                row["kind"] = "disturbed"  # kept in results.json, left out of the tables
                _log(f"  {endpoint}: server had {row['cpu_share']:.0%} of its CPU; again")
        if plan.sweep and variant in SWEEP_VARIANTS:
            for connections in SWEEP_CONNECTIONS:
                if connections != CONNECTIONS["/io"]:  # that one is the main /io run
                    measurements.append(
                        _measure(server, "/io", connections, plan, round_no, "sweep")
                    )
        rss = _rss_kb(server.process.pid)
        counters = _fetch_json(server.base + "/_bench/counters")
    results.measurements.extend(measurements)
    results.server_runs.append(
        {
            "server": server_name,
            "variant": variant,
            "round": round_no,
            "rss_kb": {str(pid): kb for pid, kb in rss.items()},
            "rss_mb": sum(rss.values()) / 1024.0,
            "counters": counters,
            "wall_s": time.monotonic() - began,
        }
    )


def _memory_phase(plan: Plan, results: Results, cpu_iterations: int) -> None:
    seconds = plan.memory_minutes * 60.0
    for server_name in plan.servers:
        _log(f"memory {server_name} ours_all /io 64 connections, {plan.memory_minutes:g} min")
        try:
            with _running(
                server_name, "ours_all", plan, cpu_iterations, f"{server_name}-memory"
            ) as server:
                _warm_up(server, plan)
                samples: list[tuple[float, float]] = []
                root = server.process.pid
                _settle(root)
                began = time.monotonic()
                before = _cpu_ticks(root)
                wrk_log = plan.out / "logs" / f"{server_name}-memory-wrk.txt"
                with wrk_log.open("w") as wrk_out:
                    load = subprocess.Popen(
                        _wrk_argv(server.base + "/io", 64, seconds, plan),
                        stdout=wrk_out,
                        stderr=subprocess.STDOUT,
                    )
                    try:
                        while load.poll() is None:
                            rss_mb = sum(_rss_kb(root).values()) / 1024.0
                            samples.append((time.monotonic() - began, rss_mb))
                            with contextlib.suppress(subprocess.TimeoutExpired):
                                load.wait(timeout=MEMORY_SAMPLE_SECONDS)
                    finally:
                        if load.poll() is None:
                            load.kill()
                        load.wait()
                samples.append((time.monotonic() - began, sum(_rss_kb(root).values()) / 1024.0))
                cpu_seconds = (_cpu_ticks(root) - before) / CLK_TCK
                counters = _fetch_json(server.base + "/_bench/counters")
        except Exception as exc:
            message = f"{server_name}/memory: {exc!r}"
            _log("ERROR " + message)
            results.errors.append(message)
            continue
        load_result = parse_wrk(wrk_log.read_text())
        # Baseline: the sample nearest to minute 1 (or a third of the run, if shorter).
        baseline_at = min(60.0, seconds / 3.0)
        baseline = min(samples, key=lambda sample: abs(sample[0] - baseline_at))
        results.memory.append(
            {
                "server": server_name,
                "variant": "ours_all",
                "endpoint": "/io",
                "connections": 64,
                "minutes": plan.memory_minutes,
                "samples": [{"t_s": t, "rss_mb": mb} for t, mb in samples],
                "baseline_t_s": baseline[0],
                "baseline_mb": baseline[1],
                "end_mb": samples[-1][1],
                "max_mb": max(mb for _, mb in samples),
                "growth_mb": samples[-1][1] - baseline[1],
                "load": load_result,
                "cpu_us_per_req": cpu_seconds * 1e6 / load_result["requests"]
                if load_result["requests"]
                else None,
                "counters": counters,
            }
        )


def _overhead_phase(plan: Plan, results: Results) -> None:
    _log(f"in-process start+stop overhead, {plan.overhead_repeats} repeats")
    try:
        completed = subprocess.run(
            _pinned(
                0,
                [PYTHON, "-m", "bench.overhead", "--repeats", str(plan.overhead_repeats)],
                plan,
            ),
            cwd=plan.code_dir,
            env=_server_env("none", "bare", 1, tempfile.gettempdir(), plan.code_dir),
            capture_output=True,
            text=True,
            timeout=900,
            check=True,
        )
        results.overhead = json.loads(completed.stdout)
    except Exception as exc:
        stderr = getattr(exc, "stderr", "") or ""
        message = f"overhead: {exc!r} {stderr[-2000:]}"
        _log("ERROR " + message)
        results.errors.append(message)


def _calibrate(plan: Plan) -> int:
    """The ``/cpu`` iteration count, calibrated once (pinned, unprofiled) for all servers."""
    completed = subprocess.run(
        _pinned(0, [PYTHON, "-c", "import bench.apps as a; print(a.CPU_ITERATIONS)"], plan),
        cwd=plan.code_dir,
        env={
            **_server_env("wsgi", "bare", 1, tempfile.gettempdir(), plan.code_dir),
            "OTELPROF_BENCH_CPU_ITERATIONS": "",
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return int(completed.stdout.strip().splitlines()[-1])


# --- code snapshot -----------------------------------------------------------------


def _git(*args: str) -> str:
    completed = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return completed.stdout.strip()


def _snapshot(source: str) -> tuple[Path, dict[str, Any]]:
    """Copy ``otelprof_middleware`` (from HEAD or the working tree) and ``bench``.

    Others may edit the tree while a long run goes on; every server of the run then
    imports the same code. Returns the directory and what identifies the code.
    """
    target = Path(tempfile.mkdtemp(prefix="otelprof-bench-code-"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results")
    shutil.copytree(ROOT / "bench", target / "bench", ignore=ignore)
    commit = _git("rev-parse", "--short", "HEAD") or None
    if source == "head" and commit:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", "HEAD", "otelprof_middleware"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
        changes: list[str] = []
    else:
        source = "worktree"
        shutil.copytree(ROOT / "otelprof_middleware", target / "otelprof_middleware", ignore=ignore)
        changes = _git("status", "--porcelain", "--", "otelprof_middleware").splitlines()
    digest = hashlib.sha256()
    for path in sorted((target / "otelprof_middleware").rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(target)).encode())
            digest.update(path.read_bytes())
    return target, {
        "source": source,
        "git_commit": commit,
        "package_changes_vs_commit": [line.strip() for line in changes],
        "package_sha256": digest.hexdigest()[:16],
    }


# --- machine -----------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line),
        platform.processor() or "unknown",
    )
    meminfo = Path("/proc/meminfo").read_text()
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1))  # type: ignore[union-attr]
    versions = package_versions(VERSIONED)
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "mem_total_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "wrk": (wrk.stdout or wrk.stderr or "wrk ?").splitlines()[0].split(" Copyright")[0],
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def _check_tools() -> None:
    for module in ("uvloop", "httptools", "uvicorn", "gunicorn"):
        __import__(module)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found on PATH (Debian: apt-get install wrk)")


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- main --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; write ``results.json`` and ``results.md``. Returns the exit code."""
    plan = _parse_args(argv)
    _check_tools()
    if plan.pin and shutil.which("taskset") is None:
        plan = Plan(**{**asdict(plan), "pin": False})
    plan.out.mkdir(parents=True, exist_ok=True)
    code: dict[str, Any] = {
        "source": "live",
        "git_commit": _git("rev-parse", "--short", "HEAD") or None,
        "package_changes_vs_commit": _git(
            "status", "--porcelain", "--", "otelprof_middleware"
        ).splitlines(),
    }
    if plan.code != "live":
        code_dir, code = _snapshot(plan.code)
        plan = Plan(**{**asdict(plan), "code_dir": code_dir})
    started = time.time()
    began = time.monotonic()
    results = Results(
        meta={
            "mode": plan.mode,
            "command": " ".join(["python -m bench.run", *(argv or sys.argv[1:])]),
            "plan": {**asdict(plan), "out": str(plan.out), "code_dir": str(plan.code_dir)},
            "code": code,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
            "machine": _machine(),
            "connections": CONNECTIONS,
            "pinning": "server on CPU 0, wrk on CPU 1" if plan.pin else "none (fewer than 2 CPUs)",
        }
    )
    try:
        cpu_iterations = _calibrate(plan)
        results.meta["cpu_iterations"] = cpu_iterations
        _log(f"/cpu: {cpu_iterations} x fib(12) per request (~5 ms unprofiled)")
        _overhead_phase(plan, results)
        _load_phase(plan, results, cpu_iterations)
        if plan.memory_minutes > 0:
            _memory_phase(plan, results, cpu_iterations)
    finally:
        results.meta["elapsed_s"] = round(time.monotonic() - began, 1)
        results.meta["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        data = asdict(results)
        (plan.out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
        (plan.out / "results.md").write_text(render(data))
        _log(f"wrote {plan.out / 'results.json'} and {plan.out / 'results.md'}")
        _log(f"took {results.meta['elapsed_s']:.0f} s")
        if plan.code_dir != ROOT:
            shutil.rmtree(plan.code_dir, ignore_errors=True)
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main())
