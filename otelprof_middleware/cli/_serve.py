"""``otelprof serve``: the profile viewer outside the app, on uvicorn."""

from __future__ import annotations

import argparse
import sys

from .._config import DEBUG_PREFIX, Config
from .._net import is_loopback
from ..stores._base import redact_url
from ..viewer import Viewer, ViewerApp
from ._common import CommandExit, load_config, open_profile_store, store_url

__all__ = ["serve"]


def serve(args: argparse.Namespace) -> int:
    """Run ``serve``: the viewer on uvicorn until interrupted.

    A host other than loopback needs a token; uvicorn is the ``serve`` extra.
    """
    config = load_config()
    token: str | None = args.token if args.token is not None else config.debug_token
    if token is not None and not token.strip():
        raise CommandExit(2, "--token must not be empty")
    public_url = config.public_url
    if args.public_url is not None:
        try:
            public_url = Config.load({}, public_url=args.public_url).public_url
        except ValueError as exc:
            message = str(exc).replace("public_url (OTELPROF_PUBLIC_URL)", "--public-url")
            raise CommandExit(2, message) from None
    root_path = _root_path(args.root_path)
    host: str = args.host
    loopback = host == "localhost" or is_loopback(host)
    if not loopback and token is None:
        raise CommandExit(
            2,
            f"refusing to serve on {host}: without a token the viewer answers loopback "
            "clients only, so nobody else could use it. Pass --token (or set "
            "OTELPROF_DEBUG_TOKEN), or serve on 127.0.0.1 behind your proxy with a token.",
        )
    try:
        import uvicorn
    except ImportError:
        raise CommandExit(
            2, "otelprof serve needs uvicorn: pip install 'otelprof-middleware[serve]'"
        ) from None
    url = store_url(args, config)
    store = open_profile_store(url, config, must_exist=False)
    try:
        viewer = Viewer(store, token=token, public_url=public_url)
        shown_host = f"[{host}]" if ":" in host else host
        access = "clients must present the debug token" if token else "loopback clients only"
        behind = f", reached as {root_path}{DEBUG_PREFIX} through the proxy" if root_path else ""
        print(
            f"otelprof: serving {redact_url(url)} at "
            f"http://{shown_host}:{args.port}{DEBUG_PREFIX} ({access}{behind})",
            file=sys.stderr,
        )
        if token is None:
            print(
                "otelprof: no token: a reverse proxy on this host makes every client "
                "look like loopback; set a token (OTELPROF_DEBUG_TOKEN) behind a proxy.",
                file=sys.stderr,
            )
        scheme = "https" if public_url and public_url.startswith("https://") else None
        try:
            uvicorn.run(
                ViewerApp(viewer, scheme=scheme),
                host=host,
                port=args.port,
                lifespan="off",
                # Links and the token cookie's path start with it (ASGI ``root_path``).
                root_path=root_path,
                # The peer address decides loopback access: never rewrite it from headers.
                proxy_headers=False,
                # Access logs would record ?token= query strings.
                access_log=False,
                server_header=False,
                log_level="warning",
            )
        except SystemExit as exc:
            # uvicorn logs why it could not start (the port is taken, say) and exits 3,
            # a code otelprof does not document, after the "serving" line above.
            if exc.code in (None, 0):
                raise
            raise CommandExit(
                1,
                f"the viewer could not start on {shown_host}:{args.port} "
                "(uvicorn's error above says why)",
            ) from None
    finally:
        store.close()
    return 0


def _root_path(value: str) -> str:
    """``--root-path`` without its trailing ``/``; exit 2 unless it is a plain path."""
    root_path = value.rstrip("/")
    if root_path and (
        not root_path.startswith("/")
        or root_path.startswith("//")
        or any(c in root_path for c in "?#\\")
        or any(ord(c) < 0x21 or ord(c) == 0x7F for c in root_path)
    ):
        raise CommandExit(
            2,
            f"--root-path must be a path such as /profiles (no query, fragment or spaces), "
            f"got {value[:40]!r}",
        )
    return root_path
