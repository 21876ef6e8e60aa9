"""Interleaved A/B on real servers: several variants (or builds) alive at once, one path.

``bench.run`` starts a fresh server per variant in turn, so a machine that gets busier
or quieter between two variants moves their ratio. Here every server runs for the whole
measurement, and each round loads them one after the other (the order reversed every
other round): a drift of the machine hits all of them alike, and the per-round ratios
against the first server are steadier. For one endpoint and small differences (a few
points of ``/tiny``), this is the figure to quote; ``bench.run`` is the overview.

Each spec is ``VARIANT:CODE_DIR[:NAME=VALUE,...]``: the ``bench.apps`` variant, the
directory whose ``bench`` and ``otelprof_middleware`` the server imports (another build:
a ``git worktree``), and extra environment variables::

    python -m bench.ab --server asgi --path /tiny otel:. floor:. lean:. ours_defaults:.
    python -m bench.ab --server wsgi --rounds 6 otel:. ours_defaults:. \\
        ours_defaults:.:OTELPROF_ALWAYS_ON_INTERVAL_MS=1000
    python -m bench.ab otel:. ours_defaults:. ours_defaults:../old-build

Servers are pinned to CPU 0 and ``wrk -t1`` to CPU 1, as in ``bench.run``. Prints each
round's req/s and server CPU µs per request, then per spec the medians and the median
(min to max) of the per-round ratios to the first spec.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.run import (
    CLK_TCK,
    Server,
    _cpu_ticks,
    _free_port,
    _server_argv,
    _server_env,
    _settle,
    _stop,
    _tree,
    _wait_ready,
    parse_wrk,
)

__all__ = ["main"]


@dataclass
class _Measured:
    spec: str
    running: Server
    code_dir: Path
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # server CPU per request


def _start(spec: str, server: str, cpu_iterations: int) -> _Measured:
    """Start ``spec``'s server as ``bench.run`` does (its environment, pinned to CPU 0)."""
    variant, code, *rest = spec.split(":", 2)
    code_dir = Path(code).resolve()
    state_dir = tempfile.mkdtemp(prefix="otelprof-ab-")
    env = _server_env(server, variant, cpu_iterations, state_dir, code_dir)
    for pair in rest[0].split(",") if rest else ():
        name, _, value = pair.partition("=")
        env[name] = value
    port = _free_port()
    while port in _PORTS_TAKEN:  # (two specs once got one port: the second server failed
        port = _free_port()  # to bind, and its rounds measured the first one)
    _PORTS_TAKEN.add(port)
    log_path = Path(tempfile.gettempdir()) / f"otelprof-ab-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["taskset", "-c", "0", *_server_argv(server, port)],
            cwd=code_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return _Measured(spec, Server(server, variant, port, process, state_dir, log_path), code_dir)


_PORTS_TAKEN: set[int] = set()


def _check_serves_its_code(measured: _Measured) -> None:
    """Fail unless ``measured``'s own server answers on its port, with its own code."""
    running = measured.running
    with urllib.request.urlopen(running.base + "/_bench/counters", timeout=5.0) as response:
        served = json.load(response)
    package = Path(served.get("package_path", ""))
    pid = int(served.get("pid", 0))
    if pid not in _tree(running.process.pid) or measured.code_dir not in package.parents:
        raise RuntimeError(
            f"{measured.spec}: port {running.port} is served by {served.get('variant')} "
            f"from {package} (pid {pid}), not by this spec's server; see {running.log_path}"
        )


def _wrk(port: int, path: str, connections: int, seconds: int) -> str:
    command = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s"]
    url = f"http://127.0.0.1:{port}{path}"
    return subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout


def _ratios(values: list[float], base: list[float]) -> str:
    ratios = [value / reference for value, reference in zip(values, base, strict=True)]
    return f"x{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=("asgi", "wsgi"), default="asgi")
    parser.add_argument("--path", default="/tiny")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=int, default=4, help="seconds per measurement")
    parser.add_argument("--cpu-iterations", type=int, default=397, help="/cpu's fib(12) calls")
    parser.add_argument("specs", nargs="+", help="VARIANT:CODE_DIR[:NAME=VALUE,...]")
    args = parser.parse_args()
    servers: list[_Measured] = []
    try:
        for spec in args.specs:
            servers.append(_start(spec, args.server, args.cpu_iterations))
        for server in servers:
            _wait_ready(server.running)
        for server in servers:
            _check_serves_its_code(server)
        for server in servers:  # warm-up
            _wrk(server.running.port, args.path, args.connections, 1)
        for round_number in range(args.rounds):
            order = servers if round_number % 2 == 0 else servers[::-1]
            for server in order:
                pid, port = server.running.process.pid, server.running.port
                _settle(pid)
                before = _cpu_ticks(pid)
                result = parse_wrk(_wrk(port, args.path, args.connections, args.duration))
                ticks = _cpu_ticks(pid) - before
                server.rps.append(result["rps"])
                server.cpu_us.append(ticks / CLK_TCK * 1e6 / max(1, result["requests"]))
            print(
                f"round {round_number + 1}: "
                + "  ".join(f"{s.spec} {s.rps[-1]:.0f}/{s.cpu_us[-1]:.0f}" for s in servers),
                flush=True,
            )
        base = servers[0]
        heading = f"{args.server} {args.path} @ {args.connections}"
        print(f"{heading}, {args.rounds} rounds of {args.duration} s; ratios to {base.spec}:")
        for server in servers:
            rps = f"req/s {statistics.median(server.rps):7.0f} {_ratios(server.rps, base.rps)}"
            cpu = statistics.median(server.cpu_us)
            print(
                f"  {server.spec:45s} {rps}   CPU µs/req {cpu:6.1f} "
                + _ratios(server.cpu_us, base.cpu_us)
            )
    finally:
        for server in servers:
            _stop(server.running.process)
            shutil.rmtree(server.running.state_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
