"""Route templates that frameworks keep where the adapters cannot read them, copied out.

The adapters read a request's route template from the ASGI scope or WSGI environ when the
response starts. Falcon keeps it on its own request object (``req.uri_template``): for a
Falcon app, a Falcon middleware of ours copies it into the scope / environ under
:data:`~.profiling._span.ROUTE_KEY` once routing has matched. Imports nothing: used only
when Falcon is already imported.
"""

from __future__ import annotations

import sys
from typing import Any

from ._failsafe import log_failure
from .profiling._span import ROUTE_KEY

__all__ = ["note_falcon_routes"]


def note_falcon_routes(app: object) -> None:
    """When ``app`` is a Falcon app (WSGI or ASGI), add :class:`_FalconRouteNote` to its
    middleware (Falcon prepares its list again)."""
    falcon_app = sys.modules.get("falcon.app")  # (FalconInstrumentor replaces falcon.App)
    if falcon_app is None or not isinstance(app, falcon_app.App):
        return
    try:
        app.add_middleware(_FalconRouteNote())
    except Exception as exc:
        log_failure("adapter", exc)


class _FalconRouteNote:
    """Copies ``req.uri_template`` into the environ (WSGI) or scope (ASGI) once the route
    is matched (``process_resource`` runs only then)."""

    def process_resource(self, req: Any, resp: Any, resource: object, params: object) -> None:
        _note(req.env, req)

    async def process_resource_async(
        self, req: Any, resp: Any, resource: object, params: object
    ) -> None:
        _note(req.scope, req)


def _note(carrier: dict[str, Any], req: Any) -> None:
    try:
        template = req.uri_template
        if isinstance(template, str) and template:
            carrier.setdefault(ROUTE_KEY, template)
    except Exception as exc:
        log_failure("adapter", exc)
