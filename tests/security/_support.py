"""Shared pieces of the security tests: hostile profiles, network namespaces, tallies."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pyinstrument.session import Session

from ..e2e.servers import ROOT, Server, run_server, uvicorn
from ..helpers import free_port, profile

TALLY: Counter[str] = Counter()
"""What the security tests did (fuzz cases, requests sent); printed at the end of the run."""

ARTIFACTS = ROOT / "test-artifacts"

# Markup that runs script if a page inserts it unescaped. Each sets window.__xss,
# which the browser tests read back.
PAYLOADS = (
    "<img src=x onerror=window.__xss=1>",
    "</script><script>window.__xss=1</script>",
    '"><svg onload=window.__xss=1>',
    "'><iframe srcdoc='<script>parent.__xss=1</script>'>",
)

HOSTILE_ROUTE = "/x/" + "/".join(PAYLOADS) + "/{item}"
"""The live route's template: every payload, then a path parameter."""
LIVE_FUNCTION = PAYLOADS[2] + PAYLOADS[0]
"""The name of the function the live route runs."""

# The profiles tests/security/xss_app.py stores, as
# (trace id, span id, method, route, function name, payload in the file name, description)
STORED = [
    ("a1" * 16, "b1" * 8, "GET", PAYLOADS[0], PAYLOADS[1], PAYLOADS[2], PAYLOADS[3]),
    ("a2" * 16, "b2" * 8, "POST", PAYLOADS[1], PAYLOADS[2], PAYLOADS[3], PAYLOADS[0]),
    ("a3" * 16, "b3" * 8, PAYLOADS[2], PAYLOADS[2], PAYLOADS[3], PAYLOADS[0], PAYLOADS[1]),
    # one trace crossing the service twice: the trace page lists both
    ("a4" * 16, "b4" * 8, "GET", PAYLOADS[3], PAYLOADS[0], PAYLOADS[1], PAYLOADS[2]),
    ("a4" * 16, "c4" * 8, "GET", PAYLOADS[0], PAYLOADS[1], PAYLOADS[2], PAYLOADS[3]),
]

_HOSTILE_SOURCE = """\
def work(deadline):
    total = 0
    while time.perf_counter() < deadline:
        total += sum(range(50))
    return total
"""


def hostile_function(name: str, filename: str) -> Callable[[float], int]:
    """A CPU-bound function whose code object is called ``name`` and lives in ``filename``.

    pyinstrument records ``co_name``/``co_qualname`` and ``co_filename``, so a profile of
    it carries ``name`` and ``filename`` as frame data, exactly as real code would.
    """
    namespace: dict[str, Any] = {"time": time}
    exec(compile(_HOSTILE_SOURCE, filename, "exec"), namespace)
    function: Callable[[float], int] = namespace["work"]
    function.__code__ = function.__code__.replace(co_name=name, co_qualname=name)  # type: ignore[attr-defined]
    function.__qualname__ = name
    function.__name__ = name
    return function


def hostile_session(name: str, filename: str, description: str, seconds: float = 0.03) -> Session:
    """A real pyinstrument session of :func:`hostile_function` running ``seconds``."""
    function = hostile_function(name, filename)
    session = profile(lambda: function(time.perf_counter() + seconds), interval=0.0005)
    assert session.frame_records
    session.target_description = description
    return session


# network namespaces: a real non-loopback client on this machine


@dataclass(frozen=True)
class Namespace:
    """A network namespace joined to the root namespace by a veth pair.

    ``host_address`` is the root-namespace end (servers listen there);
    ``client_address`` is the namespace's end (clients run there).
    """

    name: str
    host_address: str
    client_address: str

    def requests(self, base_url: str, plan: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Send ``plan`` (dicts of method, path, headers) from inside the namespace."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.name, sys.executable, "-c", _CLIENT],
            input=json.dumps({"base": base_url, "requests": list(plan)}),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        results: list[dict[str, Any]] = json.loads(done.stdout)
        TALLY["requests sent"] += len(results)
        return results


_CLIENT = """
import json, sys
import httpx
plan = json.loads(sys.stdin.read())
out = []
with httpx.Client(timeout=20, trust_env=False) as client:
    for r in plan["requests"]:
        resp = client.request(r["method"], plan["base"] + r["path"], headers=r.get("headers"))
        out.append({"status": resp.status_code, "headers": dict(resp.headers), "body": resp.text})
print(json.dumps(out))
"""


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)


def _free_subnet() -> int:
    """A third octet X with no 10.200.X.0/24 address on this machine yet."""
    used = _ip("-o", "-4", "addr", "show").stdout
    for offset in range(256):
        octet = (os.getpid() + offset) % 256
        if f" 10.200.{octet}." not in used:
            return octet
    raise RuntimeError("no free 10.200.X.0/30 subnet")


@contextmanager
def network_namespace() -> Iterator[Namespace]:
    """Create ``otelprof-test-<pid>`` with a veth pair in 10.200.X.0/30; skip if not allowed.

    Everything is removed in a ``finally``, even when the test fails.
    """
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("network namespaces need Linux and root; relying on the in-process tests")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed; relying on the in-process tests")
    pid = os.getpid()
    name = f"otelprof-test-{pid}"
    host_if, peer_if = f"otp{pid}h", f"otp{pid}n"
    octet = _free_subnet()
    host, client = f"10.200.{octet}.1", f"10.200.{octet}.2"
    steps = [
        ("netns", "add", name),
        ("link", "add", host_if, "type", "veth", "peer", "name", peer_if),
        ("link", "set", peer_if, "netns", name),
        ("addr", "add", f"{host}/30", "dev", host_if),
        ("link", "set", host_if, "up"),
        ("-n", name, "addr", "add", f"{client}/30", "dev", peer_if),
        ("-n", name, "link", "set", peer_if, "up"),
        ("-n", name, "link", "set", "lo", "up"),
    ]
    try:
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                pytest.skip(
                    f"`ip {' '.join(step)}` is not permitted here ({done.stderr.strip()}); "
                    "relying on the in-process client-address tests"
                )
        yield Namespace(name, host, client)
    finally:
        _ip("link", "del", host_if)  # removes both ends of the pair
        _ip("netns", "del", name)
        assert name not in _ip("netns", "list").stdout, f"namespace {name} was left behind"


@contextmanager
def uvicorn_on(
    host: str, app: str, tmp: Path, env: Mapping[str, str], *, access_log: bool = True
) -> Iterator[Server]:
    """A real one-worker uvicorn serving ``app`` on ``host`` (any local address)."""
    port = free_port()
    command = uvicorn(app, port, workers=1, host=host, access_log=access_log)
    with run_server(command, tmp, env=dict(env), port=port, host=host) as server:
        yield server
