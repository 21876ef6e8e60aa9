"""What the ASGI and WSGI adapters build alike: the settings, the engine and the viewer.

An adapter keeps only what is specific to its protocol; everything it needs from the
settings comes from :func:`build_parts`, once, when the middleware is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from opentelemetry import trace

from ._config import Config
from .profiling._engine import ProfilerCore
from .profiling._settings import load_config
from .profiling._worker_threads import install as install_worker_thread_profiling
from .stores._base import ProfileStore
from .viewer import Viewer

__all__ = ["AdapterParts", "build_parts"]


@dataclass(frozen=True, slots=True)
class AdapterParts:
    """A middleware's settings, its engine, and its viewer (None: ``debug_route`` off)."""

    config: Config
    core: ProfilerCore
    viewer: Viewer | None


def build_parts(
    settings: Mapping[str, object],
    profile_store: ProfileStore | None,
    tracer_provider: trace.TracerProvider | None = None,
) -> AdapterParts:
    """The parts of a middleware built with ``settings`` (an invalid one turns profiling
    off, loudly: see ``load_config``) and, if given, its own store instance and tracer
    provider. With profiling on, worker-thread jobs are attributed to the request that
    submitted them."""
    config = load_config(settings, has_store=profile_store is not None)
    core = ProfilerCore(config, store=profile_store, tracer_provider=tracer_provider)
    viewer = (
        Viewer(core.store_opener.get, token=config.debug_token, public_url=config.public_url)
        if config.debug_route
        else None
    )
    if config.enabled:
        install_worker_thread_profiling()
    return AdapterParts(config, core, viewer)
