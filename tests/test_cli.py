"""The ``otelprof`` command: ls/show/export against a real SQLite store, exit codes, and
``otelprof serve`` as a real subprocess on a free 127.0.0.1 port."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from pyinstrument.session import Session

import otelprof_middleware
from otelprof_middleware._record import ProfileRecord, ProfileSummary
from otelprof_middleware.cli import ViewerApp, main
from otelprof_middleware.stores import MemoryStore, SQLiteStore
from otelprof_middleware.viewer import Viewer

from .helpers import free_port, make_summary, profile, stop_group, wait_answering

ROOT = Path(next(iter(otelprof_middleware.__path__))).parent
T0 = 1_700_000_000.0
A, B, C = "a1" + "0" * 30, "b1" + "0" * 30, "c1" + "0" * 30


def cli_profiled_work() -> None:
    end = time.perf_counter() + 0.02
    while time.perf_counter() < end:
        sum(range(200))


@pytest.fixture(scope="module")
def session() -> Session:
    return profile(cli_profiled_work)


def _summary(
    trace_id: str, span: int, route: str, duration_ms: float, at: float, **fields: object
) -> ProfileSummary:
    """Span number ``span`` of ``trace_id``, started ``at`` seconds after T0."""
    return make_summary(
        trace_id=trace_id,
        span_id=f"{span:016x}",
        route=route,
        duration_ms=duration_ms,
        start_time=T0 + at,
        **fields,
    )


def _fill(path: Path, session: Session) -> str:
    store = SQLiteStore(path)
    try:
        for summary in (
            _summary(A, 1, "/items/{item_id}", 25.0, 1),
            _summary(B, 2, "/slow", 300.0, 2),
            _summary(C, 3, "/fanout", 5.0, 3),
            _summary(C, 4, "/fanout", 7.0, 4),
        ):
            store.put(ProfileRecord.from_session(summary, session))
    finally:
        store.close()
    return "sqlite:///" + str(path)


@pytest.fixture
def store_url(tmp_path: Path, session: Session) -> str:
    return _fill(tmp_path / "profiles.db", session)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OTELPROF_") or name in ("OTEL_SERVICE_NAME", "XDG_STATE_HOME"):
            monkeypatch.delenv(name)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- ls --------------------------------------------------------------------------------


def test_ls_prints_a_table_newest_first(capsys: pytest.CaptureFixture[str], store_url: str) -> None:
    code, out, _ = run(capsys, "ls", "--store", store_url)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["TIME", "(UTC)", "METHOD"]
    assert [row.split()[-2] for row in rows] == [C, C, B, A]
    assert rows[-1].split()[:4] == ["2023-11-14T22:13:21.000Z", "GET", "/items/{item_id}", "200"]
    assert rows[-1].split()[4] == "25.0"


def test_ls_filters_orders_and_json(capsys: pytest.CaptureFixture[str], store_url: str) -> None:
    def traces(*args: str) -> list[str]:
        code, out, _ = run(capsys, "ls", "--store", store_url, "--json", *args)
        assert code == 0
        return [row["trace_id"] for row in json.loads(out)["profiles"]]

    assert traces() == [C, C, B, A]
    assert traces("--slowest") == [B, A, C, C]
    assert traces("--route", "/slow") == [B]
    assert traces("--min-duration-ms", "20") == [B, A]
    assert traces("--slowest", "--limit", "1") == [B]
    _, out, _ = run(capsys, "ls", "--store", store_url, "--json", "--limit", "1")
    assert json.loads(out)["profiles"][0] == _summary(C, 4, "/fanout", 7.0, 4).to_json()


def test_ls_shows_why_each_profile_was_kept(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, session: Session
) -> None:
    store = SQLiteStore(tmp_path / "kept.db")
    try:
        for n, reason in enumerate(["slow", "error", "", "min_duration", "triggered"]):
            summary = _summary(A, n + 1, "/items/{item_id}", 10.0 + n, n, kept_reason=reason)
            store.put(ProfileRecord.from_session(summary, session))
    finally:
        store.close()
    url = "sqlite:///" + str(tmp_path / "kept.db")

    code, out, _ = run(capsys, "ls", "--store", url)
    assert code == 0
    header, *rows = out.splitlines()
    columns = header.replace("TIME (UTC)", "TIME").split()
    assert columns == [
        "TIME",
        "METHOD",
        "ROUTE",
        "STATUS",
        "DURATION_MS",
        "KEPT",
        "TRACE_ID",
        "SPAN_ID",
    ]
    kept = [row.split()[columns.index("KEPT")] for row in rows]
    assert kept == ["triggered", "min_duration", "-", "error", "slow"]  # "-": not recorded
    assert [row.split()[-2] for row in rows] == [A] * 5

    code, out, _ = run(capsys, "ls", "--store", url, "--json")
    assert code == 0
    profiles = json.loads(out)["profiles"]
    reasons = ["triggered", "min_duration", "", "error", "slow"]
    assert [p["kept_reason"] for p in profiles] == reasons


def test_ls_names_an_unmatched_request(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, session: Session
) -> None:
    store = SQLiteStore(tmp_path / "profiles.db")
    try:
        store.put(ProfileRecord.from_session(_summary(A, 1, "", 3.0, 1, status_code=404), session))
    finally:
        store.close()
    code, out, _ = run(capsys, "ls", "--store", "sqlite:///" + str(tmp_path / "profiles.db"))
    assert code == 0
    assert out.splitlines()[1].split()[1:5] == ["GET", "(no", "route", "matched)"]
    assert "404" in out.splitlines()[1]


def test_ls_aligns_wide_and_combining_characters(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, session: Session
) -> None:
    # Terminal columns, not characters: 注文 takes four, "e" + U+0301 one.
    routes = ["/注文/{id}", "/cafe\u0301", "/items/{item_id}"]
    store = SQLiteStore(tmp_path / "profiles.db")
    try:
        for n, route in enumerate(routes):
            store.put(ProfileRecord.from_session(_summary(A, n + 1, route, 5.0, n), session))
    finally:
        store.close()
    code, out, _ = run(capsys, "ls", "--store", "sqlite:///" + str(tmp_path / "profiles.db"))
    assert code == 0

    def columns(text: str) -> int:
        wide = sum(unicodedata.east_asian_width(c) in "WF" for c in text)
        return len(text) + wide - sum(unicodedata.combining(c) > 0 for c in text)

    lines = out.splitlines()
    status_ends = {columns(line[: line.index("STATUS") + 6]) for line in lines[:1]}
    status_ends |= {columns(line[: line.index(" 200") + 4]) for line in lines[1:]}
    assert len(status_ends) == 1, out  # the STATUS column lines up on every row


def test_ls_with_no_match_says_so(capsys: pytest.CaptureFixture[str], store_url: str) -> None:
    code, out, err = run(capsys, "ls", "--store", store_url, "--route", "/nope")
    assert (code, out) == (0, "")
    assert "no profiles match" in err


@pytest.mark.parametrize("args", [["--limit", "0"], ["--limit", "x"], ["--min-duration-ms", "-1"]])
def test_ls_rejects_bad_options(
    capsys: pytest.CaptureFixture[str], store_url: str, args: list[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["ls", "--store", store_url, *args])
    assert exit_.value.code == 2


# -- show and export -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "expect"),
    [
        ("text", "cli_profiled_work"),
        ("html", "<html"),
        ("folded", "cli_profiled_work"),
    ],
)
def test_show_renders_each_format(
    capsys: pytest.CaptureFixture[str], store_url: str, fmt: str, expect: str
) -> None:
    code, out, _ = run(capsys, "show", A, "--store", store_url, "--format", fmt)
    assert code == 0
    assert expect in out


def test_show_defaults_to_text_and_json_formats_parse(
    capsys: pytest.CaptureFixture[str], store_url: str
) -> None:
    code, out, _ = run(capsys, "show", A, "--store", store_url)
    assert code == 0 and "cli_profiled_work" in out
    code, out, _ = run(capsys, "show", A, "--store", store_url, "--format", "json")
    assert code == 0 and "cli_profiled_work" in json.dumps(json.loads(out))
    code, out, _ = run(capsys, "show", A, "--store", store_url, "--format", "speedscope")
    assert code == 0 and "speedscope" in json.loads(out)["$schema"]


def test_a_trace_with_several_profiles_needs_a_span_id(
    capsys: pytest.CaptureFixture[str], store_url: str
) -> None:
    code, out, err = run(capsys, "show", C, "--store", store_url)
    assert (code, out) == (2, "")
    assert "--span-id 0000000000000004" in err and "--span-id 0000000000000003" in err
    code, out, _ = run(capsys, "show", C, "--span-id", "0000000000000003", "--store", store_url)
    assert code == 0 and "cli_profiled_work" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["xyz"], "malformed trace id"),
        ([A.upper()], "malformed trace id"),
        (["0" * 32], "malformed trace id"),
        ([A + "0"], "malformed trace id"),
        ([A, "--span-id", "zz"], "malformed span id"),
        ([A, "--span-id", "0" * 16], "malformed span id"),
    ],
)
def test_malformed_ids_exit_2(
    capsys: pytest.CaptureFixture[str], store_url: str, args: list[str], message: str
) -> None:
    for command in (["show"], ["export", "-o", "unused.html"]):
        code, out, err = run(capsys, *command, *args, "--store", store_url)
        assert (code, out) == (2, "")
        assert message in err


@pytest.mark.parametrize("args", [["e" * 32], [A, "--span-id", "f" * 16]])
def test_unknown_ids_exit_1(
    capsys: pytest.CaptureFixture[str], store_url: str, args: list[str]
) -> None:
    code, out, err = run(capsys, "show", *args, "--store", store_url)
    assert (code, out) == (1, "")
    assert f"no profile for trace {args[0]}" in err


@pytest.mark.parametrize(
    ("name", "fmt", "expect"),
    [
        ("profile.html", None, "<html"),
        ("profile.speedscope.json", None, '"$schema"'),
        ("profile.json", None, '"root_frame"'),
        ("profile.txt", None, "cli_profiled_work"),
        ("profile", None, "<html"),
        ("profile.svg", "folded", "cli_profiled_work"),
    ],
)
def test_export_writes_the_file(
    capsys: pytest.CaptureFixture[str],
    store_url: str,
    tmp_path: Path,
    name: str,
    fmt: str | None,
    expect: str,
) -> None:
    target = tmp_path / name
    args = ["export", A, "--store", store_url, "-o", str(target)]
    if fmt:
        args += ["--format", fmt]
    code, out, err = run(capsys, *args)
    assert (code, out) == (0, "")
    assert expect in target.read_text()
    assert f"wrote {target}" in err


@pytest.mark.parametrize("name", ["flame.svg", "profile.out", "profile.png"])
def test_export_refuses_a_file_name_whose_format_it_cannot_tell(
    capsys: pytest.CaptureFixture[str], store_url: str, tmp_path: Path, name: str
) -> None:
    """``-o flame.svg`` wrote pyinstrument's HTML page into flame.svg, which no image
    viewer opens (and a browser shows as an XML error)."""
    target = tmp_path / name
    code, out, err = run(capsys, "export", A, "--store", store_url, "-o", str(target))
    assert (code, out) == (2, "")
    assert f"cannot tell the format of {str(target)!r} from its name" in err
    assert "--format" in err
    assert not target.exists()


def test_export_to_stdout_and_unwritable_file(
    capsys: pytest.CaptureFixture[str], store_url: str, tmp_path: Path
) -> None:
    code, out, _ = run(capsys, "export", A, "--store", store_url, "--format", "text", "-o", "-")
    assert code == 0 and "cli_profiled_work" in out
    target = tmp_path / "missing-dir" / "p.html"
    code, _, err = run(capsys, "export", A, "--store", store_url, "-o", str(target))
    assert code == 1 and "cannot write" in err


def test_export_needs_an_output(capsys: pytest.CaptureFixture[str], store_url: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["export", A, "--store", store_url])
    assert exit_.value.code == 2


# -- a store the CLI may only read -------------------------------------------------------


@contextmanager
def read_only_view(source: Path, target: Path) -> Iterator[Path]:
    """``source`` also seen read-only at ``target`` (a read-only bind mount, as a viewer
    container mounts the apps' state volume); skips where mounting is not permitted."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    target.mkdir()
    mounted = subprocess.run(
        ["mount", "--bind", str(source), str(target)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"mount --bind refused here: {mounted.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def _index(base: str) -> list[str]:
    response = httpx.get(base + "/debug/profile", params={"format": "json"})
    assert response.status_code == 200, response.text
    return [row["trace_id"] for row in response.json()["profiles"]]


def test_ls_and_serve_read_a_store_on_a_read_only_mount_while_an_app_writes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, session: Session
) -> None:
    """The CLI only reads: a store it may not write (a read-only mount of the apps'
    state directory) is read, and shows what the apps write afterwards."""
    _fill(tmp_path / "state" / "profiles.db", session)
    app = SQLiteStore(tmp_path / "state" / "profiles.db")  # an app, writing
    try:
        app.put(ProfileRecord.from_session(_summary("d1" + "0" * 30, 5, "/new", 9.0, 5), session))
        with read_only_view(tmp_path / "state", tmp_path / "ro") as ro:
            url = "sqlite:///" + str(ro / "profiles.db")
            code, out, err = run(capsys, "ls", "--store", url)
            assert code == 0, err
            assert [row.split()[-2] for row in out.splitlines()[1:]] == [
                "d1" + "0" * 30,
                C,
                C,
                B,
                A,
            ]
            code, out, _ = run(capsys, "show", B, "--store", url)
            assert code == 0 and "cli_profiled_work" in out
            with serve("--store", url) as (base, _):
                assert _index(base)[0] == "d1" + "0" * 30
                later = "e1" + "0" * 30
                app.put(ProfileRecord.from_session(_summary(later, 6, "/new", 9.0, 6), session))
                assert _index(base)[0] == later
    finally:
        app.close()


def test_only_a_store_it_may_read_is_opened_read_only(tmp_path: Path) -> None:
    """A read-only filesystem, or a file it may not write: read-only. A missing file
    behind a permission error (a directory it may not search) keeps its error: read-only,
    serve would answer 503 "does not exist yet" forever."""
    from otelprof_middleware.cli._common import _read_only_here

    present = tmp_path / "profiles.db"
    present.write_bytes(b"")
    missing = str(tmp_path / "missing.db")
    assert _read_only_here(OSError(errno.EROFS, "ro"), missing)
    assert _read_only_here(OSError(errno.EACCES, "denied"), str(present))
    assert not _read_only_here(OSError(errno.EACCES, "denied"), missing)
    assert not _read_only_here(OSError(errno.EROFS, "ro"), str(tmp_path))
    assert not _read_only_here(OSError(errno.ENOSPC, "full"), str(present))


def _main_as_another_user(argv: list[str], closed: Path) -> tuple[int, str]:
    """``main(argv)`` in a forked child that may not read ``closed``, and its stderr.

    As root (who reads any file) the child becomes ``nobody``; else ``closed`` is mode
    000 while it runs. A fork, not a new interpreter: ``nobody`` may not run ours.
    """
    mode = closed.stat().st_mode
    if os.geteuid() != 0:
        closed.chmod(0)
    read, write = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # the child
            code = 70
            try:
                os.close(read)
                sys.stderr = open(write, "w", closefd=False)  # noqa: SIM115
                if os.geteuid() == 0:
                    os.setgroups([])
                    os.setgid(65534)
                    os.setuid(65534)
                code = main(argv)
                sys.stderr.flush()
            finally:
                os._exit(code)
        os.close(write)
        with open(read) as err:
            message = err.read()
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), message
    finally:
        closed.chmod(mode)


@pytest.mark.parametrize("closed", ["directory", "file"])
def test_a_store_of_another_user_is_reported_as_such(session: Session, closed: str) -> None:
    """The app's state directory is 0700 (its store 0600) for the user the app runs as;
    someone else running ``otelprof ls`` was told "no profile store ... nothing was
    profiled there yet" (os.path.exists is False behind a directory it may not search),
    or SQLite's "unable to open database file"."""
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)  # reachable by anyone; the state directory is not
        state = base / "state"
        url = _fill(state / "profiles.db", session)
        if closed == "file":
            state.chmod(0o755)
        blocked = state if closed == "directory" else state / "profiles.db"
        for argv in (["ls", "--store", url], ["show", B, "--store", url]):
            code, err = _main_as_another_user(argv, blocked)
            assert code == 1, err
            assert "nothing was profiled" not in err and "unable to open" not in err
            assert f"cannot read the profile store at {state / 'profiles.db'}: " in err
            assert f"permission denied ({blocked} belongs to " in err
            assert "run otelprof as that user (sudo -u " in err
    finally:
        shutil.rmtree(base)


def test_serve_waits_for_an_app_to_open_a_store_on_a_read_only_mount(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, session: Session
) -> None:
    """SQLite reads a store it may not write only through the -shm file an app keeps:
    with no app running, ls says so (exit 1) and serve answers 503 until one runs. A
    viewer container may also start before the apps have created the store."""
    (tmp_path / "state").mkdir()
    with read_only_view(tmp_path / "state", tmp_path / "ro") as ro:
        url = "sqlite:///" + str(ro / "profiles.db")
        with serve("--store", url) as (base, log):
            waiting = httpx.get(base + "/debug/profile", params={"format": "json"})
            assert waiting.status_code == 503
            _fill(tmp_path / "state" / "profiles.db", session)  # closed: no -wal, no -shm
            code, _, err = run(capsys, "ls", "--store", url)
            assert code == 1 and "only while an app has it open" in err
            assert httpx.get(base + "/debug/profile").status_code == 503
            app = SQLiteStore(tmp_path / "state" / "profiles.db")
            try:
                assert _index(base) == [C, C, B, A]
            finally:
                app.close()
            assert "does not exist yet" in log.read_text()  # (logged once a minute)


# -- which store -------------------------------------------------------------------------


def test_store_defaults_to_the_state_dir(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    session: Session,
) -> None:
    _fill(tmp_path / "state" / "profiles.db", session)
    monkeypatch.setenv("OTELPROF_STATE_DIR", str(tmp_path / "state"))
    code, out, _ = run(capsys, "show", B)
    assert code == 0 and "cli_profiled_work" in out


def test_store_defaults_to_the_service_directory(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    session: Session,
) -> None:
    _fill(tmp_path / "xdg" / "otelprof" / "checkout" / "profiles.db", session)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("OTELPROF_SERVICE_NAME", "checkout")
    code, out, _ = run(capsys, "ls", "--json")
    assert code == 0 and len(json.loads(out)["profiles"]) == 4

    monkeypatch.setenv("OTELPROF_SERVICE_NAME", "other")
    code, out, err = run(capsys, "ls")
    assert (code, out) == (1, "")
    assert "no profile store at" in err
    assert not (tmp_path / "xdg" / "otelprof" / "other").exists()  # nothing created


def test_store_from_otelprof_store_and_option_wins(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    store_url: str,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("OTELPROF_STORE", store_url)
    code, out, _ = run(capsys, "ls", "--json")
    assert code == 0 and len(json.loads(out)["profiles"]) == 4
    code, _, err = run(capsys, "ls", "--store", "sqlite:///" + str(tmp_path / "nope.db"))
    assert code == 1 and "no profile store at" in err


def test_bad_settings_exit_2_naming_the_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTELPROF_STORE", "ftp://example.com/profiles")
    code, _, err = run(capsys, "ls")
    assert code == 2 and "OTELPROF_STORE" in err
    code, _, err = run(capsys, "ls", "--store", "s3://bucket/x")
    assert code == 2 and "OTELPROF_STORE" in err


def test_unreachable_redis_exits_1_without_showing_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    code, out, err = run(capsys, "ls", "--store", url)
    assert time.monotonic() - started < 5
    assert (code, out) == (1, "")
    assert "cannot read the profile store redis://:***@127.0.0.1" in err
    assert "hunter2" not in err


def test_runs_as_a_module_and_as_the_console_script(store_url: str) -> None:
    commands = [[sys.executable, "-m", "otelprof_middleware.cli"]]
    script = Path(sys.executable).parent / "otelprof"
    if script.exists():
        commands.append([str(script)])
    for command in commands:
        done = subprocess.run(
            [*command, "show", "e" * 32, "--store", store_url],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert done.returncode == 1, done.stderr
        assert "no profile for trace" in done.stderr
        done = subprocess.run(
            [*command, "ls", "--store", store_url],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert done.returncode == 0 and B in done.stdout


# -- serve --------------------------------------------------------------------------------


@contextmanager
def serve(*args: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, Path]]:
    port = free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"otelprof-serve-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OTELPROF_")} | (env or {})
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "otelprof_middleware.cli", "serve", "--port", str(port), *args],
            cwd=ROOT,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_answering(base + "/", process, log.read_text, what="otelprof serve", timeout=20)
        yield base, log
    finally:
        stop_group(process, grace=10)
        log.unlink(missing_ok=True)


def test_serve_answers_loopback_clients_without_a_token(store_url: str) -> None:
    with serve("--store", store_url) as (base, log):
        root = httpx.get(base + "/")
        assert (root.status_code, root.headers["location"]) == (307, "/debug/profile")
        index = httpx.get(base + "/debug/profile", params={"format": "json"})
        assert index.status_code == 200
        rows = index.json()["profiles"]
        assert [row["trace_id"] for row in rows] == [C, C, B, A]
        assert rows[-1]["url"] == f"{base}/debug/profile/{A}?span_id={1:016x}"

        page = httpx.get(rows[-1]["url"])
        assert page.status_code == 200
        assert "<html" in page.text.lower() and A in page.text
        flame = httpx.get(f"{base}/debug/profile/{A}/flame?span_id={1:016x}")
        assert flame.status_code == 200 and "cli_profiled_work" in flame.text
        assert "script-src 'sha256-" in flame.headers["content-security-policy"]
        text = httpx.get(rows[-1]["url"] + "&format=text")
        assert "cli_profiled_work" in text.text
        assert httpx.get(base + "/debug/profile", params={"route": "/slow"}).status_code == 200
        assert httpx.get(base + "/debug/profile/xyz").status_code == 400
        assert httpx.get(base + "/debug/profile/" + "e" * 32).status_code == 404
        assert httpx.get(base + "/elsewhere").status_code == 404
        assert "loopback clients only" in log.read_text()


def test_serve_with_a_token_and_public_url(store_url: str) -> None:
    token = "s3cret-token"
    with serve(
        "--store",
        store_url,
        "--public-url",
        "https://profiles.example.com/",
        env={"OTELPROF_DEBUG_TOKEN": token},
    ) as (base, log):
        assert httpx.get(base + "/debug/profile").status_code == 401
        wrong = {"authorization": "Bearer nope"}
        assert httpx.get(base + "/debug/profile", headers=wrong).status_code == 401
        bearer = {"authorization": f"Bearer {token}"}
        index = httpx.get(base + "/debug/profile?format=json", headers=bearer)
        assert index.status_code == 200
        url = index.json()["profiles"][0]["url"]
        assert url == f"https://profiles.example.com/debug/profile/{C}?span_id={4:016x}"
        assert token not in index.text

        with httpx.Client(base_url=base) as browser:
            first = browser.get("/debug/profile", params={"token": token})
            assert first.status_code == 200
            assert "HttpOnly" in first.headers["set-cookie"]
            assert "Secure" in first.headers["set-cookie"]  # public_url is https
        assert token not in log.read_text()  # no access log with ?token=
    with (
        serve("--store", store_url, env={"OTELPROF_DEBUG_TOKEN": token}) as (base, _),
        httpx.Client(base_url=base) as browser,
    ):
        first = browser.get("/debug/profile", params={"token": token})
        assert first.status_code == 200
        assert "Secure" not in first.headers["set-cookie"]  # plain http, no https public_url
        assert browser.get(f"/debug/profile/{B}").status_code == 200  # by cookie


def test_serve_below_a_path_prefix_that_the_proxy_strips(store_url: str) -> None:
    # nginx: location /profiles/ { proxy_pass http://127.0.0.1:8089/; } forwards
    # /profiles/debug/profile as /debug/profile: the pages must link, and scope the token
    # cookie, below /profiles, where the browser reaches them.
    token = "s3cret-token"
    with (
        serve(
            "--store", store_url, "--root-path", "/profiles/", env={"OTELPROF_DEBUG_TOKEN": token}
        ) as (base, log),
        httpx.Client(base_url=base) as browser,
    ):
        root = browser.get("/")
        assert (root.status_code, root.headers["location"]) == (307, "/profiles/debug/profile")
        first = browser.get("/debug/profile", params={"token": token})
        assert first.status_code == 200
        assert "Path=/profiles/debug/profile;" in first.headers["set-cookie"]
        assert f'href="/profiles/debug/profile/{A}?span_id={1:016x}"' in first.text
        assert 'href="/debug/profile' not in first.text
        # (Straight to the viewer, not through the proxy, the cookie's path does not match.)
        bearer = {"authorization": f"Bearer {token}"}
        index = browser.get("/debug/profile", params={"format": "json"}, headers=bearer)
        url = index.json()["profiles"][-1]["url"]
        assert url == f"{base}/profiles/debug/profile/{A}?span_id={1:016x}"
        page = browser.get(f"/debug/profile/{A}", params={"span_id": f"{1:016x}"}, headers=bearer)
        assert f'src="/profiles/debug/profile/{A}/flame?span_id={1:016x}"' in page.text
        assert "/profiles/debug/profile" in log.read_text()


def test_serve_on_a_taken_port_exits_1_saying_so(store_url: str) -> None:
    # uvicorn logs the bind error and exits 3, a code the CLI does not document.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTELPROF_")}
        command = ["serve", "--store", store_url, "--port", str(port)]
        done = subprocess.run(
            [sys.executable, "-m", "otelprof_middleware.cli", *command],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, done.stderr
    assert "address already in use" in done.stderr  # uvicorn's own line
    assert done.stderr.rstrip().endswith(
        f"otelprof: the viewer could not start on 127.0.0.1:{port} (uvicorn's error above says why)"
    )


@pytest.mark.parametrize("root_path", ["profiles", "/a?b=1", "/a#b", "//evil.example"])
def test_serve_rejects_a_bad_root_path(
    capsys: pytest.CaptureFixture[str], store_url: str, root_path: str
) -> None:
    code, _, err = run(capsys, "serve", "--store", store_url, "--root-path", root_path)
    assert code == 2 and "--root-path" in err


@pytest.fixture
def uvicorn_runs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """Replace uvicorn.run: record how serve would start, never bind anything."""
    import uvicorn

    calls: list[dict[str, object]] = []

    def fake_run(app: object, **kwargs: object) -> None:
        calls.append({"app": app, **kwargs})

    monkeypatch.setattr(uvicorn, "run", fake_run)
    return calls


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "example.com"])
def test_serve_refuses_a_non_loopback_host_without_a_token(
    capsys: pytest.CaptureFixture[str],
    store_url: str,
    uvicorn_runs: list[dict[str, object]],
    host: str,
) -> None:
    code, _, err = run(capsys, "serve", "--store", store_url, "--host", host)
    assert code == 2
    assert f"refusing to serve on {host}" in err and "--token" in err
    assert uvicorn_runs == []


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_serve_starts_on_loopback_hosts_without_a_token(
    capsys: pytest.CaptureFixture[str],
    store_url: str,
    uvicorn_runs: list[dict[str, object]],
    host: str,
) -> None:
    code, _, err = run(capsys, "serve", "--store", store_url, "--host", host, "--port", "9999")
    assert code == 0
    [call] = uvicorn_runs
    assert (call["host"], call["port"]) == (host, 9999)
    assert "loopback clients only" in err


def test_serve_on_any_host_with_a_token_never_trusts_proxy_headers(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    store_url: str,
    uvicorn_runs: list[dict[str, object]],
) -> None:
    monkeypatch.setenv("OTELPROF_DEBUG_TOKEN", "from-env")
    code, _, err = run(capsys, "serve", "--store", store_url, "--host", "0.0.0.0")
    assert code == 0
    [call] = uvicorn_runs
    assert call["host"] == "0.0.0.0" and call["port"] == 8089
    # The peer address decides loopback access, and ?token= must not reach a log.
    assert call["proxy_headers"] is False and call["access_log"] is False
    assert isinstance(call["app"], ViewerApp)
    assert "from-env" not in err and "debug token" in err
    code, _, err = run(capsys, "serve", "--store", store_url, "--host", "::", "--token", " ")
    assert code == 2 and "--token" in err


def test_serve_rejects_a_bad_public_url(capsys: pytest.CaptureFixture[str], store_url: str) -> None:
    code, _, err = run(capsys, "serve", "--store", store_url, "--public-url", "ftp://x")
    assert code == 2 and "--public-url" in err


# -- the ASGI app behind serve --------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("client", "token", "headers", "status"),
    [
        ("127.0.0.1", None, {}, 200),
        ("::1", None, {}, 200),
        ("10.1.2.3", None, {}, 403),
        ("10.1.2.3", None, {"x-forwarded-for": "127.0.0.1"}, 403),
        ("10.1.2.3", "t0ken", {}, 401),
        ("10.1.2.3", "t0ken", {"authorization": "Bearer t0ken"}, 200),
    ],
)
async def test_viewer_app_decides_by_the_peer_address(
    client: str, token: str | None, headers: dict[str, str], status: int
) -> None:
    app = ViewerApp(Viewer(MemoryStore(), token=token))
    transport = httpx.ASGITransport(app=app, client=(client, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://viewer") as http:
        response = await http.get("/debug/profile", params={"format": "json"}, headers=headers)
    assert response.status_code == status
    if status == 200:
        assert response.json() == {"profiles": []}


@pytest.mark.anyio
async def test_viewer_app_redirect_carries_the_security_headers() -> None:
    # docs/security.md: CSP, nosniff, no-referrer, no-store and X-Frame-Options on every
    # response; the redirect from / had only its Location (and a chunked empty body).
    app = ViewerApp(Viewer(MemoryStore(), token="t0ken"))
    transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://viewer") as http:
        response = await http.get("/")
    assert (response.status_code, response.headers["location"]) == (307, "/debug/profile")
    assert response.headers["content-length"] == "0" and response.content == b""
    assert response.headers["content-security-policy"].startswith("default-src 'none'")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://profiles.db",
        "redis://127.0.0.1:notaport/0",
        "redis://127.0.0.1:6379/0?ttl=abc",
        "redis://127.0.0.1:6379/0?bogus_opt=1",
    ],
)
def test_ls_with_a_malformed_store_url_is_bad_usage(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    """A store URL that can never work is bad usage (2), found before any connection."""
    code, _, err = run(capsys, "ls", "--store", url)
    assert code == 2, err
    assert "OTELPROF_STORE" in err


def test_a_query_password_is_not_shown_either(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0?password=hunter2"
    code, out, err = run(capsys, "ls", "--store", url)
    assert (code, out) == (1, "")
    assert "password=***" in err
    assert "hunter2" not in err


@pytest.mark.parametrize("absolute", [True, False])
def test_store_errors_name_the_sqlite_url_as_given(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    absolute: bool,
) -> None:
    """The URL in a message is the one the user gave: the password redaction rebuilt it
    with one slash fewer (``sqlite://tmp/...``), a path that does not exist."""
    (tmp_path / "not-a-store.db").write_bytes(b"this is not an SQLite database at all" * 4)
    monkeypatch.chdir(tmp_path)
    url = "sqlite:///" + (str(tmp_path / "not-a-store.db") if absolute else "not-a-store.db")
    code, out, err = run(capsys, "ls", "--store", url)
    assert (code, out) == (1, "")
    assert f"cannot open the profile store {url}:" in err


@pytest.mark.parametrize("command", [["ls"], ["show", A], ["export", A, "-o", "-"]])
@pytest.mark.parametrize("kind", ["empty file", "another app's database"])
def test_reading_commands_leave_a_file_that_is_no_store_untouched(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: list[str], kind: str
) -> None:
    """ls, show and export read: pointed at a 0-byte file or at another SQLite database
    (a mistyped --store), they said "no profiles match" after writing the store's tables
    into it and switching it to WAL mode."""
    path = tmp_path / "app.db"
    if kind == "empty file":
        path.touch()
    else:
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE users (id INTEGER)")
        conn.close()
    before = path.read_bytes()
    code, out, err = run(capsys, *command, "--store", f"sqlite:///{path}")
    assert (code, out) == (1, "")
    assert f"{path} is not an otelprof profile store" in err
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]


def test_serve_refuses_another_apps_database(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, uvicorn_runs: list[dict[str, object]]
) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER)")
    conn.close()
    before = path.read_bytes()
    code, _, err = run(capsys, "serve", "--store", f"sqlite:///{path}")
    assert code == 1
    assert f"{path} is not an otelprof profile store" in err
    assert path.read_bytes() == before
    assert uvicorn_runs == []


@pytest.mark.parametrize("command", [["ls"], ["show", A], ["serve"]])
def test_a_memory_store_is_refused_for_it_lives_in_the_apps_process(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    uvicorn_runs: list[dict[str, object]],
    command: list[str],
) -> None:
    """With the app's OTELPROF_STORE=memory://, ls said "no profiles match" and serve an
    empty index: the command opened a new, empty memory store of its own."""
    monkeypatch.setenv("OTELPROF_STORE", "memory://")
    code, out, err = run(capsys, *command)
    assert (code, out) == (2, "")
    assert "memory://" in err and "inside the app's process" in err
    assert uvicorn_runs == []
