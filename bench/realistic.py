"""What the no-argument middleware costs on realistic apps, measured as a user would.

Usage (the apps need SQLAlchemy 2.0 and OTel's SQLAlchemy, httpx and requests
instrumentations: ``pip install -e '.[bench]'``)::

    python -m bench.realistic                       # 5 rounds x 10 s, both servers (~30 min)
    python -m bench.realistic --rounds 2 --duration 3 --servers asgi --endpoints /items/7

Two apps with the same endpoints (:mod:`bench.realistic_apps`): FastAPI under uvicorn (one
worker, uvloop, httptools) and Flask under gunicorn gthread (one worker, 8 threads). Each
is started twice and both copies run for the whole server phase: ``otel`` (OpenTelemetry as
users set it up: the framework's instrumentor, SQLAlchemy and HTTP-client spans, a
``BatchSpanProcessor`` into the OTLP/HTTP exporter to ``bench.otlp_sink``) and ``ours``
(the same plus ``ProfilingMiddleware`` / ``WSGIProfilingMiddleware`` with no arguments).
Both servers are pinned to CPU 0; ``wrk``, the upstream service and the OTLP sink to CPU 1.

For each endpoint and connection count, ``--rounds`` rounds; in each, ``wrk`` loads one
variant then the other for ``--duration`` seconds (the order alternates every round: A/B,
B/A, ...), so the machine's other load hits both alike. Per measurement: req/s, p50/p99 from
``wrk``, and the server's CPU time (utime + stime of the process tree from ``/proc``) per
request. Per round: the ratios ours/otel. The report gives the medians of those per-round
ratios and their range (min-max), in ``OUT/results.md``; every measurement is in
``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.common import package_versions
from bench.run import CLK_TCK, _cpu_ticks, _free_port, _settle, _stop, parse_wrk

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
VARIANTS = ("otel", "ours")
DASH, TIMES = "\u2013", "\u00d7"
ENDPOINTS = {
    "asgi": ("/items/7", "/page/7", "/upstream", "/sleep"),
    "wsgi": ("/items/7", "/page/7", "/upstream", "/sleep"),
}
SERVER_NAMES = {
    "asgi": "uvicorn + FastAPI",
    "wsgi": "gunicorn gthread (8 threads) + Flask",
}
VERSIONED = (
    "fastapi",
    "flask",
    "uvicorn",
    "gunicorn",
    "sqlalchemy",
    "pydantic",
    "jinja2",
    "httpx",
    "requests",
    "pyinstrument",
    "opentelemetry-sdk",
    "opentelemetry-instrumentation-fastapi",
    "opentelemetry-instrumentation-flask",
    "opentelemetry-instrumentation-sqlalchemy",
    "opentelemetry-instrumentation-httpx",
    "opentelemetry-instrumentation-requests",
)


def _log(message: str) -> None:
    print(f"[realistic {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.realistic", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="A/B rounds (default 5)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up seconds per endpoint")
    parser.add_argument("--connections", default="8,64", help="comma-separated (8,64)")
    parser.add_argument("--servers", default="asgi,wsgi", help="comma-separated: asgi,wsgi")
    parser.add_argument("--endpoints", default="", help="comma-separated (default: all four)")
    parser.add_argument(
        "--exporter",
        choices=("otlp", "drop"),
        default="otlp",
        help="spans to bench.otlp_sink over OTLP/HTTP (default) or dropped in-process",
    )
    parser.add_argument(
        "--ours-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for ours only, e.g. OTELPROF_ALWAYS_ON_INTERVAL_MS=20 (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "realistic")
    args = parser.parse_args(argv)
    args.connections = tuple(int(c) for c in args.connections.split(",") if c)
    args.servers = tuple(s for s in args.servers.split(",") if s)
    for server in args.servers:
        if server not in SERVER_NAMES:
            parser.error(f"unknown server {server!r}")
    args.endpoints = tuple(e for e in args.endpoints.split(",") if e)
    if any("=" not in item for item in args.ours_env):
        parser.error("--ours-env takes NAME=VALUE")
    args.ours_env = dict(item.split("=", 1) for item in args.ours_env)
    args.pin = len(os.sched_getaffinity(0)) >= 2 and shutil.which("taskset") is not None
    return args


def _pinned(cpu: int, argv: list[str], pin: bool) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if pin else argv


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as one, by its id
        )


def _server_argv(server: str, port: int) -> list[str]:
    if server == "asgi":
        return [
            PYTHON, "-m", "uvicorn", "bench.realistic_apps.fastapi_app:app",
            "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop",
            "--http", "httptools", "--no-access-log", "--workers", "1",
            "--log-level", "warning",
        ]  # fmt: skip
    return [
        PYTHON, "-m", "gunicorn", "bench.realistic_apps.flask_app:app",
        "-k", "gthread", "--threads", "8", "-w", "1", "-b", f"127.0.0.1:{port}",
        "--graceful-timeout", "3", "--log-level", "warning",
    ]  # fmt: skip


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {process.returncode}; see {log}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2.0) as response:
            if response.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after 60 s; see {log}")


@contextlib.contextmanager
def _servers(
    server: str, base_env: dict[str, str], args: argparse.Namespace
) -> Iterator[dict[str, tuple[str, subprocess.Popen[bytes]]]]:
    """Both variants' servers, running together: ``{variant: (base URL, process)}``."""
    running: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}
    state_dirs: list[str] = []
    try:
        for variant in VARIANTS:
            port = _free_port()
            state_dir = tempfile.mkdtemp(prefix="realapp-state-")
            state_dirs.append(state_dir)
            env = {
                **base_env,
                "REALAPP_VARIANT": variant,
                "OTELPROF_STATE_DIR": state_dir,
                "OTEL_SERVICE_NAME": f"realapp-{server}-{variant}",
                **(args.ours_env if variant == "ours" else {}),
            }
            log = args.out / "logs" / f"{server}-{variant}.log"
            process = _spawn(_pinned(0, _server_argv(server, port), args.pin), env, log)
            running[variant] = (f"http://127.0.0.1:{port}", process)
            _wait_ready(f"http://127.0.0.1:{port}/sleep", process, log)
        yield running
    finally:
        for _, process in running.values():
            _stop(process)
        for state_dir in state_dirs:
            shutil.rmtree(state_dir, ignore_errors=True)


def _wrk(url: str, connections: int, seconds: int, pin: bool) -> subprocess.CompletedProcess[str]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "--latency"]
    return subprocess.run(
        _pinned(1, [*argv, url], pin),
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=True,
    )


def _measure(url: str, root: int, connections: int, args: argparse.Namespace) -> dict[str, Any]:
    settle_s = _settle(root)
    before = _cpu_ticks(root)
    completed = _wrk(url, connections, args.duration, args.pin)
    cpu_s = (_cpu_ticks(root) - before) / CLK_TCK
    result = parse_wrk(completed.stdout)
    requests = result["requests"]
    return {
        **result,
        "server_cpu_s": cpu_s,
        "cpu_share": cpu_s / result["elapsed_s"] if result["elapsed_s"] else 0.0,
        "cpu_us_per_req": cpu_s * 1e6 / requests if requests else None,
        "settle_s": round(settle_s, 2),
    }


def _run_server(
    server: str, base_env: dict[str, str], args: argparse.Namespace, rows: list[dict[str, Any]]
) -> None:
    endpoints = args.endpoints or ENDPOINTS[server]
    with _servers(server, base_env, args) as running:
        for variant, (base, _) in running.items():  # warm up: every endpoint, both copies
            for endpoint in endpoints:
                _wrk(base + endpoint, 8, args.warmup, args.pin)
            _log(f"{server} {variant} warmed up")
        for endpoint in endpoints:
            for connections in args.connections:
                for round_no in range(args.rounds):
                    order = VARIANTS if round_no % 2 == 0 else VARIANTS[::-1]
                    line = []
                    for variant in order:
                        base, process = running[variant]
                        row = _measure(base + endpoint, process.pid, connections, args)
                        row.update(
                            server=server,
                            variant=variant,
                            endpoint=endpoint,
                            connections=connections,
                            round=round_no,
                        )
                        rows.append(row)
                        bad = row["non_2xx"] + sum(row["socket_errors"].values())
                        line.append(
                            f"{variant} {row['rps']:.0f} req/s {row['cpu_us_per_req']:.0f} µs"
                            + (f" ({bad} errors)" if bad else "")
                        )
                    _log(f"{server} {endpoint} @{connections} r{round_no + 1}: " + ", ".join(line))


# --- report ------------------------------------------------------------------------


def _ratios(rows: list[dict[str, Any]], key: str) -> list[float]:
    """Per round: ours / otel for ``key``."""
    by_round: dict[int, dict[str, float]] = {}
    for row in rows:
        if row.get(key):
            by_round.setdefault(row["round"], {})[row["variant"]] = row[key]
    return [r["ours"] / r["otel"] for r in by_round.values() if "ours" in r and "otel" in r]


def _summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["server"], row["endpoint"], row["connections"]), []).append(row)
    summary = []
    for (server, endpoint, connections), group in groups.items():
        entry: dict[str, Any] = {
            "server": server,
            "endpoint": endpoint,
            "connections": connections,
            "rounds": len({row["round"] for row in group}),
        }
        for variant in VARIANTS:
            mine = [row for row in group if row["variant"] == variant]
            for key in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "cpu_share"):
                values = [row[key] for row in mine if row.get(key) is not None]
                entry[f"{variant}_{key}"] = statistics.median(values) if values else None
            entry[f"{variant}_errors"] = sum(
                row["non_2xx"] + sum(row["socket_errors"].values()) for row in mine
            )
        for key in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req"):
            ratios = _ratios(group, key)
            entry[f"ratio_{key}"] = {
                "median": statistics.median(ratios) if ratios else None,
                "min": min(ratios, default=None),
                "max": max(ratios, default=None),
                "all": [round(r, 4) for r in ratios],
            }
        summary.append(entry)
    return summary


def _fmt_ratio(ratio: dict[str, Any], digits: int = 3) -> str:
    if ratio["median"] is None:
        return DASH
    low, high = f"{ratio['min']:.{digits}f}", f"{ratio['max']:.{digits}f}"
    return f"{ratio['median']:.{digits}f} ({low}{DASH}{high})"


def _render(meta: dict[str, Any], summary: list[dict[str, Any]]) -> str:
    lines = [
        "# Realistic apps: OTel alone vs OTel + the middleware with no arguments",
        "",
        f"git {meta['git']}, {meta['date']}, {meta['rounds']} interleaved rounds of "
        f"{meta['duration']} s per variant, spans exported by {meta['exporter']}. Ratios are "
        f"ours / OTel per round: median (min{DASH}max).",
        "",
        "| server | endpoint | conns | OTel req/s | ours req/s "
        f"| req/s {TIMES} OTel | p50 {TIMES} OTel | p99 {TIMES} OTel "
        f"| OTel CPU µs/req | ours CPU µs/req | CPU/req {TIMES} OTel | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        lines.append(
            f"| {SERVER_NAMES[e['server']]} | `{e['endpoint']}` | {e['connections']} "
            f"| {e['otel_rps']:.0f} | {e['ours_rps']:.0f} | {_fmt_ratio(e['ratio_rps'])} "
            f"| {_fmt_ratio(e['ratio_p50_ms'], 2)} | {_fmt_ratio(e['ratio_p99_ms'], 2)} "
            f"| {e['otel_cpu_us_per_req']:.0f} | {e['ours_cpu_us_per_req']:.0f} "
            f"| {_fmt_ratio(e['ratio_cpu_us_per_req'])} "
            f"| {e['otel_errors']}/{e['ours_errors']} |"
        )
    return "\n".join(lines) + "\n"


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    git = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    versions = package_versions(VERSIONED)
    return {
        "git": git,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "rounds": args.rounds,
        "duration": args.duration,
        "connections": list(args.connections),
        "ours_env": args.ours_env,
        "exporter": "OTLP/HTTP to bench.otlp_sink"
        if args.exporter == "otlp"
        else "a dropping exporter",
        "pinned": args.pin,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "versions": versions,
    }


# --- main --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the A/B; write ``results.json`` and ``results.md``. Returns the exit code."""
    args = _parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk not found (Debian: apt-get install -y wrk)", file=sys.stderr)
        return 1
    from bench.realistic_apps.common import build_database

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="realapp-"))
    helpers: list[subprocess.Popen[bytes]] = []
    rows: list[dict[str, Any]] = []
    meta = _meta(args)
    try:
        build_database(str(work / "shop.db"))
        upstream_port, sink_port = _free_port(), _free_port()
        base_env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("OTEL_", "OTELPROF_", "REALAPP_"))
        }
        base_env.update(
            REALAPP_DB=str(work / "shop.db"),
            REALAPP_UPSTREAM=f"http://127.0.0.1:{upstream_port}/quote",
            REALAPP_EXPORTER=args.exporter,
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{sink_port}",
            PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), base_env.get("PYTHONPATH")) if p),
        )
        for module, port in (("bench.realistic_apps.upstream", upstream_port),
                             ("bench.otlp_sink", sink_port)):  # fmt: skip
            argv = _pinned(1, [PYTHON, "-m", module, str(port)], args.pin)
            helpers.append(_spawn(argv, base_env, args.out / "logs" / f"{module}.log"))
        time.sleep(1.0)
        for server in args.servers:
            _log(f"{SERVER_NAMES[server]}: starting otel and ours")
            _run_server(server, base_env, args, rows)
        stats_url = f"http://127.0.0.1:{sink_port}/stats"
        with contextlib.suppress(OSError), urllib.request.urlopen(stats_url) as response:
            meta["sink"] = json.loads(response.read())
    finally:
        for helper in helpers:
            _stop(helper)
        shutil.rmtree(work, ignore_errors=True)
        summary = _summary(rows)
        (args.out / "results.json").write_text(
            json.dumps({"meta": meta, "summary": summary, "measurements": rows}, indent=1)
        )
        (args.out / "results.md").write_text(_render(meta, summary))
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
