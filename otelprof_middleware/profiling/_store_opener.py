"""The profile store, opened on first use and retried after a failure.

The store is not opened when the middleware is built (a server's master process may
fork after that); the writer opens it with the first kept profile, the viewer with the
first page. One :class:`StoreOpener` per middleware serves both. A store named by a URL
is opened once per process (:func:`open_shared`).
"""

from __future__ import annotations

import os
import threading
import weakref

from .. import _clock
from .._config import NO_HOME_STORE, Config
from .._failsafe import log_once
from .._fork import renew_locks_in_children
from ..stores import _parse, open_store
from ..stores._base import ProfileStore

__all__ = ["STORE_RETRY_SECONDS", "StoreOpener", "open_shared"]

STORE_RETRY_SECONDS = 5.0
"""After a failed open, the seconds during which :meth:`StoreOpener.get` fails at once."""


class StoreOpener:
    """Opens the store of ``config`` on first use; after a failure, retries every
    :data:`STORE_RETRY_SECONDS` (in between, :meth:`get` fails without trying).

    Args:
        config: the settings (``store`` URL and bounds).
        store: a store instance to use instead of opening ``config.store``.
    """

    def __init__(self, config: Config, store: ProfileStore | None = None) -> None:
        self._config = config
        self._store = store
        self._lock = threading.Lock()
        self._retry_at = 0.0
        # Why the last attempt to open it failed (text: the exception's traceback would
        # keep the failed caller's frames, and so its batch of profiles, alive).
        self._failure = ""
        renew_locks_in_children(self)

    def renew_locks(self) -> None:
        """In a forked child: the parent's writer thread may have been opening the store."""
        self._lock = threading.Lock()

    @property
    def opened(self) -> ProfileStore | None:
        """The store if it is open (given, or opened by :meth:`get`); never opens it."""
        return self._store

    def get(self) -> ProfileStore:
        """The store, opened now if this is its first use.

        Raises:
            Exception: whatever opening the store raised, or ``RuntimeError`` naming
                that failure while its retry delay runs (callers fail open; their
                rate-limited log then still says why, long after the first failure).
        """
        store = self._store
        if store is not None:
            return store
        with self._lock:
            if self._store is not None:
                return self._store
            now = _clock.monotonic()
            # (a wait longer than the delay: the clock went back, frozen by a test)
            if now < self._retry_at <= now + STORE_RETRY_SECONDS:
                raise RuntimeError(
                    f"profile store unavailable ({self._failure}); retrying every "
                    f"{STORE_RETRY_SECONDS:g} s"
                )
            url = self._config.resolved_store_url()
            if url == NO_HOME_STORE and not self._config.store:
                log_once(
                    "no_home",
                    "otelprof: no home directory (HOME is unset and the user has no "
                    "password-file entry), so the embedded store has nowhere to go: "
                    "profiles are kept in memory, per process. Set OTELPROF_STATE_DIR or "
                    "OTELPROF_STORE to keep them on disk.",
                )
            try:
                self._store = open_shared(
                    url,
                    max_profiles=self._config.store_max_profiles,
                    max_bytes=self._config.store_max_bytes,
                )
            except Exception as exc:
                self._retry_at = now + STORE_RETRY_SECONDS
                self._failure = f"{type(exc).__name__}: {exc}"
                raise
            return self._store


class _SharedStores:
    """The stores opened by URL in this process, by (kind, target, bounds)."""

    def __init__(self) -> None:
        # Weak values: a store lives while a middleware uses it. A suite that gives each
        # test's app a store of its own (``OTELPROF_STORE=sqlite:///<tmp_path>/...``) kept
        # every one open, three file descriptors each, to the end of the process.
        self.stores: weakref.WeakValueDictionary[tuple[str, str, int, int], ProfileStore] = (
            weakref.WeakValueDictionary()
        )
        self.lock = threading.Lock()
        renew_locks_in_children(self)

    def renew_locks(self) -> None:
        """In a forked child: a thread of the parent may have been opening a store."""
        self.lock = threading.Lock()


_shared = _SharedStores()


def open_shared(url: str, *, max_profiles: int, max_bytes: int) -> ProfileStore:
    """The store ``url`` names, opened once per process: the middlewares of a process
    that name the same SQLite file (or Redis URL) with the same bounds share it, and so
    one connection (or pool). Each used to open its own and keep it to the end of the
    process (its writer is closed at exit), so a test suite that builds an app per test
    ran out of file descriptors. ``memory://`` is still one store per middleware.

    Raises:
        Exception: whatever :func:`~otelprof_middleware.stores.open_store` raised.
    """
    kind, target = _parse(url)
    if kind == "memory":
        return open_store(url, max_profiles=max_profiles, max_bytes=max_bytes)
    if kind == "sqlite":
        target = os.path.abspath(target)  # as the store resolves it
    key = (kind, target, max_profiles, max_bytes)
    with _shared.lock:
        store = _shared.stores.get(key)
        if store is None:
            store = open_store(url, max_profiles=max_profiles, max_bytes=max_bytes)
            _shared.stores[key] = store
        return store
