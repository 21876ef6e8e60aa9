"""The apps' upstream service: ``python -m bench.realistic_apps.upstream PORT``.

Answers every ``GET`` with a small JSON body, keeping the connection alive, from a plain
asyncio protocol: it costs little, so the apps' ``/upstream`` measures their client side.
``bench.realistic`` pins it to the load generator's core, as a service on another machine.
"""

from __future__ import annotations

import asyncio
import json
import sys

_BODY = json.dumps(
    {"currency": "EUR", "rates": {"USD": 1.08, "GBP": 0.85, "CHF": 0.94}, "source": "upstream"}
).encode()
_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    + f"Content-Length: {len(_BODY)}\r\n\r\n".encode()
    + _BODY
)


class _Protocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:  # GETs: no bodies
            self.buffer = self.buffer[end + 4 :]
            self.transport.write(_RESPONSE)


async def _serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Protocol, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1])))
