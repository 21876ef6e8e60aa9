"""Helpers the docs-examples test calls from the bash blocks it runs.

``python -m tests.e2e.docs_probe PORT PID LOG``: wait for the server a block started in
the background (process ``PID``, output in ``LOG``), then ask it ``/items/42`` (200
expected) and read its log (no traceback, no "profiling is OFF").

``python -m tests.e2e.docs_probe --check-settings``: the ``OTELPROF_*`` variables the
block exported, as the middleware reads them (exit 2 with the error when invalid).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx

from otelprof_middleware import Config

from .docs_scaffold import PROBE_PATH

BAD_LOG = ("Traceback", "profiling is OFF")


def probe(port: int, pid: int, log: Path) -> int:
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"the server exited:\n{log.read_text(errors='replace')}", file=sys.stderr)
            return 1
        try:
            response = httpx.get(base + PROBE_PATH, timeout=30)
            break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                print(f"no answer on {base}:\n{log.read_text(errors='replace')}", file=sys.stderr)
                return 1
            time.sleep(0.2)
    text = log.read_text(errors="replace")
    if response.status_code != 200 or any(bad in text for bad in BAD_LOG):
        print(f"{PROBE_PATH} answered {response.status_code}:\n{text}", file=sys.stderr)
        return 1
    print(f"probe: {base}{PROBE_PATH} answered 200")
    return 0


def check_settings() -> int:
    try:
        Config.load()
    except ValueError as exc:
        print(f"invalid OTELPROF_* setting: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--check-settings"]:
        sys.exit(check_settings())
    sys.exit(probe(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])))
