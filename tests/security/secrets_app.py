"""The FastAPI demo app plus one endpoint that reads a JSON body, for ``test_secrets``.

Serve it with ``uvicorn tests.security.secrets_app:app``: every demo route and setting
is unchanged (``OTELPROF_*`` variables apply).
"""

from __future__ import annotations

from fastapi import Request

from demo_app.fastapi_app import app
from demo_app.work import crunch_numbers

__all__ = ["app"]


@app.post("/orders")
async def create_order(request: Request) -> dict[str, int]:
    """Reads the body and works while its secrets sit in local variables."""
    order = await request.json()
    card, password = order["card"], order["password"]
    crunch_numbers(20)
    return {"accepted": len(card) + len(password)}
