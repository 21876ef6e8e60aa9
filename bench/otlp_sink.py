"""An OTLP/HTTP profiles sink for the benchmark: answers every POST as a collector would.

``python -m bench.otlp_sink PORT`` serves ``POST /v1development/profiles`` (200 with an
empty ``ExportProfilesServiceResponse``, which is zero bytes) and ``GET /stats``
(``{"requests": n, "bytes": b}``), so a run can show the profiles arrived. It stands in
for an OTel Collector on another machine: ``bench.run`` pins it to the load generator's
core, not the server's.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_lock = threading.Lock()
_stats = {"requests": 0, "bytes": 0}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with _lock:
            _stats["requests"] += 1
            _stats["bytes"] += len(body)
        self.send_response(200 if self.path == "/v1development/profiles" else 404)
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
