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

Exit codes: ``0`` done; ``1`` no such profile, or the store failed; ``2`` bad usage
(malformed ids, bad options or settings, a non-loopback ``serve`` without a token).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from ._config import DEBUG_PREFIX, Config
from ._net import is_loopback
from ._record import ProfileRecord, ProfileSummary, is_span_id, is_trace_id
from ._time import utc
from .render import FORMATS, render
from .stores import open_store
from .stores._base import ProfileStore, redact_url
from .viewer import Viewer, ViewerApp

__all__ = ["ViewerApp", "main"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8089
DEFAULT_LS_LIMIT = 50

_EXPORT_SUFFIXES = (
    (".speedscope.json", "speedscope"),
    (".html", "html"),
    (".htm", "html"),
    (".json", "json"),
    (".txt", "text"),
    (".folded", "folded"),
)


class _Exit(Exception):
    """Stop the command with ``code``, printing ``message`` to stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- argument parsing ---------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
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
                ".folded), else html",
            )
            sub.add_argument(
                "-o", "--output", required=True, help="the file to write ('-' for stdout)"
            )
    return parser


# -- commands ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``otelprof`` command line.

    Args:
        argv: the arguments without the program name; default ``sys.argv[1:]``.

    Returns:
        The exit code: ``0`` done, ``1`` not found or store failure, ``2`` bad usage.
        (argparse itself exits with ``SystemExit(2)`` on unknown options.)
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "ls":
            return _ls(args)
        return _show(args)
    except _Exit as stop:
        print(f"otelprof: {stop.message}", file=sys.stderr)
        return stop.code
    except BrokenPipeError:
        # The reader went away (otelprof ls | head): not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _config() -> Config:
    try:
        return Config.load()
    except ValueError as exc:
        raise _Exit(2, str(exc)) from None


def _store_url(args: argparse.Namespace, config: Config) -> str:
    url: str = args.store or config.resolved_store_url()
    return url


def _open(url: str, config: Config, *, must_exist: bool) -> ProfileStore:
    shown = redact_url(url)
    if must_exist and url.lower().startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if path and "?" not in path and not os.path.exists(path):
            raise _Exit(
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
        raise _Exit(2, str(exc)) from None
    except Exception as exc:
        raise _Exit(1, f"cannot open the profile store {shown}: {exc}") from None


def _serve(args: argparse.Namespace) -> int:
    config = _config()
    token: str | None = args.token if args.token is not None else config.debug_token
    if token is not None and not token.strip():
        raise _Exit(2, "--token must not be empty")
    public_url = config.public_url
    if args.public_url is not None:
        try:
            public_url = Config.load({}, public_url=args.public_url).public_url
        except ValueError as exc:
            message = str(exc).replace("public_url (OTELPROF_PUBLIC_URL)", "--public-url")
            raise _Exit(2, message) from None
    host: str = args.host
    loopback = host == "localhost" or is_loopback(host)
    if not loopback and token is None:
        raise _Exit(
            2,
            f"refusing to serve on {host}: without a token the viewer answers loopback "
            "clients only, so nobody else could use it. Pass --token (or set "
            "OTELPROF_DEBUG_TOKEN), or serve on 127.0.0.1 behind your proxy with a token.",
        )
    try:
        import uvicorn
    except ImportError:
        raise _Exit(
            2, "otelprof serve needs uvicorn: pip install 'otelprof-middleware[serve]'"
        ) from None
    url = _store_url(args, config)
    store = _open(url, config, must_exist=False)
    try:
        viewer = Viewer(store, token=token, public_url=public_url)
        shown_host = f"[{host}]" if ":" in host else host
        access = "clients must present the debug token" if token else "loopback clients only"
        print(
            f"otelprof: serving {redact_url(url)} at "
            f"http://{shown_host}:{args.port}{DEBUG_PREFIX} ({access})",
            file=sys.stderr,
        )
        if token is None:
            print(
                "otelprof: no token: a reverse proxy on this host makes every client "
                "look like loopback; set a token (OTELPROF_DEBUG_TOKEN) behind a proxy.",
                file=sys.stderr,
            )
        scheme = "https" if public_url and public_url.startswith("https://") else None
        uvicorn.run(
            ViewerApp(viewer, scheme=scheme),
            host=host,
            port=args.port,
            lifespan="off",
            # The peer address decides loopback access: never rewrite it from headers.
            proxy_headers=False,
            # Access logs would record ?token= query strings.
            access_log=False,
            server_header=False,
            log_level="warning",
        )
    finally:
        store.close()
    return 0


def _ls(args: argparse.Namespace) -> int:
    config = _config()
    url = _store_url(args, config)
    store = _open(url, config, must_exist=True)
    try:
        summaries = store.list(
            limit=args.limit,
            route=args.route,
            min_duration_ms=args.min_duration_ms,
            order="slowest" if args.slowest else "newest",
        )
    except Exception as exc:
        raise _Exit(1, f"cannot read the profile store {redact_url(url)}: {exc}") from None
    finally:
        store.close()
    if args.json:
        _write(json.dumps({"profiles": [s.to_json() for s in summaries]}, indent=1) + "\n")
    elif summaries:
        _write(_table(summaries))
    else:
        print("otelprof: no profiles match", file=sys.stderr)
    return 0


def _table(summaries: Sequence[ProfileSummary]) -> str:
    header = (
        "TIME (UTC)",
        "METHOD",
        "ROUTE",
        "STATUS",
        "DURATION_MS",
        "KEPT",
        "TRACE_ID",
        "SPAN_ID",
    )
    rows = [
        (
            utc(s.start_time),
            s.method,
            s.route,
            str(s.status_code),
            f"{s.duration_ms:.1f}",
            s.kept_reason or "-",  # "-": stored by an older version, which did not record it
            s.trace_id,
            s.span_id,
        )
        for s in summaries
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    right = {3, 4}
    lines = []
    for row in (header, *rows):
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def _show(args: argparse.Namespace) -> int:
    trace_id: str = args.trace_id
    span_id: str | None = args.span_id
    if not is_trace_id(trace_id):
        raise _Exit(
            2,
            f"malformed trace id {trace_id[:40]!r}: expected 32 lowercase hex digits, not all zero",
        )
    if span_id is not None and not is_span_id(span_id):
        raise _Exit(
            2,
            f"malformed span id {span_id[:40]!r}: expected 16 lowercase hex digits, not all zero",
        )
    fmt: str = args.format or "text"
    output: str | None = getattr(args, "output", None)
    if args.command == "export" and args.format is None:
        fmt = _format_for(output or "")
    config = _config()
    url = _store_url(args, config)
    store = _open(url, config, must_exist=True)
    try:
        records = [
            r
            for r in store.get(trace_id, span_id)
            if r.summary.trace_id == trace_id and (span_id is None or r.summary.span_id == span_id)
        ]
    except Exception as exc:
        raise _Exit(1, f"cannot read the profile store {redact_url(url)}: {exc}") from None
    finally:
        store.close()
    if not records:
        which = f"trace {trace_id}" + (f" span {span_id}" if span_id else "")
        raise _Exit(
            1,
            f"no profile for {which} in {redact_url(url)}: it was not kept, not written "
            "yet, or has been evicted",
        )
    if len(records) > 1:
        choices = "\n".join(
            f"  --span-id {r.summary.span_id}  {utc(r.summary.start_time)}  "
            f"{r.summary.method} {r.summary.route}  {r.summary.duration_ms:.1f} ms"
            for r in records
        )
        raise _Exit(
            2,
            f"trace {trace_id} crossed the service {len(records)} times; pick one "
            f"with --span-id:\n{choices}",
        )
    body = _render(records[0], fmt)
    if args.command == "show" or output == "-":
        _write(body)
        return 0
    assert output is not None
    data = body.encode("utf-8")
    try:
        with open(output, "wb") as file:
            file.write(data)
    except OSError as exc:
        raise _Exit(1, f"cannot write {output}: {exc.strerror or exc}") from None
    print(f"otelprof: wrote {output} ({fmt}, {len(data)} bytes)", file=sys.stderr)
    return 0


def _format_for(path: str) -> str:
    lowered = path.lower()
    for suffix, fmt in _EXPORT_SUFFIXES:
        if lowered.endswith(suffix):
            return fmt
    return "html"


def _render(record: ProfileRecord, fmt: str) -> str:
    try:
        session = record.session()
    except ValueError as exc:
        raise _Exit(1, f"the stored profile is corrupt: {exc}") from None
    try:
        body, _ = render(session, fmt)
    except Exception as exc:
        raise _Exit(1, f"the profile could not be rendered as {fmt}: {exc}") from None
    return body


def _write(text: str) -> None:
    """Write to stdout as UTF-8 whatever the locale (the text format draws with
    box characters)."""
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:
        sys.stdout.write(text)
    else:
        sys.stdout.flush()
        buffer.write(text.encode("utf-8"))
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
