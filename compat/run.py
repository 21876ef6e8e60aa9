"""Run Starlette's, FastAPI's, Flask's and Django's own test suites with and without otelprof.

The driver of ``scripts/compat`` (docs/compat.md). Standard library only: it makes
``.compat-venv`` itself, fetches the sdists of the installed frameworks into
``.compat-cache/`` and runs each suite as a baseline, then with every app wrapped in
otelprof's middleware in each mode, then re-runs the new failures to rule out flakes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPAT = ROOT / "compat"
VENV = ROOT / ".compat-venv"
CACHE = ROOT / ".compat-cache"
PYTHON = VENV / "bin" / "python"
BAD = frozenset({"failed", "error"})
MODES = ("hook", "always_on")
HANG_GRACE_SECONDS = 60.0
"""How long a run may take to exit after its last test before it counts as hung."""

BASE_REQUIREMENTS = (
    f"-e {ROOT}[test]",
    # Flask 3.1.3's conftest uses _pytest.monkeypatch.notset (gone in 9.1); FastAPI: <9.2.
    "pytest>=9,<9.1",
    "pytest-xdist",
    "pytest-timeout",
)
PINNED = ("starlette", "fastapi", "flask", "django", "werkzeug")
"""Pinned to the project venv's versions when it exists, so the suites match it."""


@dataclass(frozen=True)
class Suite:
    """One framework's test suite and how to run it."""

    name: str
    kind: str  # "pytest" or "django"
    targets: tuple[str, ...]  # pytest paths, or Django test modules
    quick: tuple[str, ...]  # the --quick subset
    requirements: tuple[str, ...]
    skipped: Mapping[str, str] = field(default_factory=dict)  # path -> why not run
    pytest_args: tuple[str, ...] = ()
    pythonpath: tuple[str, ...] = ()  # relative to the source tree


SUITES: dict[str, Suite] = {
    suite.name: suite
    for suite in (
        Suite(
            name="starlette",
            kind="pytest",
            targets=("tests",),
            quick=(
                "tests/test_applications.py",
                "tests/middleware/test_base.py",
                "tests/middleware/test_opentelemetry.py",
                "tests/test_testclient.py",
            ),
            requirements=(
                "trio",
                "blockbuster",
                "httpx2[zstd]",  # its tests expect zstd in accept-encoding
                "python-multipart",
                "pyyaml",
                "itsdangerous",
                "jinja2",
                "importlib-metadata",
            ),
            pytest_args=("--timeout=120",),
        ),
        Suite(
            name="fastapi",
            kind="pytest",
            targets=("tests",),
            quick=(
                "tests/test_telemetry/test_http.py",
                "tests/test_telemetry/test_data.py",
                "tests/test_telemetry/test_exceptions.py",
                "tests/test_telemetry/test_tracer.py",
                "tests/test_dump_json_fast_path.py",
                "tests/test_dependency_contextmanager.py",
            ),
            requirements=(
                "anyio[trio]",
                "dirty-equals",
                "inline-snapshot",
                "sqlmodel",
                "pyjwt",
                "pwdlib[argon2]",
                "pyyaml",
                "strawberry-graphql",
                "typer",
                "a2wsgi",
                "python-slugify",
                "python-multipart",
                "httpx2",
                "logfire",
                "sentry-sdk",
                "orjson",
                "ujson",
                "pydantic-settings",
                "email-validator",
                "opentelemetry-exporter-otlp-proto-http",
                "pydantic-extra-types",
                "coverage",  # test_fastapi_cli runs `python -m coverage run -m fastapi dev`
                "fastapi-cli",
            ),
            skipped={
                "tests/benchmarks": "pytest-codspeed performance benchmarks, no behaviour",
                "tests/memory_benchmarks": "pytest-codspeed memory benchmarks, no behaviour",
            },
            # FastAPI's own scripts/test.sh: docs_src importable, xdist groups honoured.
            pytest_args=("--dist=loadgroup",),
            pythonpath=("docs_src",),
        ),
        Suite(
            name="flask",
            kind="pytest",
            targets=("tests",),
            quick=(
                "tests/test_basic.py",
                "tests/test_async.py",
                "tests/test_testing.py",
                "tests/test_reqctx.py",
            ),
            requirements=("asgiref", "greenlet", "python-dotenv"),
            pytest_args=("--timeout=120",),
        ),
        Suite(
            name="django",
            kind="django",
            targets=(
                "handlers",
                "requests_tests",
                "asgi",
                "wsgi",
                "middleware",
                "middleware_exceptions",
                "test_client",
                "test_client_regress",
                "view_tests",
            ),
            quick=("handlers", "asgi", "wsgi", "test_client"),
            requirements=("tblib", "jinja2", "pyyaml", "pillow", "argon2-cffi"),
        ),
    )
}

_TRACER_LOOKUP = (
    "counts the global provider's get_tracer() calls; the middleware looks its own tracer"
    " up once when built (opentelemetry-instrumentation-asgi), never per request"
)
EXCLUDED: dict[str, dict[str, str]] = {
    # suite -> {test id: why the failure is by design of one more middleware layer}
    "fastapi": {
        "tests/test_telemetry/test_tracer.py::"
        "test_tracer_lookup_preserves_warning_deduplication[http-True]": _TRACER_LOOKUP,
        "tests/test_telemetry/test_tracer.py::"
        "test_tracer_lookup_preserves_warning_deduplication[websocket-True]": _TRACER_LOOKUP,
    },
    "django": {
        "wsgi.tests.WSGITest.test_get_wsgi_application": (
            "calls bytes() on the app's return value, Django's own HttpResponse; PEP 3333"
            " lets a middleware return its own iterable (ours ends the profile on close())"
        ),
    },
}


# --- the environment -----------------------------------------------------------------


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"[compat] {message}", file=sys.stderr, flush=True)


def pip(*args: str, log_name: str) -> None:
    """Run the compat venv's pip; its chatter goes to a log, shown only on failure."""
    path = CACHE / "logs" / f"{log_name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        done = subprocess.run(
            [str(PYTHON), "-m", "pip", *args], stdout=out, stderr=subprocess.STDOUT, check=False
        )
    if done.returncode:
        sys.exit(f"pip {args[0]} failed (exit {done.returncode}); see {path}")


def project_pins() -> list[str]:
    """``name==version`` of the PINNED packages in the project's own ``.venv``."""
    python = ROOT / ".venv" / "bin" / "python"
    if not python.exists():
        return []
    script = (
        "import importlib.metadata as m\n"
        f"for name in {PINNED!r}:\n"
        "    try: print(f'{name}=={m.version(name)}')\n"
        "    except m.PackageNotFoundError: pass\n"
    )
    done = subprocess.run([str(python), "-c", script], capture_output=True, text=True, check=True)
    return done.stdout.split()


def ensure_venv() -> None:
    """Make ``.compat-venv`` and install the project and every suite's test requirements.

    Skipped when nothing changed since the last install (a stamp of the inputs).
    """
    requirements = list(BASE_REQUIREMENTS)
    for suite in SUITES.values():
        requirements += [r for r in suite.requirements if r not in requirements]
    pins = project_pins()
    digest = hashlib.sha256(
        "\n".join([*requirements, *pins, (ROOT / "pyproject.toml").read_text()]).encode()
    ).hexdigest()
    stamp = VENV / ".compat-installed"
    if stamp.exists() and stamp.read_text() == digest:
        return
    if not PYTHON.exists():
        log(f"creating {VENV.name}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    log(f"installing the project and {len(requirements) - 1} test requirements")
    constraints = CACHE / "constraints.txt"
    constraints.parent.mkdir(parents=True, exist_ok=True)
    constraints.write_text("".join(f"{pin}\n" for pin in pins))
    args = [arg for requirement in requirements for arg in requirement.split(" ", 1)]
    pip("install", "--quiet", "-c", str(constraints), *args, log_name="pip-install")
    stamp.write_text(digest)


def installed_versions(names: Sequence[str]) -> dict[str, str]:
    """The versions of the suites' frameworks installed in the compat venv."""
    script = "import importlib.metadata as m, sys\nfor n in sys.argv[1:]: print(n, m.version(n))"
    done = subprocess.run(
        [str(PYTHON), "-c", script, *names], capture_output=True, text=True, check=True
    )
    return dict(line.split(" ", 1) for line in done.stdout.splitlines())


def source_tree(name: str, version: str) -> Path:
    """The unpacked sdist of ``name==version`` (downloaded and unpacked once)."""
    archive_name = f"{name}-{version}.tar.gz".lower()
    archive = CACHE / "sdist" / archive_name
    if not archive.exists():
        log(f"downloading the {name} {version} sdist")
        pip(
            "download",
            "--no-binary",
            ":all:",
            "--no-deps",
            "--quiet",
            "-d",
            str(archive.parent),
            f"{name}=={version}",
            log_name=f"pip-download-{name}",
        )
        found = [p for p in archive.parent.iterdir() if p.name.lower() == archive_name]
        if not found:
            sys.exit(f"no sdist {archive_name} in {archive.parent}")
        found[0].rename(archive)
    with tarfile.open(archive) as tar:
        tree = CACHE / "src" / tar.getnames()[0].split("/", 1)[0]
        if not (tree / ".compat-unpacked").exists():
            shutil.rmtree(tree, ignore_errors=True)
            tar.extractall(tree.parent, filter="data")
            (tree / ".compat-unpacked").touch()
    return tree


def git(*args: str) -> str:
    """``git`` in the repository; its output, stripped."""
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def otelprof_tree(rev: str) -> Path:
    """``otelprof_middleware`` as of ``rev``, exported once to ``.compat-cache/otelprof/``."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    tree = CACHE / "otelprof" / commit[:12]
    if not (tree / "otelprof_middleware" / "__init__.py").exists():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "archive", commit, "otelprof_middleware"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tree, filter="data")
    return tree


def otelprof_state(rev: str | None) -> str:
    """Which otelprof the runs test: a commit, and whether the work tree differs from it."""
    if rev:
        return git("rev-parse", "--short", f"{rev}^{{commit}}") + " (--otelprof-rev)"
    head = git("rev-parse", "--short", "HEAD")
    changed = git("status", "--porcelain", "--", "otelprof_middleware").splitlines()
    return head + (f" + uncommitted changes in {len(changed)} file(s)" if changed else "")


# --- running a suite -----------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """How every run goes."""

    workers: int  # pytest-xdist workers for the full runs (re-runs use none)
    timeout: float  # seconds per run
    otelprof_src: Path | None = None  # otelprof_middleware from this tree (--otelprof-rev)


@dataclass
class Run:
    """One run of a suite (or of some of its tests) and what came of it."""

    suite: str
    mode: str  # "baseline", "provider" (the tracer provider alone) or an otelprof mode
    label: str
    seconds: float = 0.0
    status: str = "ok"  # "ok", "hung at exit", "timed out", "no results"
    exit_code: int | None = None
    tests: dict[str, dict[str, str]] = field(default_factory=dict)
    stats: list[dict[str, object]] = field(default_factory=list)

    def bad(self) -> set[str]:
        """Ids of the tests that failed or errored."""
        return {test for test, result in self.tests.items() if result["outcome"] in BAD}


def command(suite: Suite, tree: Path, tests: Sequence[str], workers: int) -> list[str]:
    """The command line running ``tests`` of ``suite``."""
    if suite.kind == "django":
        runner = COMPAT / "compat_django.py"
        return [str(PYTHON), str(runner), str(tree / "tests"), "--parallel", "1", *tests]
    args = [str(PYTHON), "-m", "pytest", "-p", "no:cacheprovider", "-p", "compat_pytest"]
    args += ["-q", "-rfEs", *suite.pytest_args]
    if workers > 1:
        args += ["-n", str(workers)]
    else:
        args += ["-p", "no:xdist"]
        args = [a for a in args if not a.startswith("--dist")]
    args += [f"--ignore={path}" for path in suite.skipped]
    return [*args, *tests]


def run_suite(
    suite: Suite,
    tree: Path,
    mode: str,
    tests: Sequence[str],
    *,
    label: str,
    options: Options,
    rerun: bool = False,
) -> Run:
    """Run ``tests`` of ``suite`` in ``mode`` (see :class:`Run`); collect their outcomes."""
    out = CACHE / "runs" / f"{suite.name}-{label}"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = out.with_suffix(".json")
    for stale in out.parent.glob(f"{out.name}.json*"):
        stale.unlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTELPROF_COMPAT")}
    paths = [str(COMPAT), *(str(tree / p) for p in suite.pythonpath)]
    if options.otelprof_src is not None:
        paths.insert(0, str(options.otelprof_src))
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OTELPROF_COMPAT_RESULTS"] = str(results)
    if mode == "provider":
        env["OTELPROF_COMPAT_WRAP"] = "provider"
    elif mode != "baseline":
        env["OTELPROF_COMPAT_WRAP"] = "apps"
        env["OTELPROF_MODE"] = mode
    run = Run(suite.name, mode, label)
    argv = command(suite, tree, tests, 1 if rerun else options.workers)
    log(f"{suite.name} {label}: running ({len(tests)} targets), log {out}.log")
    started = time.monotonic()
    with out.with_suffix(".log").open("w") as log_file:
        log_file.write(" ".join(argv) + "\n\n")
        log_file.flush()
        process = subprocess.Popen(
            argv,
            cwd=tree,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        run.status, run.exit_code = _wait(process, results, started + options.timeout)
    run.seconds = time.monotonic() - started
    if results.exists():
        data = json.loads(results.read_text())
        run.tests = data["tests"]
    elif run.status == "ok":
        run.status = "no results"
    for path in sorted(out.parent.glob(f"{out.name}.json.stats-*.json")):
        run.stats.append(json.loads(path.read_text()))
    log(
        f"{suite.name} {label}: {run.status}, {len(run.tests)} tests, {len(run.bad())} failing,"
        f" {run.seconds:.0f} s"
    )
    return run


def _wait(
    process: subprocess.Popen[bytes], results: Path, deadline: float
) -> tuple[str, int | None]:
    """Wait for the run; kill it on the deadline or when it hangs after its last test."""
    finished_at: float | None = None
    while True:
        code = process.poll()
        if code is not None:
            return "ok", code
        now = time.monotonic()
        if finished_at is None and results.exists():
            finished_at = now
        if finished_at is not None and now - finished_at > HANG_GRACE_SECONDS:
            _kill(process)
            return "hung at exit", None
        if now > deadline:
            _kill(process)
            return "timed out", None
        time.sleep(0.5)


def _kill(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


# --- comparing -----------------------------------------------------------------------


@dataclass
class Verdict:
    """A wrapped run compared with the baseline, after the re-runs."""

    run: Run
    new: list[str]  # failing wrapped, passing (or absent) in the baseline
    confirmed: list[str]  # failing again wrapped, passing again without the middleware
    flaky: list[str]  # failing again without the middleware too
    unconfirmed: list[str]  # passing on every re-run: seen once (order, timing, memory?)
    provider: list[str]  # failing with the global tracer provider alone: not the middleware
    excluded: list[str]  # confirmed, but by design (EXCLUDED)
    reruns: list[Run]


def new_failures(baseline: Run, wrapped: Run) -> list[str]:
    """Tests failing in ``wrapped`` that passed in the baseline (or did not run there)."""
    return sorted(
        test
        for test in wrapped.bad()
        if baseline.tests.get(test, {"outcome": "passed"})["outcome"] == "passed"
    )


def judge(suite: Suite, tree: Path, baseline: Run, wrapped: Run, options: Options) -> Verdict:
    """Sort out ``wrapped``'s new failures with re-runs of just those tests.

    Once without the middleware and once with it: a failure must pass the one and fail
    the other again. One that passes both is re-run with its whole file (Django: class)
    around it, wrapped, since some failures need the tests before them. Then the
    reproduced ones run with only the global tracer provider the harness installs: a
    failure there too is the provider's doing, not the middleware's.
    """
    new = new_failures(baseline, wrapped)
    reruns: list[Run] = []
    reproduced: list[str] = []
    flaky: list[str] = []
    missed: list[str] = []
    provider: list[str] = []
    common = {"options": options, "rerun": True}
    prefix = f"{wrapped.mode}-rerun"
    if new:
        labels = _rerun_labels(suite, new)
        without = run_suite(suite, tree, "baseline", labels, label=f"{prefix}-baseline", **common)
        again = run_suite(suite, tree, wrapped.mode, labels, label=prefix, **common)
        reruns += [without, again]
        flaky = [t for t in new if not _passed(without, t)]
        reproduced = [t for t in new if t not in flaky and t in _failing(again, new)]
        missed = [t for t in new if t not in flaky and t not in reproduced]
    if missed:
        labels = _context_labels(suite, missed)
        context = run_suite(suite, tree, wrapped.mode, labels, label=f"{prefix}-context", **common)
        reruns.append(context)
        reproduced += [t for t in missed if t in _failing(context, missed)]
    if reproduced:
        labels = _rerun_labels(suite, reproduced)
        alone = run_suite(suite, tree, "provider", labels, label=f"{prefix}-provider", **common)
        reruns.append(alone)
        provider = [t for t in reproduced if t in alone.bad()]
    excluded_here = EXCLUDED.get(suite.name, {})
    middleware = [t for t in reproduced if t not in provider]
    return Verdict(
        run=wrapped,
        new=new,
        confirmed=sorted(t for t in middleware if t not in excluded_here),
        flaky=flaky,
        unconfirmed=[t for t in missed if t not in reproduced],
        provider=sorted(provider),
        excluded=sorted(t for t in middleware if t in excluded_here),
        reruns=reruns,
    )


def _failing(run: Run, tests: Sequence[str]) -> set[str]:
    """``run``'s failing tests; all of ``tests`` when it died before reporting them."""
    died = run.exit_code is not None and run.exit_code < 0
    if died or run.status != "ok" or not run.tests:
        return set(tests)
    return run.bad()


def _passed(run: Run, test: str) -> bool:
    return run.tests.get(test, {}).get("outcome") == "passed"


def _context_labels(suite: Suite, tests: Sequence[str]) -> list[str]:
    """The files (Django: test classes) holding ``tests``."""
    if suite.kind == "django":
        return sorted({t.rsplit(".", 1)[0] for t in _rerun_labels(suite, tests)})
    return sorted({t.split("::", 1)[0] for t in tests})


def _rerun_labels(suite: Suite, tests: Sequence[str]) -> list[str]:
    """What to pass the runner to run exactly ``tests`` (a collection error: its file)."""
    if suite.kind == "django":
        # A class-level error is recorded as "setUpClass (module.Class)": run the class.
        return sorted({t.split("(")[-1].rstrip(")") if "(" in t else t for t in tests})
    return sorted(set(tests))


# --- the report ----------------------------------------------------------------------


def summary_table(baselines: Mapping[str, Run], verdicts: Sequence[Verdict]) -> str:
    """The figures: per suite and mode, confirmed new failures over the tests run."""
    rows = [
        (
            "suite",
            "mode",
            "new failures / total",
            "unconfirmed",
            "flaky",
            "provider",
            "excluded",
            "status",
            "wall",
        )
    ]
    for name, baseline in baselines.items():
        failing = len(baseline.bad())
        rows.append(
            (
                name,
                "baseline",
                f"({failing} failing) / {len(baseline.tests)}",
                "-",
                "-",
                "-",
                "-",
                _status(baseline),
                f"{baseline.seconds:.0f} s",
            )
        )
        for verdict in (v for v in verdicts if v.run.suite == name):
            run = verdict.run
            rows.append(
                (
                    name,
                    run.mode,
                    f"{len(verdict.confirmed)} / {len(run.tests)}",
                    str(len(verdict.unconfirmed)),
                    str(len(verdict.flaky)),
                    str(len(verdict.provider)),
                    str(len(verdict.excluded)),
                    _status(run),
                    f"{run.seconds:.0f} s",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


def _status(run: Run) -> str:
    if run.status != "ok":
        return run.status
    if run.exit_code is not None and run.exit_code < 0:
        return f"killed by {signal.Signals(-run.exit_code).name}"
    return f"exit {run.exit_code}"


def details(verdicts: Sequence[Verdict]) -> Iterator[str]:
    """The new failures, each with its error, then the other groups."""
    for verdict in verdicts:
        run = verdict.run
        head = f"{run.suite} {run.mode}"
        groups = (
            (verdict.confirmed, "new failure(s)", True),
            (verdict.unconfirmed, "failed once, passed every re-run (order, timing?)", True),
            (verdict.flaky, "failing without the middleware too on re-run (flaky)", False),
            (verdict.provider, "failing with the tracer provider alone (no middleware)", False),
        )
        for tests, title, with_message in groups:
            if tests:
                yield f"\n{head}: {len(tests)} {title}"
                for test in tests:
                    yield f"  {test}" + (
                        f"\n      {_first_line(run, test)}" if with_message else ""
                    )
        if verdict.excluded:
            yield f"\n{head}: {len(verdict.excluded)} excluded (one more layer, by design)"
            reasons = EXCLUDED[run.suite]
            yield from (f"  {test}: {reasons[test]}" for test in verdict.excluded)
        for stats in _merged_stats(run):
            yield f"\n{head}: {stats}"


def _first_line(run: Run, test: str) -> str:
    lines = run.tests[test]["message"].strip().splitlines()
    return lines[0][:160] if lines else ""


def _merged_stats(run: Run) -> Iterator[str]:
    wrapped: dict[str, int] = {}
    counters: dict[str, int] = {}
    for stats in run.stats:
        for key, value in dict(stats.get("wrapped", {})).items():  # type: ignore[call-overload]
            wrapped[key] = wrapped.get(key, 0) + int(value)
        for key, value in dict(stats.get("counters", {})).items():  # type: ignore[call-overload]
            counters[key] = counters.get(key, 0) + int(value)
    if wrapped or counters:
        yield f"wrapped {wrapped}; otelprof counters {counters}"


def write_report(
    baselines: Mapping[str, Run], verdicts: Sequence[Verdict], versions: Mapping[str, str]
) -> Path:
    """Everything as JSON in ``.compat-cache/runs/summary.json``; returns its path."""
    path = CACHE / "runs" / "summary.json"
    data = {
        "versions": versions,
        "baselines": {
            name: {
                "seconds": run.seconds,
                "status": run.status,
                "tests": len(run.tests),
                "failing": sorted(run.bad()),
            }
            for name, run in baselines.items()
        },
        "wrapped": [
            {
                "suite": v.run.suite,
                "mode": v.run.mode,
                "seconds": v.run.seconds,
                "status": v.run.status,
                "tests": len(v.run.tests),
                "new": v.new,
                "confirmed": {t: v.run.tests[t] for t in v.confirmed},
                "flaky": v.flaky,
                "unconfirmed": {t: v.run.tests[t] for t in v.unconfirmed},
                "provider": {t: v.run.tests[t] for t in v.provider},
                "excluded": v.excluded,
                "stats": v.run.stats,
            }
            for v in verdicts
        ],
    }
    path.write_text(json.dumps(data, indent=1))
    return path


# --- main ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of ``scripts/compat``."""
    parser = argparse.ArgumentParser(prog="scripts/compat", description=__doc__)
    parser.add_argument(
        "--suite",
        default=",".join(SUITES),
        help=f"comma-separated suites (default: all of {','.join(SUITES)})",
    )
    parser.add_argument(
        "--mode", default=",".join(MODES), help="comma-separated otelprof modes (default: both)"
    )
    parser.add_argument("--quick", action="store_true", help="a few test files per suite (CI)")
    parser.add_argument(
        "--timeout", type=float, default=1200, help="seconds per suite run (default 1200)"
    )
    parser.add_argument(
        "-n",
        "--workers",
        type=int,
        help="pytest-xdist workers (default: 2, or 1 (none) with --quick)",
    )
    parser.add_argument(
        "--otelprof-rev",
        metavar="REV",
        help="test otelprof_middleware as of this git revision instead of the work tree",
    )
    args = parser.parse_args(argv)
    if args.workers is None:
        args.workers = 1 if args.quick else 2  # xdist's start-up outweighs small subsets
    args.suites = [s for s in args.suite.split(",") if s]
    args.modes = [m for m in args.mode.split(",") if m]
    for name in args.suites:
        if name not in SUITES:
            parser.error(f"unknown suite {name!r}")
    for mode in args.modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen suites and modes; 0 when no new failure (and no hang) was confirmed."""
    args = parse_args(argv)
    ensure_venv()
    suites = [SUITES[name] for name in args.suites]
    versions = installed_versions([s.name for s in suites])
    otelprof_src = otelprof_tree(args.otelprof_rev) if args.otelprof_rev else None
    versions["otelprof"] = otelprof_state(args.otelprof_rev)
    options = Options(workers=args.workers, timeout=args.timeout, otelprof_src=otelprof_src)
    baselines: dict[str, Run] = {}
    verdicts: list[Verdict] = []
    for suite in suites:
        tree = source_tree(suite.name, versions[suite.name])
        tests = list(suite.quick if args.quick else suite.targets)
        baseline = run_suite(suite, tree, "baseline", tests, label="baseline", options=options)
        baselines[suite.name] = baseline
        for mode in args.modes:
            wrapped = run_suite(suite, tree, mode, tests, label=mode, options=options)
            verdicts.append(judge(suite, tree, baseline, wrapped, options))
    print("\nversions: " + ", ".join(f"{n} {v}" for n, v in versions.items()))
    print(summary_table(baselines, verdicts))
    for line in details(verdicts):
        print(line)
    print(f"\nfull results: {write_report(baselines, verdicts, versions)}")
    runs = [*baselines.values(), *(v.run for v in verdicts)]
    clean = all(not v.confirmed for v in verdicts) and all(r.status == "ok" for r in runs)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
