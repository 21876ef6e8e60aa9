"""Profile stores and :func:`open_store`, which picks one from a URL (``OTELPROF_STORE``)."""

from __future__ import annotations

from ._base import ProfileStore
from .memory import DEFAULT_MAX_BYTES, DEFAULT_MAX_PROFILES, MemoryStore
from .redis import RedisStore
from .sqlite import SQLiteStore

__all__ = ["MemoryStore", "ProfileStore", "RedisStore", "SQLiteStore", "open_store"]


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
    scheme, sep, rest = url.partition(":")
    scheme = scheme.lower()
    if not sep or not scheme:
        raise ValueError(
            f"OTELPROF_STORE must be a URL like sqlite:///path/profiles.db or memory://, "
            f"got {url!r}"
        )
    if scheme == "memory":
        if rest != "//":
            raise ValueError(
                f"OTELPROF_STORE: the memory store URL is exactly memory://, got {url!r}"
            )
        return MemoryStore(max_profiles=max_profiles, max_bytes=max_bytes)
    if scheme == "sqlite":
        path = rest[3:] if rest.startswith("///") else ""
        if not path or "?" in path or path == ":memory:":
            raise ValueError(
                f"OTELPROF_STORE: a SQLite URL is sqlite:///relative/path.db or "
                f"sqlite:////absolute/path.db (no query string), got {url!r}"
            )
        return SQLiteStore(path, max_profiles=max_profiles, max_bytes=max_bytes)
    if scheme in ("redis", "rediss"):
        return RedisStore(url, max_profiles=max_profiles, max_bytes=max_bytes)
    raise ValueError(
        f"OTELPROF_STORE: unknown store scheme {scheme!r} in {url!r}; expected "
        "sqlite:///path/profiles.db, memory:// or redis://host:6379/0"
    )
