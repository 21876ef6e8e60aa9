"""Every fenced code block of README.md and docs/*.md runs, as a reader would run it.

- ``python``: written to a module in a scratch directory (``app.py``; ``asgi.py`` /
  ``wsgi.py`` for Django's) and, when it ends with an app, served by a real server as the
  docs say (uvicorn for ASGI, gunicorn for WSGI) and probed: its route answers 200, the
  server span is named by route, the viewer answers 200 when the block turns it on and is
  absent otherwise, every profile link on a span opens, and the server logs no traceback
  and no "profiling is OFF". A block without an app (OTel or logging set-up) must run to
  exit 0. Fragments get what a reader already has from ``tests/e2e/docs_scaffold.py``:
  an app when they use one without making it, the imports of the same page's earlier
  blocks, tracing, a probe route, and for Django a ``mysite`` project holding the page's
  settings blocks (``MIDDLEWARE = [...]``).
- ``bash``: run by bash with ``set -euo pipefail`` in the scratch directory, with a clean
  environment (no ``OTELPROF_*``, ``HOME`` in the scratch directory, the venv's ``bin`` on
  ``PATH``), the ``OTELPROF_*`` variables it exports checked by ``Config.load()`` at the
  end. A line that starts a server (``uvicorn``, ``gunicorn``, ``./scripts/demo``) runs in
  the background until the next such line or the block's end, and is probed like a
  Python app; ``curl`` exits non-zero on an HTTP error (``~/.curlrc``: ``fail``). Port
  8000 in the docs is a free port here. ``./scripts/demo`` runs as what it execs
  (``python -m demo_app``): the script itself would reinstall the venv.
  ``otelprof ls/show/export`` read an embedded store that holds the docs' example trace.
- ``json``: must parse.
- ``text`` blocks (output samples, fragments) and blocks after
  ``<!-- docs-test: skip (reason) -->`` are reported as skipped tests with that reason
  (pytest's ``-ra`` summary lists them), never dropped silently. Any other language
  without a skip marker fails the test.

``docs/_*.md`` files are working notes, not user docs, and are left out (listed too).
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from otelprof_middleware._record import ProfileRecord
from otelprof_middleware.profiling._span import PROFILE_URL
from otelprof_middleware.stores import SQLiteStore

from ..helpers import free_port, make_summary, profile, spin, stop_group, wait_answering
from .docs_scaffold import DJANGO_SETTINGS, DJANGO_URLS, PROBE_PATH
from .servers import BIN, ROOT

pytestmark = pytest.mark.e2e

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOTES = [p for p in DOC_FILES if p.name.startswith("_")]
DOCS = [p for p in DOC_FILES if p not in NOTES]

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
SKIP = re.compile(r"^\s*<!--\s*docs-test:\s*skip\s*\((?P<reason>.+)\)\s*-->\s*$")
RUNNERS = {"python", "bash", "json"}
SERVER_LINE = re.compile(r"^(?:\w+=\S*\s+)*(?:uvicorn|gunicorn|\./scripts/demo)\b")
# The docs' example trace (the W3C traceparent example), which the CLI examples open.
EXAMPLE_TRACE, EXAMPLE_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
BAD_LOG = ("Traceback", "profiling is OFF")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    code: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with the skip reason marked before each."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence or not fence["lang"]:
            if fence:  # an untagged block: not allowed, say which
                blocks.append(Block(path, i + 1, "", "", None))
                i = _closing(lines, i, fence["indent"])
            i += 1
            continue
        indent = fence["indent"]
        end = _closing(lines, i, indent)
        code = "\n".join(line.removeprefix(indent) for line in lines[i + 1 : end]) + "\n"
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP.match(before)
        blocks.append(Block(path, i + 1, fence["lang"], code, marker["reason"] if marker else None))
        i = end + 1
    return blocks


def _closing(lines: list[str], start: int, indent: str) -> int:
    for j in range(start + 1, len(lines)):
        if lines[j].strip() == "```" and lines[j].startswith(indent):
            return j
    raise AssertionError(f"unclosed code block at line {start + 1}")


ALL_BLOCKS = [block for path in DOCS for block in parse(path)]


def _skip_reason(block: Block) -> str | None:
    if block.skip:
        return block.skip
    if block.lang == "text":
        return "output sample or fragment"
    return None


SKIPPED = [b for b in ALL_BLOCKS if _skip_reason(b)]


@pytest.mark.parametrize("block", SKIPPED, ids=[b.id for b in SKIPPED])
def test_skipped_block(block: Block) -> None:
    """Listed, never silent: each skipped block is one skipped test with its reason."""
    assert block.code.strip(), f"{block.id}: empty block"
    pytest.skip(f"{block.id} ```{block.lang}: {_skip_reason(block)}")


@pytest.mark.parametrize("path", NOTES, ids=[str(p.relative_to(ROOT)) for p in NOTES])
def test_notes_are_left_out(path: Path) -> None:
    pytest.skip(f"{path.relative_to(ROOT)}: working notes, not user docs; blocks not run")


def test_every_block_has_a_runner_or_a_reason() -> None:
    unmarked = [
        f"{b.id} ```{b.lang or '(no language)'}"
        for b in ALL_BLOCKS
        if not _skip_reason(b) and b.lang not in RUNNERS
    ]
    assert not unmarked, (
        "no runner for these blocks: tag output as ```text or put "
        "<!-- docs-test: skip (reason) --> right before them:\n" + "\n".join(unmarked)
    )


# ---------------------------------------------------------------------------- running


class Page:
    """One Markdown file's blocks, run in order in one scratch directory."""

    def __init__(self, path: Path, tmp: Path) -> None:
        self.path = path
        self.work = tmp / "work"
        self.home = tmp / "home"
        self.spans = tmp / "spans"
        for directory in (self.work, self.home, self.spans):
            directory.mkdir()
        (self.home / ".curlrc").write_text("fail\nsilent\nshow-error\n")
        self.port = free_port()
        self.imports: list[str] = []  # of the page's earlier python blocks
        self.server: subprocess.Popen[bytes] | None = None
        self.server_log: Path | None = None
        self.viewer_on = False
        self.count = 0
        self.env = self._env()
        self._django_project()
        _seed_example_store(self.home)

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("OTELPROF_", "OTEL_", "UVICORN_", "GUNICORN_", "XDG_"))
            and k not in ("PYTHONPATH", "DJANGO_SETTINGS_MODULE")
        }
        env.update(
            HOME=str(self.home),
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            PYTHONPATH=f"{self.work}{os.pathsep}{ROOT}",
            OTELPROF_DEMO_SPANS_DIR=str(self.spans),  # the scaffold's tracing writes here
            UVICORN_HOST="127.0.0.1",
            UVICORN_PORT=str(self.port),
            GUNICORN_CMD_ARGS=f"--bind=127.0.0.1:{self.port}",
        )
        return env

    def _django_project(self) -> None:
        """``mysite`` with the page's settings blocks (all-uppercase assignments)."""
        site = self.work / "mysite"
        site.mkdir()
        (site / "__init__.py").write_text("")
        (site / "urls.py").write_text(DJANGO_URLS)
        settings = [b.code for b in parse(self.path) if b.lang == "python" and _is_settings(b.code)]
        (site / "settings.py").write_text(DJANGO_SETTINGS + "\n".join(settings))

    # -- python

    def run_python(self, block: Block) -> None:
        self.count += 1
        tree = ast.parse(block.code)
        own_imports = [
            ast.get_source_segment(block.code, node) or ""
            for node in tree.body
            if isinstance(node, ast.Import | ast.ImportFrom)
        ]
        needed = _free_names(tree)
        ends_with_app = bool({"app", "application"} & (_assigned(tree) | needed))
        module = self._module_name(block.code, ends_with_app)
        wsgi = "wsgi" in block.code.lower() or "flask" in block.code.lower()
        prelude = ["from tests.e2e import docs_scaffold as _docs_scaffold"]
        if ends_with_app and "set_tracer_provider" not in block.code:
            prelude.append("_docs_scaffold.tracing()")
        prelude += [i for i in self.imports if i not in own_imports]
        if "app" in needed:  # a fragment: the reader has an app, and our import (README)
            maker = "flask_app" if wsgi else "fastapi_app"
            prelude.append(f"app = _docs_scaffold.{maker}()")
            ours = sorted({"ProfilingMiddleware", "WSGIProfilingMiddleware"} & needed)
            if ours:
                prelude.append(f"from otelprof_middleware import {', '.join(ours)}")
        if "routes" in needed:
            prelude.append("routes = _docs_scaffold.routes")
        epilogue = (
            ["_docs_scaffold.add_probe_route(app)"] if "app" in _assigned(tree) | needed else []
        )
        source = "\n".join([*prelude, "", block.code, *epilogue]) + "\n"
        (self.work / f"{module}.py").write_text(source)
        self.imports += [i for i in own_imports if i not in self.imports]
        if not ends_with_app:
            output = self._run_ok(block, [str(BIN / "python"), f"{module}.py"], timeout=60)
            assert "Traceback" not in output, f"{block.id}:\n{output}"
            return
        target = f"{module}:{'application' if 'application' in _assigned(tree) else 'app'}"
        if wsgi:
            command = [str(BIN / "gunicorn"), target, "--workers", "1", "--threads", "2"]
        else:
            command = [str(BIN / "uvicorn"), target, "--no-access-log"]
        self.stop()
        self.viewer_on = "debug_route=True" in block.code
        self.server_log = self.work / f"server-{self.count}.log"
        with open(self.server_log, "wb") as out:
            self.server = subprocess.Popen(
                command,
                cwd=self.work,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.probe(block, django="get_" in block.code and "_application" in block.code)

    def _run_ok(self, block: Block, command: list[str], *, timeout: float) -> str:
        """Run ``command`` in the work directory; it must exit 0. Returns its output."""
        result = subprocess.run(
            command, cwd=self.work, env=self.env, capture_output=True, timeout=timeout
        )
        output = (result.stdout + result.stderr).decode(errors="replace")
        assert result.returncode == 0, f"{block.id}: exit {result.returncode}\n{output}"
        return output

    def _module_name(self, code: str, is_app: bool) -> str:
        if "get_asgi_application" in code:
            return "asgi"
        if "get_wsgi_application" in code:
            return "wsgi"
        return "app" if is_app else f"block_{self.count}"

    def probe(self, block: Block, *, django: bool = False) -> None:
        """The served app answers its route, is traced by route, and its links open."""
        base = f"http://127.0.0.1:{self.port}"
        assert self.server is not None
        wait_answering(base + "/", self.server, self.log, what=f"{block.id}: the server")
        path = PROBE_PATH + ("/" if django else "")
        trace_id = secrets.token_hex(16)
        traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
        response = httpx.get(base + path, headers={"traceparent": traceparent}, timeout=30)
        assert response.status_code == 200, (block.id, response.status_code, self.log())
        assert response.json() == {"item_id": 42}, (block.id, response.text)
        viewer = httpx.get(base + "/debug/profile?format=json", timeout=30)
        assert viewer.status_code == (200 if self.viewer_on else 404), (block.id, viewer.text)
        span = self._server_span(trace_id)
        assert span is not None, (block.id, "no server span", self.log())
        if "OpenTelemetryMiddleware" not in block.code:
            # Our span (or FastAPI's own) is named by route. OTel's WSGI middleware, when
            # the block wraps it around ours, keeps its own span and names it by path.
            route = span["attributes"].get("http.route", "")
            assert "items" in route and "42" not in route, (block.id, span)
        self.check_links(block)

    def check_links(self, block: Block) -> None:
        for span in self.server_spans():
            url = span["attributes"].get(PROFILE_URL)
            if url and self.viewer_on:
                assert _fetch(url).status_code == 200, (block.id, url)
        assert not any(bad in self.log() for bad in BAD_LOG), (block.id, self.log())

    def _server_span(self, trace_id: str) -> dict[str, Any] | None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for span in self.server_spans():
                if span["context"]["trace_id"] == "0x" + trace_id:
                    return span
            time.sleep(0.1)
        return None

    def server_spans(self) -> list[dict[str, Any]]:
        spans = []
        for path in self.spans.glob("spans-*.jsonl"):
            for line in path.read_text().splitlines():
                with suppress(json.JSONDecodeError):  # a line being written
                    span = json.loads(line)
                    if span["kind"] == "SpanKind.SERVER":
                        spans.append(span)
        return spans

    def log(self) -> str:
        return self.server_log.read_text(errors="replace") if self.server_log else ""

    def stop(self) -> None:
        if self.server is not None:
            stop_group(self.server)
            self.server = None

    # -- bash

    def run_bash(self, block: Block) -> None:
        self.count += 1
        lines = _logical_lines(block.code)
        starts_servers = any(SERVER_LINE.match(line.strip()) for line in lines)
        if starts_servers:
            self.stop()  # a reader stops the running app before starting another
        probe = f'"{BIN / "python"}" -m tests.e2e.docs_probe {self.port}'
        script = [
            "set -euo pipefail",
            "__pid=",
            '__stop() { if [ -n "$__pid" ]; then kill -TERM -- "-$__pid" 2>/dev/null || true;'
            ' wait "$__pid" 2>/dev/null || true; __pid=; fi; }',
            "trap __stop EXIT",
        ]
        for line in lines:
            text = line.replace("127.0.0.1:8000", f"127.0.0.1:{self.port}").replace(
                "localhost:8000", f"localhost:{self.port}"
            )
            if SERVER_LINE.match(text.strip()):
                text = re.sub(r"\s+#.*$", "", text)  # the docs' trailing comment
                text = text.replace("./scripts/demo", f'"{BIN / "python"}" -m demo_app', 1)
                if "demo_app" in text:
                    text += f" --port {self.port}"
                n = len(script)
                script += [
                    "__stop",
                    f"setsid bash -c {_quote(text)} > server-{self.count}-{n}.log 2>&1 &",
                    "__pid=$!",
                    f"{probe} $__pid server-{self.count}-{n}.log",
                ]
            else:
                script.append(text)
        script.append(f'"{BIN / "python"}" -m tests.e2e.docs_probe --check-settings')
        path = self.work / f"block_{self.count}.sh"
        path.write_text("\n".join(script) + "\n")
        self._run_ok(block, ["bash", str(path)], timeout=120)
        if self.server is not None:
            self.check_links(block)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _logical_lines(code: str) -> list[str]:
    """Lines joined at trailing backslashes; comments and blank lines kept as they are."""
    lines: list[str] = []
    pending = ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    if pending:
        lines.append(pending)
    return lines


def _assigned(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
    return names


def _free_names(tree: ast.Module) -> set[str]:
    """Names the block reads but never binds (and that are not builtins)."""
    loaded = {
        node.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)
    }
    return loaded - _assigned(tree) - set(dir(builtins))


def _is_settings(code: str) -> bool:
    tree = ast.parse(code)
    return bool(tree.body) and all(
        isinstance(node, ast.Assign)
        and all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets)
        for node in tree.body
    )


def _fetch(url: str) -> httpx.Response:
    deadline = time.monotonic() + 10
    while True:
        response = httpx.get(url, timeout=30)
        if response.status_code != 404 or time.monotonic() > deadline:
            return response
        time.sleep(0.1)


def _seed_example_store(home: Path) -> None:
    """The embedded store the CLI examples read (default place, default service name),
    holding a real profile of the docs' example trace."""
    directory = home / ".local" / "state" / "otelprof" / "unknown_service"
    directory.mkdir(parents=True)
    session = profile(lambda: spin(0.01), interval=0.0005)
    summary = make_summary(
        trace_id=EXAMPLE_TRACE,
        span_id=EXAMPLE_SPAN,
        duration_ms=250.0,
        start_time=time.time(),
        sample_count=len(session.frame_records),
        kept_reason="slow",
    )
    store = SQLiteStore(directory / "profiles.db")
    try:
        store.put(ProfileRecord.from_session(summary, session))
    finally:
        store.close()


RUN = [p for p in DOCS if any(not _skip_reason(b) for b in parse(p))]


@pytest.fixture
def page(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Page]:
    page = Page(request.param, tmp_path)
    try:
        yield page
    finally:
        page.stop()


@pytest.mark.parametrize("page", RUN, ids=[str(p.relative_to(ROOT)) for p in RUN], indirect=True)
def test_page_runs(page: Page) -> None:
    """Every block of the page that has a runner runs, in order, as described above."""
    for block in parse(page.path):
        if _skip_reason(block):
            continue
        if block.lang == "json":
            json.loads(block.code)
        elif block.lang == "python":
            page.run_python(block)  # a settings block is also in mysite/settings.py
        elif block.lang == "bash":
            page.run_bash(block)
        else:
            raise AssertionError(f"{block.id}: no runner for ```{block.lang}")
