"""A local HTTP server on 127.0.0.1 for the receivers the tests run in-process (OTLP
profiles, Pyroscope, the profilers' collector of the SIGPROF tests)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol, TypeVar


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing (the tests read what it recorded instead)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on a free 127.0.0.1 port from a thread; yields the base URL
    (``http://127.0.0.1:<port>``) and stops the server on exit."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class ReceiverState(Protocol):
    url: str
    gate: threading.Event


State = TypeVar("State", bound=ReceiverState)


@contextmanager
def receiving(state: State, handler: type[BaseHTTPRequestHandler]) -> Iterator[State]:
    """:func:`serving` for a receiver: yields ``state`` with its ``url`` set; its ``gate``
    (which a test clears to hold requests) is opened first, at the start and on exit,
    so that held requests finish before the server stops."""
    state.gate.set()
    with serving(handler) as url:
        state.url = url
        try:
            yield state
        finally:
            state.gate.set()
