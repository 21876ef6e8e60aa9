"""From a real trace UI to our profile page: MLflow's, in headless Chromium (opt-in).

Not in the default run (``-m 'not mlflow'`` in pyproject's ``addopts``): MLflow is a
large install. ``./scripts/mlflow-e2e`` makes ``.mlflow-venv`` with MLflow and the test
extra and runs this file there; ``DOCS_SCREENSHOTS=1 ./scripts/mlflow-e2e`` also saves
the MLflow span view into ``docs/images/``. Skipped, with the reason, when MLflow (3.6 or
later: its OTLP endpoint), Playwright or Debian's Chromium is missing.

What runs, all real and on 127.0.0.1: an MLflow tracking server (SQLite backend in a
temporary directory) and an experiment made through its REST API; the FastAPI demo under
uvicorn, configured by environment only as its docs tell a user to (the SDK's OTLP/HTTP
span exporter pointed at MLflow's ``/v1/traces`` with the ``x-mlflow-experiment-id``
header); this test as the demo's caller, a real client span exported to MLflow too, so
the trace is complete there (without a root span MLflow shows it "In progress"). One slow
request goes through. Then: MLflow's REST API holds the trace, and only its server span
carries ``otelprof.profile.url``, equal to the URL our index gives for that trace; in
MLflow's UI the trace opens, the server span is clicked in the span tree, the attribute is
a link, and one click on it lands on our framed profile page for that trace (tab title
names the request, header shows the trace id, no console error, nothing asked of any host
but 127.0.0.1). The child spans show no profile link. The baseline link opens the diff.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import pytest

from ..chromium import launched_chromium
from ..helpers import free_port
from .servers import BIN, ROOT, Server, run_server, uvicorn

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.mlflow]

PREFIX = "/debug/profile"
ROUTE = "/cpu"
ARTIFACTS = ROOT / "test-artifacts"
DOCS_IMAGES = ROOT / "docs" / "images"
SHOT = "mlflow-span.png"
# MLflow's server, kept to what this test needs: no usage telemetry, no job runner
# (a dozen worker processes for LLM judges, not used here).
MLFLOW_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}


def _mlflow_version() -> str | None:
    if importlib.util.find_spec("mlflow") is None:
        return None
    return importlib.metadata.version("mlflow")


@dataclass
class MLflow:
    base_url: str
    experiment_id: str
    log: Path


@dataclass
class Sent:
    """The slow request, as this test sent it and as our viewer stored it."""

    app: Server
    trace_id: str  # 32 hex, the caller span's trace
    caller_span_id: str
    row: dict[str, Any]  # our index JSON row for the request's server span


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MLflow]:
    version = _mlflow_version()
    if version is None:
        pytest.skip("mlflow is not installed: run ./scripts/mlflow-e2e (it makes .mlflow-venv)")
    if tuple(int(part) for part in re.findall(r"\d+", version)[:2]) < (3, 6):
        pytest.skip(f"mlflow {version} has no OTLP endpoint (/v1/traces came in 3.6)")
    tmp = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = tmp / "mlflow.log"
    command = [
        str(BIN / "python"),
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp / 'mlflow.db'}",  # the OTLP endpoint needs a SQL store
        "--default-artifact-root",
        str(tmp / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            cwd=tmp,
            env={**os.environ, **MLFLOW_ENV},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base_url, process, log)
        created = httpx.post(
            base_url + "/api/2.0/mlflow/experiments/create",
            json={"name": "otelprof-e2e"},
            timeout=10,
        )
        assert created.status_code == 200, created.text
        yield MLflow(base_url, created.json()["experiment_id"], log)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def _wait_healthy(base_url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120  # MLflow imports a lot: 10-20 s on two cores
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("mlflow server exited:\n" + log.read_text())
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("mlflow server did not start:\n" + log.read_text())


@pytest.fixture(scope="module")
def sent(mlflow_server: MLflow, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sent]:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    tmp = tmp_path_factory.mktemp("mlflow-app")
    port = free_port()
    otlp = {
        # What docs/trace-uis.md tells a user to set, nothing more (the demo builds its
        # OTLPSpanExporter from these variables) ...
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": mlflow_server.base_url + "/v1/traces",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": (
            f"x-mlflow-experiment-id={mlflow_server.experiment_id}"
        ),
    }
    env = {
        **otlp,
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # ... but for this: export within 0.2 s, not 5 s
        "OTELPROF_DEMO_SPANS_DIR": "",  # run_server's span files would replace OTLP
    }
    with run_server(
        uvicorn("demo_app.fastapi_app:app", port, workers=1), tmp, env=env, port=port
    ) as app:
        provider = TracerProvider(resource=Resource.create({"service.name": "otelprof-e2e-caller"}))
        provider.add_span_processor(
            SimpleSpanProcessor(
                OTLPSpanExporter(
                    endpoint=otlp["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"],
                    headers={"x-mlflow-experiment-id": mlflow_server.experiment_id},
                )
            )
        )
        tracer = provider.get_tracer("tests.e2e.test_mlflow_ui")
        try:
            with tracer.start_as_current_span("call the demo", kind=SpanKind.CLIENT) as caller:
                headers: dict[str, str] = {}
                TraceContextTextMapPropagator().inject(headers)
                answer = httpx.get(f"{app.base_url}{ROUTE}?ms=300", headers=headers, timeout=30)
                assert answer.status_code == 200, answer.text
            context = caller.get_span_context()
        finally:
            provider.shutdown()
        trace_id, caller_span_id = f"{context.trace_id:032x}", f"{context.span_id:016x}"
        yield Sent(app, trace_id, caller_span_id, _our_row(app, trace_id))


def _our_row(app: Server, trace_id: str, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        rows = httpx.get(
            app.base_url + PREFIX, params={"format": "json", "limit": 1000}, timeout=10
        ).json()["profiles"]
        mine = [row for row in rows if row["trace_id"] == trace_id]
        if mine or time.monotonic() > deadline:
            assert len(mine) == 1, rows
            return mine[0]
        time.sleep(0.1)


def _mlflow_trace(mlflow: MLflow, trace_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """The trace from MLflow's REST API, once it holds every span and has its root."""
    deadline = time.monotonic() + timeout
    while True:
        answer = httpx.get(
            mlflow.base_url + "/api/3.0/mlflow/traces/get",
            params={"trace_id": "tr-" + trace_id},
            timeout=10,
        )
        if answer.status_code == 200:
            trace: dict[str, Any] = answer.json()["trace"]
            state = trace["trace_info"].get("state")
            if state == "OK" and len(trace.get("spans", [])) >= 5:
                return trace
        assert time.monotonic() < deadline, (answer.status_code, answer.text)
        time.sleep(0.3)


def _attributes(span: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in span.get("attributes", []):
        value = item["value"]
        out[item["key"]] = next(iter(value.values())) if value else None
    return out


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    yield from launched_chromium()


def test_mlflow_holds_the_span_with_our_link(mlflow_server: MLflow, sent: Sent) -> None:
    trace = _mlflow_trace(mlflow_server, sent.trace_id)
    spans = {span["name"]: _attributes(span) for span in trace["spans"]}
    assert set(spans) >= {"call the demo", f"GET {ROUTE}", "fastapi.endpoint"}, spans
    server = spans[f"GET {ROUTE}"]
    assert server["otelprof.profile.url"] == sent.row["url"]
    assert (
        sent.row["url"]
        == f"{sent.app.base_url}{PREFIX}/{sent.trace_id}?span_id={sent.row['span_id']}"
    )
    assert server["otelprof.profile.id"] == f"{sent.trace_id}-{sent.row['span_id']}"
    assert server["otelprof.profile.baseline_url"].startswith(
        f"{sent.app.base_url}{PREFIX}/{sent.trace_id}/diff?span_id="
    )
    # Only the server span carries a profile: the caller's and FastAPI's inner spans do not.
    others = [name for name, attributes in spans.items() if "otelprof.profile.url" in attributes]
    assert others == [f"GET {ROUTE}"], others


def test_one_click_in_mlflow_opens_our_profile(
    browser: Browser, mlflow_server: MLflow, sent: Sent
) -> None:
    _mlflow_trace(mlflow_server, sent.trace_id)  # MLflow has it all before the UI asks
    profile_url = sent.row["url"]
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        page: Page = context.new_page()
        # As a user: the experiment's Traces tab, then a click on the trace's row.
        page.goto(
            f"{mlflow_server.base_url}/#/experiments/{mlflow_server.experiment_id}/traces",
            wait_until="load",
        )
        row = page.locator(f'[aria-label^="Open trace tr-{sent.trace_id}"]').first
        row.wait_for(timeout=60_000)
        _dismiss_mlflow_extras(page)
        row.click()
        link = page.locator(f'a[href="{profile_url}"]')
        # The trace's root is our caller's span: its attributes carry no profile link.
        page.get_by_text("call the demo", exact=True).first.wait_for(timeout=30_000)
        _select_span(page, "call the demo")
        assert link.count() == 0
        _select_span(page, "fastapi.endpoint")
        assert link.count() == 0
        _select_span(page, f"GET {ROUTE}")  # the server span: our attributes, as links
        link.wait_for(timeout=30_000)
        assert link.inner_text().strip() == profile_url
        _screenshot(page)

        ours = _click_to_new_tab(context, link)
        ours.assert_clean()
        title = f"GET {ROUTE} {sent.row['duration_ms']:.0f} ms · otelprof"
        assert ours.url == profile_url and ours.title == title, (ours.url, ours.title)
        for fact in (sent.trace_id, sent.row["span_id"], ROUTE, "200"):
            assert fact in ours.text, fact

        baseline = page.locator(f'a[href^="{sent.app.base_url}{PREFIX}/{sent.trace_id}/diff"]')
        diff = _click_to_new_tab(context, baseline)
        diff.assert_clean()
        assert "this request" in diff.text.lower() and ROUTE in diff.text
    finally:
        context.close()


def _dismiss_mlflow_extras(page: Page) -> None:
    """Close what MLflow 3.17 shows on a first visit, over the list: a modal tip about its
    "detect issues" button, then its assistant panel (it narrows the trace drawer)."""
    page.wait_for_timeout(500)
    for component in ("mlflow.detect_issues.guidance.got_it", "mlflow.assistant.chat_panel.close"):
        button = page.locator(f'[data-component-id="{component}"]')
        if button.count() and button.first.is_visible():
            button.first.click()
            page.wait_for_timeout(300)


def _select_span(page: Page, name: str) -> None:
    """Click a span in MLflow's span tree (the left pane of the trace view)."""
    page.get_by_text(name, exact=True).first.click()
    page.wait_for_timeout(500)


@dataclass
class Landed:
    url: str
    title: str
    text: str
    console_errors: list[str]
    requests: list[str]

    def assert_clean(self) -> None:
        assert self.console_errors == [], (self.url, self.console_errors)
        elsewhere = [
            u
            for u in self.requests
            if not u.startswith("data:") and urlsplit(u).hostname != "127.0.0.1"
        ]
        assert elsewhere == [], (self.url, elsewhere)


def _click_to_new_tab(context: Any, link: Any) -> Landed:
    """Click a link MLflow opens in a new tab; what that tab loaded and logged."""
    errors: list[str] = []
    requests: list[str] = []

    def watch(new: Page) -> None:
        new.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        new.on("pageerror", lambda error: errors.append(str(error)))
        new.on("request", lambda request: requests.append(request.url))

    context.on("page", watch)
    try:
        with context.expect_page() as opened:
            link.click()
        new: Page = opened.value
        new.wait_for_load_state("load")
        new.wait_for_timeout(500)
        landed = Landed(new.url, new.title(), new.inner_text("body"), errors, requests)
        new.close()
        return landed
    finally:
        context.remove_listener("page", watch)


def _screenshot(page: Page) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / SHOT), full_page=False)
    if os.environ.get("DOCS_SCREENSHOTS") == "1":
        DOCS_IMAGES.mkdir(exist_ok=True)
        page.screenshot(path=str(DOCS_IMAGES / SHOT), full_page=False)
