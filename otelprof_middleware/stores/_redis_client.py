"""The Redis store's URL and client: options, validation, timeouts and retries.

:func:`settings` reads the URL, :func:`connect` builds redis-py's client, and
:class:`Connection` makes the store's calls on it: refused once closed, failing fast
for ``RETRY_AFTER_TIMEOUT_SECONDS`` after a timeout.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .. import _clock
from ._base import redact_url

if TYPE_CHECKING:
    import redis as redis_py

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_SOCKET_TIMEOUT",
    "DEFAULT_TTL_SECONDS",
    "RETRY_AFTER_TIMEOUT_SECONDS",
    "Connection",
    "Settings",
    "connect",
    "settings",
]

DEFAULT_TTL_SECONDS = 7 * 24 * 3600
"""How long a profile lives in Redis unless evicted earlier (URL query ``?ttl=``)."""

DEFAULT_PREFIX = "otelprof:"
"""The start of every key (URL query ``?prefix=``)."""

DEFAULT_SOCKET_TIMEOUT = 2.0
"""Seconds a connect or a reply may take before the call raises (URL query
``?socket_timeout=`` / ``?socket_connect_timeout=`` override it)."""

RETRY_AFTER_TIMEOUT_SECONDS = 1.0
"""After a call timed out, calls fail at once for this long instead of waiting again."""

_INSTALL_HINT = (
    "OTELPROF_STORE: the redis store needs redis-py: pip install 'otelprof-middleware[redis]'"
)


@dataclass(frozen=True, slots=True)
class Settings:
    """A Redis store's settings, read from its URL and arguments."""

    url: str
    """The URL with its password redacted (``store.url``)."""
    connection_url: str
    """The URL redis-py connects to: without our own ``ttl`` and ``prefix`` options."""
    ttl_seconds: float
    prefix: str


def settings(url: str, ttl_seconds: float | None, prefix: str | None) -> Settings:
    """Validate ``url`` and split off our options (``?ttl=``, ``?prefix=``); an explicit
    ``ttl_seconds`` or ``prefix`` wins over the URL's.

    Raises:
        ValueError: a bad URL, TTL or prefix.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # a malformed IPv6 host
        host = None
    if host is None or parts.scheme.lower() not in ("redis", "rediss"):
        raise ValueError(
            f"OTELPROF_STORE: a Redis URL is redis://host:6379/0 or rediss://host:6380/0, "
            f"got {redact_url(url)!r}"
        )
    query: list[tuple[str, str]] = []
    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in ("ttl", "prefix"):
            if name in options:
                raise ValueError(f"OTELPROF_STORE: {name!r} given twice in the Redis URL")
            options[name] = value
        else:
            query.append((name, value))
    if ttl_seconds is None:
        ttl_seconds = _parse_ttl(options["ttl"]) if "ttl" in options else DEFAULT_TTL_SECONDS
    if (
        isinstance(ttl_seconds, bool)
        or not isinstance(ttl_seconds, (int, float))
        or not math.isfinite(ttl_seconds)
        or ttl_seconds < 0.001
    ):
        raise ValueError(f"ttl_seconds must be a positive number, got {ttl_seconds!r}")
    if prefix is None:
        prefix = options.get("prefix", DEFAULT_PREFIX)
    if not prefix or len(prefix) > 200:
        raise ValueError(
            f"OTELPROF_STORE: the Redis key prefix must be 1 to 200 characters, got {prefix!r}"
        )
    return Settings(
        url=redact_url(url),
        connection_url=urlunsplit(parts._replace(query=urlencode(query))),
        ttl_seconds=float(ttl_seconds),
        prefix=prefix,
    )


def connect(url: str, chosen: Settings) -> tuple[Any, redis_py.Redis]:
    """redis-py and a client for ``chosen`` (it connects at its first call).

    Raises:
        ImportError: redis-py is not installed.
        ValueError: a port or client option redis-py would reject.
    """
    try:
        import redis
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    _check_client_options(redis, chosen.connection_url, url)
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    try:
        client: redis_py.Redis = redis.Redis.from_url(
            chosen.connection_url,
            socket_timeout=DEFAULT_SOCKET_TIMEOUT,
            socket_connect_timeout=DEFAULT_SOCKET_TIMEOUT,
            # One quick retry when a connection breaks mid-call (redis-py already
            # replaces pooled connections that broke while idle); none for timeouts,
            # so a hung server costs one timeout, not redis-py's default ten retries.
            retry=Retry(
                ExponentialBackoff(cap=0.1, base=0.02),
                1,
                supported_errors=(redis.ConnectionError,),
            ),
            retry_on_error=[redis.ConnectionError],
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"OTELPROF_STORE: bad Redis URL {chosen.url!r}: {exc}") from exc
    return redis, client


class Connection:
    """redis-py's client for one store, and the way the store calls it.

    Args:
        url: the store's URL as given (for messages about a bad port or option).
        chosen: its :func:`settings`.

    Raises:
        ImportError: redis-py is not installed.
        ValueError: a port or client option redis-py would reject.
    """

    def __init__(self, url: str, chosen: Settings) -> None:
        redis, client = connect(url, chosen)
        self.redis: Any = redis
        """redis-py, for its exception types."""
        self.client: redis_py.Redis = client
        """The client; it connects at its first call."""
        self.url = chosen.url
        self._timed_out_until = 0.0
        self._closed = False
        self._close_lock = threading.Lock()

    def check_open(self) -> None:
        """Raise ``RuntimeError`` once :meth:`close` was called."""
        if self._closed:
            raise RuntimeError(f"the profile store {self.url} is closed")

    def run(self, call: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Make one Redis call, failing fast for a while after a timeout.

        A timeout means a hung server or a lost network, where every call would wait
        the full socket timeout: for ``RETRY_AFTER_TIMEOUT_SECONDS`` afterwards, calls
        raise ``redis.TimeoutError`` at once instead (a writer retrying a batch record
        by record, or a busy viewer, would otherwise wait once per call). Refused
        connections fail fast by themselves and are retried on every call.

        Raises:
            RuntimeError: the store is closed.
            redis.RedisError: what ``call`` raised, or ``redis.TimeoutError`` at once
                within ``RETRY_AFTER_TIMEOUT_SECONDS`` of a timeout.
        """
        self.check_open()
        if _clock.monotonic() < self._timed_out_until:
            raise self.redis.TimeoutError(
                f"Redis at {self.url} timed out less than {RETRY_AFTER_TIMEOUT_SECONDS:g} s "
                "ago; not waiting on it again yet"
            )
        try:
            return call(*args, **kwargs)
        except self.redis.TimeoutError:
            self._timed_out_until = _clock.monotonic() + RETRY_AFTER_TIMEOUT_SECONDS
            raise

    def close(self) -> None:
        """Close the connection pool. Safe to call twice; :meth:`run` then raises
        ``RuntimeError``."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self.client.close()


def _check_client_options(redis: Any, connection_url: str, url: str) -> None:
    """Raise ``ValueError`` now for a port or option redis-py would reject at connect time.

    redis-py connects lazily: ``redis://host:notaport/0`` or ``?bogus_opt=1`` would
    otherwise start fine and fail at the first write. Builds one connection object (it
    does not connect) from the URL's options.
    """
    try:
        urlsplit(url).port  # noqa: B018  (raises ValueError for a port that is not a number)
        pool = redis.ConnectionPool.from_url(connection_url)
        pool.make_connection()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"OTELPROF_STORE: bad Redis URL {redact_url(url)!r}: {exc}") from None


def _parse_ttl(value: str) -> float:
    try:
        ttl = float(value)
    except ValueError:
        raise ValueError(
            f"OTELPROF_STORE: ?ttl= in a Redis URL is a number of seconds, got {value!r}"
        ) from None
    if not math.isfinite(ttl) or ttl < 0.001:
        raise ValueError(f"OTELPROF_STORE: ?ttl= must be a positive number, got {value!r}")
    return ttl
