"""Typed configuration: keyword arguments first, then ``OTELPROF_*`` environment variables.

Every field has a safe default. An invalid value raises ``ValueError`` at start-up,
naming the keyword and its environment variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypedDict

from ._config_values import (
    MODES,
    env_name,
    parse_bool,
    parse_float,
    parse_header,
    parse_int,
    parse_mode,
    parse_optional_float,
    parse_optional_str,
    parse_path,
    parse_paths,
    parse_public_url,
    parse_pyroscope_url,
    parse_service,
    parse_store,
    warn_unknown_variables,
)

__all__ = ["DEBUG_PREFIX", "MODES", "Config", "Settings", "env_name"]

DEBUG_PREFIX = "/debug/profile"
"""Where the viewer lives, in the app and in ``otelprof serve``."""


class Settings(TypedDict, total=False):
    """The keyword arguments both middlewares accept; see :class:`Config` for each."""

    enabled: bool
    sample_rate: float
    min_duration_ms: float
    slow_floor_ms: float
    keep_per_second: float
    store: str
    store_max_profiles: int
    store_max_bytes: int
    debug_route: bool
    debug_token: str
    public_url: str
    interval_ms: float
    exclude_paths: tuple[str, ...] | list[str] | str
    trigger_header: str
    mode: str
    hook_sample_rate: float
    always_on_interval_ms: float
    always_on_sigprof: bool
    max_concurrent: int
    max_samples: int
    writer_queue_size: int
    service_name: str
    state_dir: str
    pyroscope_url: str
    pyroscope_tenant_id: str
    otlp_profiles: bool
    otlp_profiles_pyroscope: bool


_PARSERS: dict[str, Callable[[str, object], Any]] = {
    "enabled": parse_bool,
    "sample_rate": lambda n, v: parse_float(n, v, low=0.0, high=1.0),
    "min_duration_ms": lambda n, v: parse_optional_float(n, v, low=0.0),
    "slow_floor_ms": lambda n, v: parse_float(n, v, low=0.0),
    "keep_per_second": lambda n, v: parse_float(n, v, low=0.0),
    "store": parse_store,
    "store_max_profiles": lambda n, v: parse_int(n, v, low=1),
    "store_max_bytes": lambda n, v: parse_int(n, v, low=1024),
    "debug_route": parse_bool,
    "debug_token": parse_optional_str,
    "public_url": parse_public_url,
    "interval_ms": lambda n, v: parse_float(n, v, low=0.05, high=1000.0),
    "exclude_paths": parse_paths,
    "mode": parse_mode,
    "hook_sample_rate": lambda n, v: parse_float(n, v, low=0.0, high=1.0),
    "always_on_interval_ms": lambda n, v: parse_float(n, v, low=0.5, high=1000.0),
    "always_on_sigprof": parse_bool,
    "trigger_header": parse_header,
    "max_concurrent": lambda n, v: parse_int(n, v, low=1),
    "max_samples": lambda n, v: parse_int(n, v, low=10),
    "writer_queue_size": lambda n, v: parse_int(n, v, low=1),
    "service_name": parse_service,
    "state_dir": parse_path,
    "pyroscope_url": parse_pyroscope_url,
    "pyroscope_tenant_id": parse_optional_str,
    "otlp_profiles": parse_bool,
    "otlp_profiles_pyroscope": parse_bool,
}


@dataclass(frozen=True, slots=True)
class Config:
    """All settings of the middleware. Build it with :meth:`Config.load`.

    Attributes:
        enabled: master switch (``OTELPROF_ENABLED``, default ``True``).
        sample_rate: fraction of traces profiled, decided by trace id
            (``OTELPROF_SAMPLE_RATE``, default ``1``: every request, which the default
            ``always_on`` mode makes cheap).
        min_duration_ms: when set, keep exactly the profiles of requests that took at
            least this long (``0``: keep all), instead of the keep policy
            (``OTELPROF_MIN_DURATION_MS``, default unset: the policy keeps a profile when
            its request was slow for its route, failed, or was triggered).
        slow_floor_ms: the keep policy never calls a request faster than this slow
            (``OTELPROF_SLOW_FLOOR_MS``, default ``50``).
        keep_per_second: the keep policy's budget: slow and failed requests' profiles
            kept per second per process, at most (``OTELPROF_KEEP_PER_SECOND``, default
            ``5``; bursts of two seconds' worth). Triggered profiles are always kept.
        store: store URL (``OTELPROF_STORE``); ``None`` means the embedded SQLite
            store under ``state_dir``.
        store_max_profiles: the store keeps at most this many profiles
            (``OTELPROF_STORE_MAX_PROFILES``, default ``1000``).
        store_max_bytes: and at most this many compressed bytes
            (``OTELPROF_STORE_MAX_BYTES``, default 64 MiB).
        debug_route: serve ``/debug/profile`` (``OTELPROF_DEBUG_ROUTE``, default ``False``).
        debug_token: when set, the viewer and the trigger header require it
            (``OTELPROF_DEBUG_TOKEN``).
        public_url: base URL put in span links, e.g. ``https://api.example.com``
            (``OTELPROF_PUBLIC_URL``); default: the request's own scheme and host.
        interval_ms: sampling interval (``OTELPROF_INTERVAL_MS``, default ``1``).
        exclude_paths: paths (and their sub-paths) never profiled
            (``OTELPROF_EXCLUDE_PATHS``, comma-separated). The viewer's own routes are
            always excluded.
        mode: ``always_on`` (default): a sampler per process reads the stacks of the
            threads serving profiled requests every ``always_on_interval_ms``, a few
            percent, so every request can be profiled; ``hook``: a pyinstrument hook on the
            threads of each profiled request, full detail, pyinstrument's cost per Python
            call (``OTELPROF_MODE``). Triggered requests always get the hook.
        hook_sample_rate: in ``always_on`` mode, the fraction of traces profiled with the
            hook instead (``OTELPROF_HOOK_SAMPLE_RATE``, default ``0``); triggered
            requests always get the hook. Ignored in ``hook`` mode.
        always_on_interval_ms: the always-on sampler's interval
            (``OTELPROF_ALWAYS_ON_INTERVAL_MS``, default ``5``).
        always_on_sigprof: in ``always_on`` mode, tick an event loop that runs on the
            main thread with ``SIGPROF`` from a timer on the process's CPU time (a POSIX
            timer of its own, which ``exec`` deletes), instead of the sampler thread,
            when no other code uses that signal (``OTELPROF_ALWAYS_ON_SIGPROF``, default
            ``True``; see docs/always-on.md for what was tested).
        trigger_header: request header that asks for a profile
            (``OTELPROF_TRIGGER_HEADER``, default ``x-otelprof``).
        max_concurrent: hook-profiled requests in flight per middleware
            (``OTELPROF_MAX_CONCURRENT``, default ``32``); always-on profiles are capped at
            1024 in flight.
        max_samples: samples kept per profile (``OTELPROF_MAX_SAMPLES``, default ``20000``).
        writer_queue_size: profiles waiting for the background writer
            (``OTELPROF_WRITER_QUEUE_SIZE``, default ``256``); more are dropped and counted.
        service_name: names the state directory (``OTELPROF_SERVICE_NAME``); default
            ``OTEL_SERVICE_NAME`` or ``unknown_service``.
        state_dir: where the embedded store lives (``OTELPROF_STATE_DIR``; a leading
            ``~`` is the home directory); default
            ``$XDG_STATE_HOME/otelprof/<service_name>`` (``~/.local/state/...``).
        pyroscope_url: also push each kept profile to this Grafana Pyroscope server,
            e.g. ``http://pyroscope:4040`` (``OTELPROF_PYROSCOPE_URL``; default: off).
            ``user:password@`` in the URL is sent as basic auth. When on, kept profiles
            also get the span attribute ``pyroscope.profile.id``; see docs/pyroscope.md.
        pyroscope_tenant_id: ``X-Scope-OrgID`` sent to Pyroscope
            (``OTELPROF_PYROSCOPE_TENANT_ID``; default: none).
        otlp_profiles: also send each kept profile over OTLP's profiles signal
            (http/protobuf) to the endpoint of the standard ``OTEL_EXPORTER_OTLP_*``
            variables, every sample linked to its span (``OTELPROF_OTLP_PROFILES``,
            default ``False``). Needs the ``otlp`` extra; see docs/otlp-profiles.md.
        otlp_profiles_pyroscope: the OTLP profiles end up in Grafana Pyroscope: set
            ``pyroscope.profile.id`` on their spans, for Grafana's "traces to profiles"
            (``OTELPROF_OTLP_PROFILES_PYROSCOPE``, default ``False``).
    """

    enabled: bool = True
    sample_rate: float = 1.0
    min_duration_ms: float | None = None
    slow_floor_ms: float = 50.0
    keep_per_second: float = 5.0
    store: str | None = None
    store_max_profiles: int = 1000
    store_max_bytes: int = 64 * 1024 * 1024
    debug_route: bool = False
    debug_token: str | None = None
    public_url: str | None = None
    interval_ms: float = 1.0
    exclude_paths: tuple[str, ...] = ()
    trigger_header: str = "x-otelprof"
    mode: str = "always_on"
    hook_sample_rate: float = 0.0
    always_on_interval_ms: float = 5.0
    always_on_sigprof: bool = True
    max_concurrent: int = 32
    max_samples: int = 20_000
    writer_queue_size: int = 256
    service_name: str | None = None
    state_dir: str | None = None
    pyroscope_url: str | None = None
    pyroscope_tenant_id: str | None = None
    otlp_profiles: bool = False
    otlp_profiles_pyroscope: bool = False

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, /, **overrides: object) -> Config:
        """Build a config from keyword ``overrides``, then ``OTELPROF_*`` variables, then defaults.

        Raises:
            ValueError: an unknown keyword, or a value that does not parse; the message
                names the setting and its environment variable.
        """
        env = os.environ if environ is None else environ
        known = {f.name for f in fields(cls)}
        warn_unknown_variables(env, known)
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown otelprof setting(s): {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for name in known:
            if name in overrides and overrides[name] is not None:
                values[name] = _PARSERS[name](name, overrides[name])
            elif env.get(env_name(name), "").strip():  # blank means unset
                values[name] = _PARSERS[name](name, env[env_name(name)])
        if "service_name" not in values and env.get("OTEL_SERVICE_NAME"):
            # OTel allows any service name; ours names a directory, so tame it, never fail.
            tamed = re.sub(r"[^A-Za-z0-9._-]", "_", env["OTEL_SERVICE_NAME"].strip())[:100]
            values["service_name"] = tamed.strip(".") or None
        return cls(**values)

    @property
    def interval(self) -> float:
        """The sampling interval in seconds."""
        return self.interval_ms / 1000.0

    @property
    def resolved_service_name(self) -> str:
        """``service_name``, or ``unknown_service`` as OTel names an unnamed service."""
        return self.service_name or "unknown_service"

    def resolved_state_dir(self) -> str | None:
        """The per-service directory of the embedded store; None when there is no home
        directory to put it in (see :func:`state_home`)."""
        if self.state_dir:
            return self.state_dir
        base = state_home()
        if base is None:
            return None
        return os.path.join(base, "otelprof", self.resolved_service_name)

    def base_url(self, scheme: str, host: str | None, root_path: str) -> str:
        """The start of profile links: ``public_url``, else the request's scheme and host."""
        if self.public_url:
            return self.public_url
        return f"{scheme}://{host or 'localhost'}{root_path.rstrip('/')}"

    def resolved_store_url(self) -> str:
        """The store URL in force: ``store`` or the embedded SQLite file."""
        if self.store:
            return self.store
        state_dir = self.resolved_state_dir()
        if state_dir is None:
            return NO_HOME_STORE
        return "sqlite:///" + os.path.join(state_dir, "profiles.db")


NO_HOME_STORE = "memory://"
"""The default store when there is no home directory (:func:`state_home` is None)."""


def state_home() -> str | None:
    """``$XDG_STATE_HOME``, else ``~/.local/state``; None when neither is an absolute path.

    With ``HOME`` unset and no password-file entry for the user (``env -i``, a container
    run under an arbitrary uid, some hermetic test runners), ``~`` does not expand: the
    embedded store went to a directory literally named ``~`` under the current directory,
    the checkout a test suite runs in (where ``rm -rf ~`` is the obvious clean-up). A
    relative ``XDG_STATE_HOME`` is ignored, as the XDG specification says.
    """
    xdg = os.environ.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg):
        return xdg
    home = os.path.expanduser("~")
    if not os.path.isabs(home):
        return None
    return os.path.join(home, ".local", "state")
