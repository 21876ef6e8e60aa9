"""Turn ``results.json`` data into ``results.md``: tables, overhead, memory, budget.

``python -m bench.report results.json`` re-renders a saved run.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench.common import (
    CONNECTIONS,
    ENDPOINTS,
    SERVER_NAMES,
    SWEEP_CONNECTIONS,
    SWEEP_VARIANTS,
    VARIANTS,
)

__all__ = ["render"]

X = "\u00d7"
"""Multiplication sign, for ratios."""
DASH = "\u2013"
"""En dash, for ranges and missing values."""

Row = dict[str, Any]
NOT_PROFILED_MIN = 0.97
NOT_PROFILED_GOAL = 0.99
IO_VS_OTEL_MIN = 0.90
IO_VS_REFERENCE_MIN = 0.90
MEMORY_GROWTH_MAX_MB = 20.0
PROBLEM_PREFIXES = ("dropped.", "failed.", "skipped.")

VARIANT_NOTES = {
    "bare": "app alone: no OTel, no profiler",
    "otel": "OTel SDK (batch processor, dropping exporter) + ASGI/WSGI instrumentation",
    "reference": "otel + hand-written pyinstrument `Profiler` per request (1 ms, dropped)",
    "floor": "otel + the `bench.floor` yardstick: the least per-request work of any "
    "always-on layer (a record, a contextvar, registered, status noted; no profile)",
    "lean": "otel + the `bench.lean` yardstick: our always-on parts (span read, sampler "
    "registration and ticks, keep policy) with none of the package's layering; keeps nothing",
    "ours_off": "otel + ours, `enabled=False`",
    "ours_defaults": "otel + ours with no arguments: always-on, every request profiled, the "
    "keep policy (slow for its route, failed, triggered; 5/s) — the production setting",
    "ours_defaults_otlp": "as `ours_defaults`, plus the OTLP profiles export of every kept "
    "profile to a local sink (`bench.otlp_sink`, on the load generator's core)",
    "ours_1pct": 'otel + ours, `mode="hook"`, `sample_rate=0.01`',
    "ours_all": 'otel + ours, `mode="hook"`, `sample_rate=1.0`, embedded SQLite store, '
    "every profile kept",
    "ours_always_on": 'otel + ours in `mode="always_on"`, `sample_rate=1.0`, every profile kept',
    "ours_always_on_slow": "as `ours_always_on` with `min_duration_ms=100`: every request "
    "profiled, only slow ones kept (a threshold of the user's own)",
    "pyroscope_otel": "otel + Grafana's span profiles: pyroscope-io's agent (100 Hz) and "
    "pyroscope-otel's `PyroscopeSpanProcessor`, pushing to a local sink",
    "sentry_continuous": "otel + sentry-sdk's continuous profiler (session rate 1.0, started), "
    "its default integrations, sending to a local sink",
}


def _median(values: Iterable[float | None]) -> float | None:
    items = [v for v in values if v is not None]
    return statistics.median(items) if items else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _num(value: float | None, spec: str) -> str:
    return DASH if value is None else format(value, spec)


def _ms(value: float | None) -> str:
    if value is None:
        return DASH
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


class _Index:
    """Lookups over the raw measurements."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.rows: dict[tuple[str, str, int, str], list[Row]] = defaultdict(list)
        for row in data["measurements"]:
            if row.get("kind") == "disturbed":
                continue  # repeated; the repeat is in the tables
            key = (row["server"], row["endpoint"], row["connections"], row["variant"])
            self.rows[key].append(row)
        self.runs: dict[tuple[str, str], list[Row]] = defaultdict(list)
        for run in data["server_runs"]:
            self.runs[(run["server"], run["variant"])].append(run)

    def get(self, server: str, endpoint: str, connections: int, variant: str) -> list[Row]:
        return self.rows.get((server, endpoint, connections, variant), [])

    def median(
        self, server: str, endpoint: str, connections: int, variant: str, key: str = "rps"
    ) -> float | None:
        return _median(row[key] for row in self.get(server, endpoint, connections, variant))

    def round_ratios(
        self, server: str, endpoint: str, connections: int, variant: str, against: str
    ) -> list[float]:
        """``variant / against`` req/s within each round (paired: same server, same round)."""
        base = {r["round"]: r["rps"] for r in self.get(server, endpoint, connections, against)}
        return [
            row["rps"] / base[row["round"]]
            for row in self.get(server, endpoint, connections, variant)
            if base.get(row["round"])
        ]


def _counters_text(runs: list[Row], variant: str) -> str:
    """Our counters summed over rounds: problems (dropped/failed/skipped) and ``written``."""
    if not variant.startswith("ours_"):
        return DASH
    totals: dict[str, int] = defaultdict(int)
    for run in runs:
        for name, value in run["counters"].get("counters", {}).items():
            totals[name] += value
    problems = {k: v for k, v in totals.items() if k.startswith(PROBLEM_PREFIXES)}
    text = ", ".join(f"{name}={value}" for name, value in sorted(problems.items())) or "none"
    if "written" in totals:
        text += f" (written {totals['written']:,})"
    return text


def _errors_text(rows: list[Row]) -> str:
    non_2xx = sum(row["non_2xx"] for row in rows)
    sockets = sum(sum(row["socket_errors"].values()) for row in rows)
    return f"{non_2xx}/{sockets}"


def _endpoint_section(data: dict[str, Any], index: _Index, server: str, endpoint: str) -> list[str]:
    connections = CONNECTIONS[endpoint]
    header = [
        "variant",
        f"req/s median (min{DASH}max)",
        f"{X}bare",
        f"{X}otel",
        "p50 ms",
        "p99 ms",
        "server CPU µs/req",
        "server CPU busy",
        "RSS MB at end",
        "non-2xx/socket err",
        "dropped/failed counters",
    ]
    bare = index.median(server, endpoint, connections, "bare")
    otel = index.median(server, endpoint, connections, "otel")
    rows: list[list[str]] = []
    for variant in VARIANTS:
        found = index.get(server, endpoint, connections, variant)
        if not found:
            continue
        rps = [row["rps"] for row in found]
        median = _median(rps)
        runs = index.runs.get((server, variant), [])
        rows.append(
            [
                f"`{variant}`",
                f"{median:,.0f} ({min(rps):,.0f}{DASH}{max(rps):,.0f})",
                _num(_ratio(median, bare), ".3f"),
                _num(_ratio(median, otel), ".3f"),
                _ms(_median(row.get("p50_ms") for row in found)),
                _ms(_median(row.get("p99_ms") for row in found)),
                _num(_median(row["cpu_us_per_req"] for row in found), ",.0f"),
                _num(_median(row.get("cpu_share") for row in found), ".0%"),
                _num(_median(run["rss_mb"] for run in runs), ".1f"),
                _errors_text(found),
                _counters_text(runs, variant),
            ]
        )
    title = f"### {SERVER_NAMES[server]} · `{endpoint}` · {connections} connections"
    return [title, "", *_table(header, rows), ""]


def _sweep_section(index: _Index, servers: list[str]) -> list[str]:
    lines = [
        "## `/io` connection sweep",
        "",
        "The 64-connection row is the main `/io` measurement.",
        "",
    ]
    header = [
        "server",
        "connections",
        "variant",
        f"req/s median (min{DASH}max)",
        f"{X}otel",
        f"{X}reference",
    ]
    header += ["p99 ms"]
    rows: list[list[str]] = []
    for server in servers:
        for connections in SWEEP_CONNECTIONS:
            otel = index.median(server, "/io", connections, "otel")
            reference = index.median(server, "/io", connections, "reference")
            for variant in SWEEP_VARIANTS:
                found = index.get(server, "/io", connections, variant)
                if not found:
                    continue
                rps = [row["rps"] for row in found]
                median = _median(rps)
                rows.append(
                    [
                        server,
                        str(connections),
                        f"`{variant}`",
                        f"{median:,.0f} ({min(rps):,.0f}{DASH}{max(rps):,.0f})",
                        _num(_ratio(median, otel), ".3f"),
                        _num(_ratio(median, reference), ".3f"),
                        _ms(_median(row.get("p99_ms") for row in found)),
                    ]
                )
    return [*lines, *_table(header, rows), ""]


def _overhead_section(overhead: dict[str, Any]) -> list[str]:
    if not overhead:
        return []
    cases = [
        ("nothing", "nothing (empty timed block)"),
        ("pyinstrument", "pyinstrument `Profiler(interval=0.001)` + `start()` + `stop()`"),
        ("ours_unsampled", "ours, request not sampled: `core.start()` → None"),
        ("ours", "ours, profiled: `core.start()` + `finish()` + `detach()`"),
    ]
    header = ["case", "sync median µs", "sync p90 µs", "async median µs", "async p90 µs"]
    rows = []
    for key, label in cases:
        sync = overhead.get("sync", {}).get(key, {})
        in_task = overhead.get("async", {}).get(key, {})
        rows.append(
            [
                label,
                _num(sync.get("median_us"), ".2f"),
                _num(sync.get("p90_us"), ".2f"),
                _num(in_task.get("median_us"), ".2f"),
                _num(in_task.get("p90_us"), ".2f"),
            ]
        )
    repeats = overhead.get("sync", {}).get("nothing", {}).get("repeats", "?")
    writer = overhead.get("writer", {})
    writer_lines: list[str] = []
    if writer:
        writer_rows = []
        for label, title in (("empty", "empty profile"), ("1ms", "~1 ms of `/cpu`-style work")):
            encode = writer.get(f"encode_{label}", {})
            put = writer.get(f"sqlite_put_{label}", {})
            writer_rows.append(
                [
                    title,
                    _num(writer.get(f"samples_{label}", {}).get("median_us"), ".0f"),
                    _num(writer.get(f"payload_bytes_{label}", {}).get("median_us"), ",.0f"),
                    _num(encode.get("median_us"), ".1f"),
                    _num(put.get("median_us"), ".1f"),
                    _num(put.get("p90_us"), ".1f"),
                ]
            )
        writer_lines = [
            "Background writer, per kept profile (off the request path, same process and "
            "CPU): serialise + compress (`ProfileRecord.from_session`), then "
            "`SQLiteStore.put` at the 1000-profile bound (eviction included):",
            "",
            *_table(
                [
                    "profile",
                    "samples",
                    "payload bytes",
                    "encode median µs",
                    "SQLite put median µs",
                    "put p90 µs",
                ],
                writer_rows,
            ),
            "",
        ]
    adapter_lines: list[str] = []
    adapters = overhead.get("adapters", {})
    if adapters:
        adapter_rows = []
        for server in ("asgi", "wsgi"):
            base = adapters.get(f"{server}_otel", {}).get("median_us")
            for key, label in (
                ("otel", "OTel middleware alone"),
                ("ours_off", "OTel + ours, `enabled=False`"),
                ("ours_unsampled", "OTel + ours, request not sampled (`sample_rate=0`)"),
                ("floor", "OTel + `floor`: the least an always-on layer does (yardstick)"),
                ("lean", "OTel + `lean`: our always-on parts, no layering (yardstick)"),
                ("ours_defaults", "OTel + ours, no arguments (always-on, every request)"),
            ):
                stats = adapters.get(f"{server}_{key}", {})
                median = stats.get("median_us")
                added = None if median is None or base is None else median - base
                adapter_rows.append(
                    [
                        server,
                        label,
                        _num(median, ".2f"),
                        _num(stats.get("p90_us"), ".2f"),
                        DASH if key == "otel" else _num(added, "+.2f"),
                    ]
                )
        adapter_lines = [
            "A whole request through the adapters, in-process (trivial app, fake "
            "server, OTel SDK with batch processor and dropping exporter; chunks of 20 "
            "requests, stacks interleaved):",
            "",
            *_table(
                ["API", "stack", "median µs/req", "p90 µs/req", "added vs OTel alone µs"],
                adapter_rows,
            ),
            "",
        ]
    hook_lines: list[str] = []
    hook = overhead.get("hook", {})
    if hook:
        hook_rows = []
        for name, label in (("fib", "`fib(12)` x 20 (call-heavy)"), ("loop", "plain loop")):
            off = hook.get(f"{name}_off", {}).get("median_us")
            on = hook.get(f"{name}_on", {}).get("median_us")
            hook_rows.append(
                [
                    label,
                    _num(off, ",.1f"),
                    _num(on, ",.1f"),
                    _num(_ratio(on, off), ".2f") + X,
                ]
            )
        hook_lines = [
            "Code that is not being profiled, with a pyinstrument `setstatprofile` hook "
            "installed on its thread that never takes a sample (what every request on a "
            "thread pays while another request on it is profiled):",
            "",
            *_table(["work", "no hook µs", "idle hook µs", "slowdown"], hook_rows),
            "",
        ]
    return [
        "## Per-request profiler start+stop overhead (in-process)",
        "",
        f"Median of {repeats} interleaved repeats, pinned to one CPU; `bench/overhead.py`. "
        "Ours hands the (empty) session to the writer inside the timed block; the writer's "
        "own work (serialise, store) runs on its thread and is flushed between repeats, "
        "untimed. The async columns run inside a running asyncio task.",
        "",
        *_table(header, rows),
        "",
        *writer_lines,
        *adapter_lines,
        *hook_lines,
    ]


def _threads_section(index: _Index) -> list[str]:
    """uvicorn: CPU of the event-loop thread vs the background threads, per request."""
    header = ["endpoint", "variant", "total µs/req", "event loop µs/req", "other threads µs/req"]
    rows: list[list[str]] = []
    for endpoint in ENDPOINTS:
        connections = CONNECTIONS[endpoint]
        for variant in VARIANTS:
            found = index.get("asgi", endpoint, connections, variant)
            if not found or "main_thread_cpu_s" not in found[0]:
                continue

            def per_request(key: str, rows_: list[Row] = found) -> float | None:
                return _median(
                    row[key] * 1e6 / row["requests"] if row["requests"] else None for row in rows_
                )

            rows.append(
                [
                    f"`{endpoint}`",
                    f"`{variant}`",
                    _num(_median(row["cpu_us_per_req"] for row in found), ",.0f"),
                    _num(per_request("main_thread_cpu_s"), ",.0f"),
                    _num(per_request("other_threads_cpu_s"), ",.0f"),
                ]
            )
    if not rows:
        return []
    return [
        "## Where uvicorn's CPU goes",
        "",
        "Server CPU per request split by thread (`/proc/<pid>/task`): the event-loop "
        "thread runs the requests (and every profiler hook); the other threads are the "
        "OTel batch span processor and, for ours, the profile writer. Medians over rounds.",
        "",
        *_table(header, rows),
        "",
    ]


def _memory_section(memory: list[Row]) -> list[str]:
    if not memory:
        return []
    header = [
        "server",
        "minutes",
        "RSS MB at baseline (t)",
        "RSS MB at end",
        "growth MB",
        "max MB",
        "req/s",
        "server CPU µs/req",
        "counters",
    ]
    rows = []
    for entry in memory:
        counters = entry["counters"].get("counters", {})
        rows.append(
            [
                entry["server"],
                f"{entry['minutes']:g}",
                f"{entry['baseline_mb']:.1f} ({entry['baseline_t_s']:.0f} s)",
                f"{entry['end_mb']:.1f}",
                f"{entry['growth_mb']:+.1f}",
                f"{entry['max_mb']:.1f}",
                f"{entry['load']['rps']:,.0f}",
                _num(entry.get("cpu_us_per_req"), ",.0f"),
                ", ".join(f"{k}={v}" for k, v in sorted(counters.items())) or "0",
            ]
        )
    series = [
        f"- {entry['server']}: "
        + " ".join(f"{s['t_s']:.0f}s={s['rss_mb']:.0f}" for s in entry["samples"])
        for entry in memory
    ]
    return [
        "## Memory: `ours_all` on `/io`, 64 connections, sustained",
        "",
        "RSS of the server processes sampled every 10 s; growth = end - baseline "
        "(the sample nearest minute 1, or a third of the run if shorter).",
        "",
        *_table(header, rows),
        "",
        "RSS series (MB):",
        "",
        *series,
        "",
    ]


def _status(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


def _range(values: list[float]) -> str:
    if len(values) < 2:
        return ""
    return f" (per round {min(values):.3f}{DASH}{max(values):.3f})"


def _budget_section(data: dict[str, Any], index: _Index, servers: list[str]) -> list[str]:
    header = ["budget item", "server", "measured", "target", "status"]
    rows: list[list[str]] = []

    def add(item: str, server: str, measured: str, target: str, ok: bool | None) -> None:
        rows.append([item, server, measured, target, _status(ok)])

    def shortfall(value: float, target: float) -> str:
        return f"; {100 * (target - value):.1f} points short" if value < target else ""

    def cpu_note(server: str, endpoint: str, variant: str, against: str) -> str:
        """Server CPU per request, ``against`` ÷ ``variant``: the throughput ratio a
        CPU-bound server would reach, and far less sensitive to a noisy machine."""
        connections = CONNECTIONS[endpoint]
        ratio = _ratio(
            index.median(server, endpoint, connections, against, "cpu_us_per_req"),
            index.median(server, endpoint, connections, variant, "cpu_us_per_req"),
        )
        return "" if ratio is None else f"; CPU/req-based {ratio:.3f}"

    tiny = CONNECTIONS["/tiny"]
    for server in servers:
        otel = index.median(server, "/tiny", tiny, "otel")
        for variant in ("ours_off", "ours_1pct"):
            ratio = _ratio(index.median(server, "/tiny", tiny, variant), otel)
            if ratio is None:
                add(f"not profiled (`{variant}`) /tiny {X}otel", server, DASH, "≥ 0.97", None)
                continue
            per_round = _range(index.round_ratios(server, "/tiny", tiny, variant, "otel"))
            goal = "goal ≥ 0.99 met" if ratio >= NOT_PROFILED_GOAL else "goal ≥ 0.99 not met"
            add(
                f"not profiled (`{variant}`) /tiny {X}otel",
                server,
                f"{ratio:.3f}{per_round}{shortfall(ratio, NOT_PROFILED_MIN)}; {goal}"
                f"{cpu_note(server, '/tiny', variant, 'otel')}",
                "≥ 0.97",
                ratio >= NOT_PROFILED_MIN,
            )
    adapters = (data.get("overhead") or {}).get("adapters", {})
    for server in servers:
        base = adapters.get(f"{server}_otel", {}).get("median_us")
        server_cpu = index.median(server, "/tiny", tiny, "otel", "cpu_us_per_req")
        for variant, key, what in (
            ("ours_off", "ours_off", "not profiled"),
            ("ours_1pct", "ours_unsampled", "not profiled"),
            ("ours_defaults", "ours_defaults", "no arguments, every request profiled"),
        ):
            ours = adapters.get(f"{server}_{key}", {}).get("median_us")
            if base is None or ours is None or server_cpu is None:
                continue
            added = ours - base
            estimate = server_cpu / (server_cpu + added)
            goal = "goal ≥ 0.99 met" if estimate >= NOT_PROFILED_GOAL else "goal ≥ 0.99 not met"
            add(
                f"{what} (`{variant}`, in-process A/B) /tiny {X}otel",
                server,
                f"{estimate:.3f}: {added:+.2f} µs per request over OTel alone "
                f"({ours:.1f} vs {base:.1f} µs in-process), on {server_cpu:,.0f} µs/req of "
                f"`otel` server CPU; {goal}",
                "≥ 0.97",
                estimate >= NOT_PROFILED_MIN,
            )
    cpu = CONNECTIONS["/cpu"]
    for server in servers:
        otel = index.median(server, "/cpu", cpu, "otel")
        ours = _ratio(index.median(server, "/cpu", cpu, "ours_all"), otel)
        reference = _ratio(index.median(server, "/cpu", cpu, "reference"), otel)
        if ours is None or reference is None:
            add(
                f"profiled /cpu {X}otel vs reference {X}otel",
                server,
                DASH,
                "ours ≥ reference",
                None,
            )
            continue
        per_round = _range(index.round_ratios(server, "/cpu", cpu, "ours_all", "reference"))
        add(
            f"every request profiled: /cpu {X}otel, ours_all vs reference",
            server,
            f"ours {ours:.3f} vs reference {reference:.3f} "
            f"(ours/reference {ours / reference:.3f}{per_round})"
            f"{cpu_note(server, '/cpu', 'ours_all', 'reference')} vs reference",
            "ours ≥ reference",
            ours >= reference,
        )
    io = CONNECTIONS["/io"]
    for server in servers:
        ratio = _ratio(
            index.median(server, "/io", io, "ours_all"), index.median(server, "/io", io, "otel")
        )
        if ratio is None:
            add(f"every request profiled: /io {X}otel", server, DASH, "≥ 0.90", None)
            continue
        per_round = _range(index.round_ratios(server, "/io", io, "ours_all", "otel"))
        add(
            f"every request profiled: /io {X}otel (64 conn.)",
            server,
            f"{ratio:.3f}{per_round}{shortfall(ratio, IO_VS_OTEL_MIN)}"
            f"{cpu_note(server, '/io', 'ours_all', 'otel')}",
            "≥ 0.90",
            ratio >= IO_VS_OTEL_MIN,
        )
    for server in servers:
        for connections in SWEEP_CONNECTIONS:
            ratio = _ratio(
                index.median(server, "/io", connections, "ours_all"),
                index.median(server, "/io", connections, "reference"),
            )
            if ratio is None:
                continue
            add(
                f"/io never collapses: ours_all {X}reference, {connections} conn.",
                server,
                f"{ratio:.3f}{shortfall(ratio, IO_VS_REFERENCE_MIN)}",
                "≥ 0.90",
                ratio >= IO_VS_REFERENCE_MIN,
            )
    for server in servers:  # issue 8: always-on, every request profiled
        for variant in ("ours_always_on", "ours_always_on_slow"):
            for endpoint, target in (("/cpu", 0.95), ("/tiny", 0.90), ("/io", 0.95)):
                connections = CONNECTIONS[endpoint]
                otel = index.median(server, endpoint, connections, "otel")
                ratio = _ratio(index.median(server, endpoint, connections, variant), otel)
                if ratio is None:
                    continue
                per_round = _range(
                    index.round_ratios(server, endpoint, connections, variant, "otel")
                )
                add(
                    f"`{variant}`: {endpoint} {X}otel",
                    server,
                    f"{ratio:.3f}{per_round}{shortfall(ratio, target)}"
                    f"{cpu_note(server, endpoint, variant, 'otel')}",
                    f"≥ {target:.2f}",
                    ratio >= target,
                )
            cpu_ratio = _ratio(
                index.median(server, "/cpu", cpu, variant, "cpu_us_per_req"),
                index.median(server, "/cpu", cpu, "otel", "cpu_us_per_req"),
            )
            if cpu_ratio is not None:
                add(
                    f"`{variant}`: /cpu server CPU per request {X}otel",
                    server,
                    f"{cpu_ratio:.3f}",
                    "≤ 1.10",
                    cpu_ratio <= 1.10,
                )
    for entry in data.get("memory", []):
        growth = entry["growth_mb"]
        over = f"; {growth - MEMORY_GROWTH_MAX_MB:.1f} MB over" if growth > 20 else ""
        add(
            f"memory: RSS growth after {entry['minutes']:g} min, ours_all /io",
            entry["server"],
            f"{growth:+.1f} MB (from {entry['baseline_t_s']:.0f} s to end){over}",
            "≤ 20 MB (5 min)",
            growth <= MEMORY_GROWTH_MAX_MB,
        )
    if not data.get("memory"):
        add(
            "memory: RSS growth, minute 1 → 5",
            DASH,
            "not run (full mode only)",
            "≤ 20 MB",
            None,
        )
    overhead = data.get("overhead") or {}
    for context in ("sync", "async"):
        cases = overhead.get(context, {})
        if "ours" in cases and "pyinstrument" in cases:
            ours = cases["ours"]["median_us"]
            pyinstrument = cases["pyinstrument"]["median_us"]
            add(
                f"start+stop overhead, {context} (reported)",
                "in-process",
                f"ours {ours:.1f} µs vs pyinstrument {pyinstrument:.1f} µs "
                f"(unsampled: {cases['ours_unsampled']['median_us']:.2f} µs)",
                "reported",
                None,
            )
    rounds = data["meta"]["plan"]["rounds"]
    caveat = (
        f"Ratios are of req/s medians over {rounds} round(s) in this run; the per-round "
        "range (paired, same round) shows the noise. A ratio within that range of its "
        'target is not a clear result either way. "CPU/req-based" is the same ratio '
        "computed from server CPU µs per request (baseline ÷ variant): what a CPU-bound "
        "server would reach, and much steadier on a shared machine. Status uses req/s."
    )
    return ["## Budget (issue 5)", "", caveat, "", *_table(header, rows), ""]


def _header(data: dict[str, Any]) -> list[str]:
    meta = data["meta"]
    machine = meta["machine"]
    versions = machine["versions"]
    plan = meta["plan"]
    memory = f", {plan['memory_minutes']:g} min memory phase" if plan["memory_minutes"] else ""
    code = meta.get("code") or {
        "git_commit": machine.get("git_commit"),
        "package_changes_vs_commit": ["?"] if machine.get("git_dirty") else [],
    }
    changes = code.get("package_changes_vs_commit") or []
    dirty = f" + uncommitted changes to {len(changes)} package file(s)" if changes else ""
    if code.get("source") in ("head", "worktree"):
        where = "committed HEAD" if code["source"] == "head" else "working tree"
        dirty += f"; every server ran a copy of the {where} taken at start"
    elif code.get("source") == "live":
        dirty += "; servers ran the live tree (edits during the run may mix versions)"
    wrk = str(machine.get("wrk") or "wrk").split(" Copyright")[0]
    lines = [
        "# otelprof-middleware benchmark results",
        "",
        f"- Command: `{meta['command']}`: {plan['rounds']} round(s), "
        f"{plan['duration']} s per measurement, {plan['warmup']} s warm-up per server run"
        f"{', /io sweep' if plan['sweep'] else ''}"
        f"{memory}"
        f"; took {meta.get('elapsed_s', 0):.0f} s; started {meta['started']}",
        f"- Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), "
        f"{machine['mem_total_gb']} GB RAM, Linux {machine['kernel']}; {meta['pinning']}; "
        f"load average {' '.join(machine['loadavg_start'])} at start, "
        f"{' '.join(meta.get('loadavg_end', []))} at end",
        f"- Python {machine['python']}, otelprof-middleware {versions.get('otelprof-middleware')} "
        f"(git {code.get('git_commit')}{dirty}), "
        f"pyinstrument {versions.get('pyinstrument')}, opentelemetry-sdk "
        f"{versions.get('opentelemetry-sdk')}, instrumentation-asgi/-wsgi "
        f"{versions.get('opentelemetry-instrumentation-asgi')}, uvicorn {versions.get('uvicorn')} "
        f"(uvloop {versions.get('uvloop')}, httptools {versions.get('httptools')}), gunicorn "
        f"{versions.get('gunicorn')}, starlette {versions.get('starlette')}, flask "
        f"{versions.get('flask')}, {wrk}",
        f"- `/cpu` = {meta.get('cpu_iterations', '?')} {X} `fib(12)` per request (calibrated "
        'once to ~5 ms unprofiled); `/io` = 20 ms sleep; `/tiny` = `{"ok": true}`',
        "",
        "Variants:",
        "",
        *[f"- `{name}`: {note}" for name, note in VARIANT_NOTES.items()],
        "",
        f"Columns: req/s median over rounds (min{DASH}max); {X}bare / {X}otel: ratio of "
        "medians; p50/p99: "
        "medians of wrk's percentiles; server CPU µs/req: user+system CPU of the server "
        "processes during the measurement ÷ requests; RSS MB and counters: at the end of the "
        "server run (after all endpoints; counters summed over rounds); server CPU busy: "
        "server CPU seconds ÷ wall seconds (on `/tiny` and `/cpu` the one-CPU server should "
        "be near 100%; a measurement below 85% was disturbed by other load and repeated, "
        f"up to {data['meta']['plan'].get('retries', 0)} times).",
        "",
    ]
    disturbed = [row for row in data["measurements"] if row.get("kind") == "disturbed"]
    if disturbed:
        lines += [
            f"{len(disturbed)} disturbed measurement(s) were repeated: "
            + ", ".join(
                f"{r['server']} `{r['variant']}` {r['endpoint']} round {r['round'] + 1} "
                f"({r['cpu_share']:.0%})"
                for r in disturbed
            )
            + ".",
            "",
        ]
    code_dir = str(meta["plan"].get("code_dir", ""))
    strays = sorted(
        {
            str(run["counters"].get("package_path"))
            for run in data["server_runs"]
            if code_dir
            and not str(run["counters"].get("package_path", code_dir)).startswith(code_dir)
        }
    )
    if strays:
        lines += [f"**Warning:** some servers imported the package from {', '.join(strays)}.", ""]
    if data.get("errors"):
        lines += ["**Harness errors:**", "", *[f"- {e}" for e in data["errors"]], ""]
    return lines


def render(data: dict[str, Any]) -> str:
    """The Markdown report of one run."""
    index = _Index(data)
    servers = [s for s in data["meta"]["plan"]["servers"] if s in SERVER_NAMES]
    lines = _header(data)
    lines += _budget_section(data, index, servers)
    lines += ["## Throughput and latency", ""]
    for server in servers:
        for endpoint in ENDPOINTS:
            lines += _endpoint_section(data, index, server, endpoint)
    if any(row["kind"] == "sweep" for row in data["measurements"]):
        lines += _sweep_section(index, servers)
    if "asgi" in servers:
        lines += _threads_section(index)
    lines += _overhead_section(data.get("overhead") or {})
    lines += _memory_section(data.get("memory") or [])
    return "\n".join(lines).rstrip() + "\n"


def _main(argv: list[str]) -> None:
    path = Path(argv[0]) if argv else Path(__file__).parent / "results" / "results.json"
    render_to: Callable[[str], object] = sys.stdout.write
    render_to(render(json.loads(path.read_text())))


if __name__ == "__main__":
    _main(sys.argv[1:])
