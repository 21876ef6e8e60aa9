"""The ``otelprof`` command: the standalone viewer and a terminal view of a profile store.

Usage::

    otelprof serve --store redis://cache:6379/0 [--host 127.0.0.1] [--port 8089]
                   [--token T] [--public-url https://profiles.example.com]
    otelprof ls [--store URL] [--route R] [--min-duration-ms N] [--slowest]
                [--limit N] [--json]
    otelprof show TRACE_ID [--span-id S] [--format text|json|speedscope|html|folded]
    otelprof export TRACE_ID [--span-id S] [--format ...] -o FILE

``python -m otelprof_middleware.cli`` works too. ``--store`` defaults to
``OTELPROF_STORE``, else the embedded SQLite store of ``OTELPROF_SERVICE_NAME``
under ``OTELPROF_STATE_DIR`` (what the middleware uses). ``--token`` defaults to
``OTELPROF_DEBUG_TOKEN`` and ``--public-url`` to ``OTELPROF_PUBLIC_URL``.

Exit codes: ``0`` done; ``1`` no such profile, the store failed, or ``serve`` could not
listen; ``2`` bad usage (malformed ids, bad options or settings, a non-loopback ``serve``
without a token).

This package holds :func:`main`; the options are in ``_parser``, each command in its own
module (``_serve``, ``_ls``, ``_show`` for show and export), what they share in
``_common``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ..viewer import ViewerApp
from ._common import CommandExit
from ._ls import list_profiles
from ._parser import build_parser
from ._serve import serve
from ._show import show

__all__ = ["ViewerApp", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``otelprof`` command line.

    Args:
        argv: the arguments without the program name; default ``sys.argv[1:]``.

    Returns:
        The exit code: ``0`` done, ``1`` not found, store failure or ``serve`` could not
        listen, ``2`` bad usage.
        (argparse itself exits with ``SystemExit(2)`` on unknown options.)
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "ls":
            return list_profiles(args)
        return show(args)
    except CommandExit as stop:
        print(f"otelprof: {stop.message}", file=sys.stderr)
        return stop.code
    except BrokenPipeError:
        # The reader went away (otelprof ls | head): not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
