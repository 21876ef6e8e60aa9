"""The middleware's settings, checked when it is built: :func:`load_config`.

An invalid setting turns profiling off for the app, loudly, and never stops the app.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from .._config import Config
from .._failsafe import count
from ..exporters import check_exporter_settings
from ..stores import check_store_url

__all__ = ["check_settings", "load_config"]

_logger = logging.getLogger("otelprof_middleware")


def check_settings(environ: Mapping[str, str] | None = None, /, **settings: object) -> Config:
    """Check settings as a middleware built with them does, and return them.

    For CI or an import-time check: a middleware turns profiling off (and logs why) for
    exactly the settings this refuses, with the same message. Beyond
    :meth:`Config.load`, which parses each value, it checks the store URL in force (a
    SQLite URL's slashes, ``memory://``, a Redis URL's port and options) and, with
    ``otlp_profiles`` on, the extra and the ``OTEL_EXPORTER_OTLP_*`` variables. Nothing
    is opened or sent.

    Args:
        environ: the environment to read (``OTELPROF_*``, ``OTEL_*``); default
            ``os.environ``.
        **settings: the middleware's keyword settings (not ``tracer_provider`` or
            ``profile_store``).

    Raises:
        ValueError: the first invalid setting, named with its environment variable.
    """
    return _checked(settings, environ, has_store=False)


def _checked(
    settings: Mapping[str, object], environ: Mapping[str, str] | None, *, has_store: bool
) -> Config:
    config = Config.load(environ, **settings)
    try:
        if config.enabled and not has_store:
            check_store_url(config.resolved_store_url())
        if config.enabled:
            check_exporter_settings(config.otlp_profiles, environ)
    except ImportError as exc:  # an extra the settings need is not installed
        raise ValueError(str(exc)) from exc
    return config


def load_config(settings: Mapping[str, object], *, has_store: bool) -> Config:
    """The middleware's settings; an invalid one turns profiling off, loudly.

    Every setting and the store URL are checked now, when the middleware is built (the
    store is not opened: a server's master process may fork after this), as
    :func:`check_settings` checks them. An invalid one is logged as an error naming the
    setting and its variable, counted (``disabled.invalid_setting``), and the middleware
    passes every request straight through: an observability setting never stops, or
    breaks, the app.
    """
    try:
        config = _checked(settings, None, has_store=has_store)
    except ValueError as exc:
        count("disabled.invalid_setting")
        _logger.error(
            "otelprof: profiling is OFF for this app: %s. The app runs unchanged; "
            "fix the setting and restart to profile.",
            exc,
        )
        return Config.load({}, enabled=False)
    return config
