"""A sink for the benchmark's profile exports: answers every POST as its server would.

``python -m bench.otlp_sink PORT`` answers any ``POST`` with 200 and an empty body: an OTel
Collector's ``/v1development/profiles`` (an empty ``ExportProfilesServiceResponse`` is zero
bytes), Pyroscope's ``/ingest``, Sentry's ``/api/<project>/envelope/``. ``GET /stats``
gives ``{"requests": n, "bytes": b, "paths": {path: n}}``, so a run can show the profiles
arrived. It stands in for a server on another machine: ``bench.run`` pins it to the load
generator's core, not the server's.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_lock = threading.Lock()
_stats: dict[str, Any] = {"requests": 0, "bytes": 0, "paths": {}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with _lock:
            _stats["requests"] += 1
            _stats["bytes"] += len(body)
            path = self.path.split("?", 1)[0]
            _stats["paths"][path] = _stats["paths"].get(path, 0) + 1
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        with _lock:
            payload = json.dumps(_stats).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    server = ThreadingHTTPServer(("127.0.0.1", int(args[0])), _Handler)
    server.daemon_threads = True
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
