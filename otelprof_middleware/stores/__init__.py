"""Profile stores and :func:`open_store`, which picks one from a URL (``OTELPROF_STORE``)."""

from __future__ import annotations

from ._base import ProfileStore, redact_url
from .memory import DEFAULT_MAX_BYTES, DEFAULT_MAX_PROFILES, MemoryStore
from .redis import RedisStore
from .sqlite import SQLiteStore

__all__ = [
    "MemoryStore",
    "ProfileStore",
    "RedisStore",
    "SQLiteStore",
    "check_store_url",
    "open_store",
]


def open_store(
    url: str,
    *,
    max_profiles: int = DEFAULT_MAX_PROFILES,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> ProfileStore:
    """Open the store a URL names (the ``OTELPROF_STORE`` setting).

    SQLite URLs follow SQLAlchemy's convention: everything after ``sqlite:///`` is
    the file path, taken literally (no ``~`` expansion or percent-decoding). So
    ``sqlite:///profiles.db`` is relative to the current directory and
    ``sqlite:////var/lib/otelprof/profiles.db`` (four slashes) is absolute.

    Redis URLs are ``redis://[[user]:password@]host[:port][/db]`` or ``rediss://...``
    (TLS), with optional ``?ttl=<seconds>`` and ``?prefix=<key prefix>``; other query
    parameters go to redis-py (see :class:`~otelprof_middleware.stores.RedisStore`).

    Args:
        url: ``memory://``, ``sqlite:///<path>``, ``redis://...`` or ``rediss://...``.
        max_profiles: the store keeps at most this many profiles
            (``OTELPROF_STORE_MAX_PROFILES``, default ``1000``).
        max_bytes: and at most this many compressed payload bytes
            (``OTELPROF_STORE_MAX_BYTES``, default 64 MiB).

    Returns:
        The opened store; the caller closes it.

    Raises:
        ValueError: the URL is malformed or names an unknown or unavailable backend.
        OSError: the SQLite file or its directory cannot be created.
        sqlite3.DatabaseError: the SQLite file is not a usable store.
        ImportError: a Redis URL, and redis-py is not installed
            (``pip install otelprof-middleware[redis]``).

    Example::

        store = open_store("sqlite:////var/lib/otelprof/api/profiles.db")
    """
    kind, target = _parse(url)
    if kind == "memory":
        return MemoryStore(max_profiles=max_profiles, max_bytes=max_bytes)
    if kind == "sqlite":
        return SQLiteStore(target, max_profiles=max_profiles, max_bytes=max_bytes)
    return RedisStore(target, max_profiles=max_profiles, max_bytes=max_bytes)


def check_store_url(url: str) -> None:
    """Raise ``ValueError`` now for a URL :func:`open_store` would refuse.

    Opens no file and no connection (a Redis store is built, which does not connect, and
    closed), so it is safe in a server's master process before it forks its workers.
    """
    kind, target = _parse(url)
    if kind == "redis":
        RedisStore(target).close()


def _parse(url: str) -> tuple[str, str]:
    """``("memory" | "sqlite" | "redis", the path or URL)``, or ``ValueError``."""
    scheme, sep, rest = url.partition(":")
    scheme = scheme.lower()
    if not sep or not scheme:
        raise ValueError(
            f"OTELPROF_STORE must be a URL like sqlite:///path/profiles.db or memory://, "
            f"got {redact_url(url)!r}"
        )
    if scheme == "memory":
        if rest != "//":
            raise ValueError(
                "OTELPROF_STORE: the memory store URL is exactly memory://, "
                f"got {redact_url(url)!r}"
            )
        return "memory", ""
    if scheme == "sqlite":
        path = rest[3:] if rest.startswith("///") else ""
        if not path or "?" in path or path == ":memory:":
            raise ValueError(
                f"OTELPROF_STORE: a SQLite URL is sqlite:///relative/path.db or "
                f"sqlite:////absolute/path.db (no query string), got {redact_url(url)!r}"
            )
        return "sqlite", path
    if scheme in ("redis", "rediss"):
        return "redis", url
    raise ValueError(
        f"OTELPROF_STORE: unknown store scheme {scheme!r} in {redact_url(url)!r}; expected "
        "sqlite:///path/profiles.db, memory:// or redis://host:6379/0"
    )
