"""A sync and an async view, each doing uniquely named marker work."""

from __future__ import annotations

import asyncio
import time

from django.http import HttpRequest, JsonResponse


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(range(50))


def django_sync_marker() -> None:
    _spin(0.02)


def django_async_marker() -> None:
    _spin(0.02)


def item(request: HttpRequest, item_id: int) -> JsonResponse:
    """Sync view: under ASGI Django runs it on a worker thread (asgiref)."""
    django_sync_marker()
    return JsonResponse({"item_id": item_id, "view": "sync"})


async def async_item(request: HttpRequest, item_id: int) -> JsonResponse:
    """Async view: runs on the event loop under ASGI, through async_to_sync under WSGI."""
    await asyncio.sleep(0.005)
    django_async_marker()
    return JsonResponse({"item_id": item_id, "view": "async"})


async def slow(request: HttpRequest) -> JsonResponse:
    """A slow async view: Django cancels it when the client disconnects (ASGI)."""
    await asyncio.sleep(5)
    return JsonResponse({"view": "slow"})


def health(request: HttpRequest) -> JsonResponse:
    """A health check (excluded from traces by the DjangoInstrumentor tests)."""
    return JsonResponse({"ok": True})
