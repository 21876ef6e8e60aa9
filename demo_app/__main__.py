"""Run a demo app on embedded defaults: ``python -m demo_app [--flask] [--port N]``."""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description="otelprof-middleware demo")
    parser.add_argument("--flask", action="store_true", help="run the Flask demo (default FastAPI)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    base = f"http://{args.host}:{args.port}"
    endpoints = ["/cpu", "/io", "/sync", "/items/42", "/stream", "/fail"]
    if not args.flask:
        endpoints.insert(5, "/stream-sync")
    print("otelprof demo", "(Flask)" if args.flask else "(FastAPI)", "on", base)
    print("  try:       " + "  ".join(base + path for path in endpoints))
    print(f"  profiles:  {base}/debug/profile   (open from this machine: loopback only)")
    print("  spans:     printed below as JSON; each kept one has otelprof.profile.url")
    if args.flask:
        from werkzeug.serving import run_simple

        from .flask_app import app as flask_app

        run_simple(args.host, args.port, flask_app, threaded=True)
    else:
        import uvicorn

        uvicorn.run("demo_app.fastapi_app:app", host=args.host, port=args.port, access_log=False)


if __name__ == "__main__":
    main()
