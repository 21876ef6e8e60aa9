"""What the ``otelprof`` commands share: the exit with a message, the settings, the store,
and writing to stdout."""

from __future__ import annotations

import argparse
import os
import sys

from .._config import Config
from ..stores import open_store
from ..stores._base import ProfileStore, redact_url

__all__ = ["CommandExit", "load_config", "open_profile_store", "store_url", "write_stdout"]


class CommandExit(Exception):
    """Stop the command with ``code``, printing ``message`` to stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def load_config() -> Config:
    """The settings from the environment; a bad one exits with code 2."""
    try:
        return Config.load()
    except ValueError as exc:
        raise CommandExit(2, str(exc)) from None


def store_url(args: argparse.Namespace, config: Config) -> str:
    """``--store``, else the store the middleware would use with these settings."""
    url: str = args.store or config.resolved_store_url()
    return url


def open_profile_store(url: str, config: Config, *, must_exist: bool) -> ProfileStore:
    """Open the store at ``url``; exit 1 when it cannot be opened, 2 on a bad URL.

    ``must_exist``: an embedded SQLite store that is not there is an error (exit 1)
    rather than created empty.
    """
    shown = redact_url(url)
    if must_exist and url.lower().startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if path and "?" not in path and not os.path.exists(path):
            raise CommandExit(
                1,
                f"no profile store at {os.path.abspath(path)}: nothing was profiled there "
                "yet; pass --store or set OTELPROF_STORE (or OTELPROF_STATE_DIR / "
                "OTELPROF_SERVICE_NAME) to the app's",
            )
    try:
        return open_store(
            url, max_profiles=config.store_max_profiles, max_bytes=config.store_max_bytes
        )
    except (ValueError, ImportError) as exc:
        raise CommandExit(2, str(exc)) from None
    except Exception as exc:
        raise CommandExit(1, f"cannot open the profile store {shown}: {exc}") from None


def write_stdout(text: str) -> None:
    """Write to stdout as UTF-8 whatever the locale (the text format draws with
    box characters)."""
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:
        sys.stdout.write(text)
    else:
        sys.stdout.flush()
        buffer.write(text.encode("utf-8"))
    sys.stdout.flush()
