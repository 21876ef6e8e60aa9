"""Typed configuration: keyword arguments first, then ``OTELPROF_*`` environment variables.

Every field has a safe default. An invalid value raises ``ValueError`` at start-up,
naming the keyword and its environment variable.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypedDict, TypeVar
from urllib.parse import urlsplit

__all__ = ["DEBUG_PREFIX", "MODES", "Config", "Settings", "env_name"]

DEBUG_PREFIX = "/debug/profile"
"""Where the viewer lives, in the app and in ``otelprof serve``."""

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")

T = TypeVar("T")
logger = logging.getLogger("otelprof_middleware")


def env_name(field_name: str) -> str:
    """The environment variable of a setting: ``sample_rate`` -> ``OTELPROF_SAMPLE_RATE``."""
    return "OTELPROF_" + field_name.upper()


def _where(name: str) -> str:
    return f"{name} ({env_name(name)})"


def _parse_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError(f"{_where(name)} must be true/false/1/0/yes/no, got {value!r}")


def _parse_float(name: str, value: object, *, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{_where(name)} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{_where(name)} must be a number, got {value!r}") from None
    if math.isnan(number) or not low <= number <= high:
        bounds = f"between {low:g} and {high:g}" if high != math.inf else f">= {low:g}"
        raise ValueError(f"{_where(name)} must be {bounds}, got {value!r}")
    return number


def _parse_optional_float(name: str, value: object, *, low: float) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None  # blank means unset: the keep policy decides
    return _parse_float(name, value, low=low)


def _parse_int(name: str, value: object, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{_where(name)} must be an integer, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{_where(name)} must be an integer, got {value!r}") from None
    if number < low:
        raise ValueError(f"{_where(name)} must be >= {low}, got {value!r}")
    return number


def _parse_optional_str(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{_where(name)} must be a string, got {value!r}")
    return value.strip() or None


def _parse_paths(name: str, value: object) -> tuple[str, ...]:
    items: list[object]
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple, frozenset, set)):
        items = list(value)
    else:
        raise ValueError(f"{_where(name)} must be a comma-separated string or a list of paths")
    paths: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item.startswith("/"):
            raise ValueError(f"{_where(name)}: every path must start with '/', got {item!r}")
        paths.append(item.rstrip("/") or "/")
    return tuple(paths)


def _parse_public_url(name: str, value: object) -> str | None:
    text = _parse_optional_str(name, value)
    if text is None:
        return None
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{_where(name)} must be an absolute http(s) URL, got {text!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"{_where(name)} must not carry a query or fragment, got {text!r}")
    return text.rstrip("/")


def _parse_store(name: str, value: object) -> str | None:
    text = _parse_optional_str(name, value)
    if text is None:
        return None
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    if scheme not in ("sqlite", "memory", "redis", "rediss"):
        raise ValueError(
            f"{_where(name)} must be a URL like sqlite:///path/profiles.db, memory:// "
            f"or redis://host:6379/0, got {text!r}"
        )
    return text


def _parse_pyroscope_url(name: str, value: object) -> str | None:
    text = _parse_optional_str(name, value)
    if text is None:
        return None
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # Never echo the value: it may carry basic-auth credentials.
        raise ValueError(f"{_where(name)} must be an absolute http(s) URL")
    if parts.query or parts.fragment:
        raise ValueError(f"{_where(name)} must not carry a query or fragment")
    return text


def _parse_header(name: str, value: object) -> str:
    text = _parse_optional_str(name, value)
    if text is None or _HEADER_NAME.fullmatch(text) is None:
        raise ValueError(f"{_where(name)} must be an HTTP header name, got {value!r}")
    return text.lower()


def _parse_service(name: str, value: object) -> str | None:
    text = _parse_optional_str(name, value)
    if text is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", text):
        raise ValueError(
            f"{_where(name)} may hold only letters, digits, '.', '_' and '-', got {text!r}"
        )
    return text


_OUR_TOOLING = ("OTELPROF_DEMO_", "OTELPROF_BENCH_", "OTELPROF_SOAK_", "OTELPROF_KEEP_REPORT")
"""Variables of this repository's demo, benchmark and tests, not settings."""
_warned_unknown: set[str] = set()


def _warn_unknown_variables(env: Mapping[str, str], known: set[str]) -> None:
    """Warn once per process about an ``OTELPROF_*`` variable no setting reads (a typo)."""
    names = {env_name(name) for name in known}
    for variable in env:
        if (
            not variable.startswith("OTELPROF_")
            or variable in names
            or variable in _warned_unknown
            or variable.startswith(_OUR_TOOLING)
        ):
            continue
        _warned_unknown.add(variable)
        close = difflib.get_close_matches(variable, sorted(names), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        logger.warning("otelprof: %s is not a setting and is ignored%s", variable, hint)


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


MODES = ("hook", "always_on")


def _parse_mode(name: str, value: object) -> str:
    text = _parse_optional_str(name, value)
    mode = (text or "").lower().replace("-", "_")
    if mode not in MODES:
        raise ValueError(f"{_where(name)} must be one of {', '.join(MODES)}, got {value!r}")
    return mode


_PARSERS: dict[str, Callable[[str, object], Any]] = {
    "enabled": _parse_bool,
    "sample_rate": lambda n, v: _parse_float(n, v, low=0.0, high=1.0),
    "min_duration_ms": lambda n, v: _parse_optional_float(n, v, low=0.0),
    "slow_floor_ms": lambda n, v: _parse_float(n, v, low=0.0),
    "keep_per_second": lambda n, v: _parse_float(n, v, low=0.0),
    "store": _parse_store,
    "store_max_profiles": lambda n, v: _parse_int(n, v, low=1),
    "store_max_bytes": lambda n, v: _parse_int(n, v, low=1024),
    "debug_route": _parse_bool,
    "debug_token": _parse_optional_str,
    "public_url": _parse_public_url,
    "interval_ms": lambda n, v: _parse_float(n, v, low=0.05, high=1000.0),
    "exclude_paths": _parse_paths,
    "mode": _parse_mode,
    "hook_sample_rate": lambda n, v: _parse_float(n, v, low=0.0, high=1.0),
    "always_on_interval_ms": lambda n, v: _parse_float(n, v, low=0.5, high=1000.0),
    "always_on_sigprof": _parse_bool,
    "trigger_header": _parse_header,
    "max_concurrent": lambda n, v: _parse_int(n, v, low=1),
    "max_samples": lambda n, v: _parse_int(n, v, low=10),
    "writer_queue_size": lambda n, v: _parse_int(n, v, low=1),
    "service_name": _parse_service,
    "state_dir": _parse_optional_str,
    "pyroscope_url": _parse_pyroscope_url,
    "pyroscope_tenant_id": _parse_optional_str,
    "otlp_profiles": _parse_bool,
    "otlp_profiles_pyroscope": _parse_bool,
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
        max_concurrent: hook-profiled requests in flight per process
            (``OTELPROF_MAX_CONCURRENT``, default ``32``); always-on profiles are capped at
            1024 in flight.
        max_samples: samples kept per profile (``OTELPROF_MAX_SAMPLES``, default ``20000``).
        writer_queue_size: profiles waiting for the background writer
            (``OTELPROF_WRITER_QUEUE_SIZE``, default ``256``); more are dropped and counted.
        service_name: names the state directory (``OTELPROF_SERVICE_NAME``); default
            ``OTEL_SERVICE_NAME`` or ``unknown_service``.
        state_dir: where the embedded store lives (``OTELPROF_STATE_DIR``); default
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
        _warn_unknown_variables(env, known)
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

    def resolved_state_dir(self) -> str:
        """The per-service directory of the embedded store."""
        if self.state_dir:
            return self.state_dir
        base = os.environ.get("XDG_STATE_HOME") or os.path.join(
            os.path.expanduser("~"), ".local", "state"
        )
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
        return "sqlite:///" + os.path.join(self.resolved_state_dir(), "profiles.db")
