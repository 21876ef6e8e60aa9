"""A plain HTTP echo server for the SIGPROF e2e tests (no middleware, its own process).

``python -m tests.e2e.sigprof_echo PORT``. ``POST /echo`` answers the request body back,
``GET /bytes?n=N&seed=S`` answers N deterministic bytes. Both send their body in small
chunks with short pauses, so a client blocks in ``recv`` many times per response.
"""

from __future__ import annotations

import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

CHUNK = 64 * 1024
PAUSE = 0.002  # seconds between chunks: the reader waits in recv


def pattern(n: int, seed: int) -> bytes:
    """N bytes, deterministic in ``seed`` (the app checks what it received)."""
    block = bytes((seed + i * 7) % 251 for i in range(4096))
    return (block * (n // len(block) + 1))[:n]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for start in range(0, len(body), CHUNK):
            self.wfile.write(body[start : start + CHUNK])
            self.wfile.flush()
            time.sleep(PAUSE)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        self._send(body)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        if url.path == "/health":
            self._send(b"ok")
            return
        n = int(query.get("n", ["1024"])[0])
        seed = int(query.get("seed", ["0"])[0])
        self._send(pattern(n, seed))


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
