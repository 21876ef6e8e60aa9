"""Soak (opt-in: ``pytest -m soak``): runs ``bench/soak.py`` and checks its figures.

64 connections against uvicorn + the FastAPI demo for ``OTELPROF_SOAK_SECONDS``
(default 600), every request profiled: 0 errors, RSS flat after the first minute, the
store within its bounds and intact. Never part of the default run (``-m 'not soak'``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ARTIFACTS

pytestmark = pytest.mark.soak

ROOT = Path(__file__).resolve().parents[2]


def test_soak_64_connections_every_request_profiled(tmp_path: Path) -> None:
    seconds = int(os.environ.get("OTELPROF_SOAK_SECONDS", "600"))
    out = tmp_path / "soak.json"
    script = str(ROOT / "bench" / "soak.py")
    done = subprocess.run(
        [
            sys.executable,
            script,
            "--seconds",
            str(seconds),
            "--connections",
            "64",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=seconds + 300,
    )
    assert out.exists(), done.stdout + done.stderr
    figures = json.loads(out.read_text())
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "soak.json").write_text(json.dumps(figures, indent=1) + "\n")
    assert figures["requests"] > 0
    assert figures["errors"] == dict.fromkeys(figures["errors"], 0)
    store = figures["store"]
    assert store["integrity"] == "ok"
    assert store["count"] == store["rows"] <= store["max_profiles"]
    assert store["bytes"] <= store["max_bytes"]
    assert figures["server_log"]["tracebacks"] == 0
    assert figures["checks"]["rss_flat"], figures["rss_mib"]
    assert figures["passed"], figures["checks"]
    assert done.returncode == 0, done.stderr
