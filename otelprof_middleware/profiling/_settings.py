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

__all__ = ["load_config"]

_logger = logging.getLogger("otelprof_middleware")


def load_config(settings: Mapping[str, object], *, has_store: bool) -> Config:
    """The middleware's settings; an invalid one turns profiling off, loudly.

    Every setting and the store URL are checked now, when the middleware is built (the
    store is not opened: a server's master process may fork after this). An invalid
    one is logged as an error naming the setting and its variable, counted
    (``disabled.invalid_setting``), and the middleware passes every request straight
    through: an observability setting never stops, or breaks, the app.
    """
    try:
        config = Config.load(**settings)
        if config.enabled and not has_store:
            check_store_url(config.resolved_store_url())
        if config.enabled:
            check_exporter_settings(config.otlp_profiles)
    except (ValueError, ImportError) as exc:
        count("disabled.invalid_setting")
        _logger.error(
            "otelprof: profiling is OFF for this app: %s. The app runs unchanged; "
            "fix the setting and restart to profile.",
            exc,
        )
        return Config.load({}, enabled=False)
    return config
