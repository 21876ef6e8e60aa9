"""The ``otelprof`` command line: its options and what they accept."""

from __future__ import annotations

import argparse

from ..render import FORMATS

__all__ = ["DEFAULT_HOST", "DEFAULT_LS_LIMIT", "DEFAULT_PORT", "build_parser"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8089
DEFAULT_LS_LIMIT = 50


def _positive_int(text: str) -> int:
    """An integer >= 1 (``--limit``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _port(text: str) -> int:
    """A TCP port, 1 to 65535 (``--port``)."""
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    """A finite number >= 0 (``--min-duration-ms``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``otelprof`` and its commands (serve, ls, show, export)."""
    parser = argparse.ArgumentParser(
        prog="otelprof",
        description="Serve and inspect the request profiles stored by otelprof-middleware.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    store_help = (
        "the profile store URL (sqlite:///path, redis://host:6379/0, ...); default: "
        "OTELPROF_STORE, else the embedded store of OTELPROF_SERVICE_NAME under "
        "OTELPROF_STATE_DIR"
    )

    serve = commands.add_parser(
        "serve",
        help="serve the /debug/profile pages from a store",
        description=(
            "Serve the profile viewer (the app's /debug/profile pages) outside the app, "
            "e.g. behind your reverse proxy. Without a token only loopback clients are "
            "served, so a host other than loopback needs --token."
        ),
    )
    serve.add_argument("--store", help=store_help)
    serve.add_argument("--host", default=DEFAULT_HOST, help="bind address (default 127.0.0.1)")
    serve.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})"
    )
    serve.add_argument(
        "--token",
        help="debug token every client must present (default: OTELPROF_DEBUG_TOKEN; "
        "prefer the variable: arguments show in the process list)",
    )
    serve.add_argument(
        "--public-url",
        help="base URL of this viewer as users reach it, for the links in ?format=json "
        "(default: OTELPROF_PUBLIC_URL, else the request's host)",
    )
    serve.add_argument(
        "--root-path",
        default="",
        help="the path prefix your reverse proxy strips before forwarding, e.g. /profiles "
        "for a proxy that serves /profiles/debug/profile from this viewer's /debug/profile: "
        "the pages link to, and the token cookie is scoped to, <root-path>/debug/profile "
        "(default: none)",
    )

    ls = commands.add_parser("ls", help="list recent profiles", description="List profiles.")
    ls.add_argument("--store", help=store_help)
    ls.add_argument("--route", help="only this route template, e.g. '/items/{item_id}'")
    ls.add_argument(
        "--min-duration-ms", type=_non_negative, help="only requests at least this slow"
    )
    ls.add_argument("--slowest", action="store_true", help="slowest first (default: newest)")
    ls.add_argument(
        "--limit",
        type=_positive_int,
        default=DEFAULT_LS_LIMIT,
        help=f"at most this many (default {DEFAULT_LS_LIMIT})",
    )
    ls.add_argument("--json", action="store_true", help='print {"profiles": [...]} as JSON')

    for name, summary in (
        ("show", "print one profile to stdout"),
        ("export", "write one profile to a file"),
    ):
        sub = commands.add_parser(name, help=summary, description=summary.capitalize() + ".")
        sub.add_argument("trace_id", metavar="TRACE_ID", help="32 lowercase hex digits")
        sub.add_argument(
            "--span-id",
            help="16 lowercase hex digits; needed when the trace "
            "crossed the service more than once",
        )
        sub.add_argument("--store", help=store_help)
        if name == "show":
            sub.add_argument("--format", choices=FORMATS, default="text", help="default: text")
        else:
            sub.add_argument(
                "--format",
                choices=FORMATS,
                help="default: from the file name (.html, .speedscope.json, .json, .txt, "
                ".folded; html for a name without a suffix)",
            )
            sub.add_argument(
                "-o", "--output", required=True, help="the file to write ('-' for stdout)"
            )
    return parser
