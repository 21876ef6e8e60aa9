"""The work the demo endpoints do: plain functions with names worth finding in a profile."""

from __future__ import annotations

import hashlib
import time


def crunch_numbers(milliseconds: float) -> int:
    """Call-heavy pure-Python CPU work for about ``milliseconds``."""
    end = time.perf_counter() + milliseconds / 1000.0
    total = 0
    while time.perf_counter() < end:
        total += _fibonacci(12)
    return total


def _fibonacci(n: int) -> int:
    return n if n < 2 else _fibonacci(n - 1) + _fibonacci(n - 2)


def hash_report(rows: int) -> str:
    """CPU work in a sync (``def``) endpoint: hash some generated rows."""
    digest = hashlib.sha256()
    for row in range(rows):
        digest.update(f"row-{row}-{_fibonacci(8)}".encode())
    return digest.hexdigest()


def load_settings() -> dict[str, str]:
    """A sync dependency that does a little work, as real settings loaders do."""
    time.sleep(0.002)
    return {"region": "demo", "checksum": hash_report(50)}


def render_chunk(index: int) -> str:
    """Work done per chunk of the streaming endpoints."""
    _fibonacci(20)  # ~0.6 ms: every chunk spans a sampling interval
    return f"chunk {index}\n"


class DemoFailure(RuntimeError):
    """Raised by the demo's failing endpoint."""
