"""An invalid setting turns profiling off, loudly, and the app runs exactly as without us."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from otelprof_middleware import ProfilingMiddleware, WSGIProfilingMiddleware, counters
from otelprof_middleware._config import Config

from .helpers import make_provider


def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


BAD = [
    ({"interval_ms": "abc"}, "OTELPROF_INTERVAL_MS"),
    ({"sample_rate": 2}, "OTELPROF_SAMPLE_RATE"),
    ({"store": "sqlite://profiles.db"}, "OTELPROF_STORE"),
    ({"store": "redis://127.0.0.1:notaport/0"}, "OTELPROF_STORE"),
    ({"store": "redis://127.0.0.1:6379/0?bogus_opt=1"}, "OTELPROF_STORE"),
    ({"store": "redis://127.0.0.1:6379/0?prefix="}, "OTELPROF_STORE"),
]


@pytest.mark.parametrize(("settings", "named"), BAD)
def test_asgi_bad_setting_disables_profiling_loudly(
    settings: dict[str, Any], named: str, caplog: pytest.LogCaptureFixture
) -> None:
    provider, exporter = make_provider()
    app = Starlette(routes=[Route("/", hello)])
    app.add_middleware(ProfilingMiddleware, tracer_provider=provider, **settings)
    with TestClient(app) as client:  # the lifespan runs: the middleware is built now
        assert client.get("/").text == "hello"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and named in errors[0].getMessage(), errors
    assert "profiling is OFF" in errors[0].getMessage()
    assert counters()["disabled.invalid_setting"] == 1
    assert exporter.get_finished_spans() == ()  # passes straight through: no span of ours


@pytest.mark.parametrize(("settings", "named"), BAD[:2])
def test_wsgi_bad_setting_disables_profiling_loudly(
    settings: dict[str, Any], named: str, caplog: pytest.LogCaptureFixture
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"hello"]

    middleware = WSGIProfilingMiddleware(app, **settings)
    assert middleware.config.enabled is False
    client = httpx.Client(transport=httpx.WSGITransport(app=middleware))
    assert client.get("http://testserver/").text == "hello"
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert named in error.getMessage()


def test_unknown_variable_warns_once_with_the_closest_name(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"OTELPROF_SAMPEL_RATE": "0.5", "OTELPROF_ZZZZZZZZZZZZZZZZZZZZ": "1"}
    Config.load(env)
    Config.load(env)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(warned) == [  # once each, however often the settings are loaded
        "otelprof: OTELPROF_SAMPEL_RATE is not a setting and is ignored; "
        "did you mean OTELPROF_SAMPLE_RATE?",
        "otelprof: OTELPROF_ZZZZZZZZZZZZZZZZZZZZ is not a setting and is ignored",
    ]


def test_a_good_store_url_is_checked_but_not_opened(tmp_path: Path) -> None:
    path = tmp_path / "state" / "profiles.db"
    middleware = WSGIProfilingMiddleware(lambda e, s: [], store=f"sqlite:///{path}")
    assert middleware.config.enabled is True
    assert not path.parent.exists()  # opened by the first write, in the worker process


@pytest.mark.parametrize(("settings", "named"), BAD)
def test_check_settings_refuses_what_the_middleware_refuses(
    settings: dict[str, Any], named: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The documented CI check: the same settings, the same refusal, the same message.
    # Config.load alone checks each value but not the store URL's details (a SQLite URL
    # with two slashes, a Redis port), so it passed settings the middleware turns off.
    from otelprof_middleware import check_settings

    with pytest.raises(ValueError, match=named) as refused:
        check_settings(**settings)
    WSGIProfilingMiddleware(lambda e, s: [], **settings)
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert str(refused.value) in error.getMessage()


def test_check_settings_checks_the_otlp_export_variables(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from otelprof_middleware import check_settings

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "abc")
    assert check_settings(otlp_profiles=False).otlp_profiles is False  # export off: unused
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_TIMEOUT"):
        check_settings(otlp_profiles=True)
    assert WSGIProfilingMiddleware(lambda e, s: [], otlp_profiles=True).config.enabled is False


def test_check_settings_returns_the_config_and_opens_nothing(tmp_path: Path) -> None:
    from otelprof_middleware import check_settings

    path = tmp_path / "state" / "profiles.db"
    config = check_settings(store=f"sqlite:///{path}", sample_rate="0.5")
    assert config.sample_rate == 0.5 and config.enabled
    assert not path.parent.exists()
    assert check_settings({"OTELPROF_SAMPLE_RATE": "0.25"}).sample_rate == 0.25
    with pytest.raises(ValueError, match="OTELPROF_STORE"):
        check_settings({"OTELPROF_STORE": "sqlite:///:memory:"})


def test_a_redis_store_without_redis_py_names_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The refusal names OTELPROF_STORE, as every other store URL refusal does, and its
    install line works in zsh, which globs an unquoted ``[redis]``."""
    from otelprof_middleware import check_settings

    monkeypatch.setitem(sys.modules, "redis", None)  # import redis: ImportError
    with pytest.raises(ValueError, match="OTELPROF_STORE") as refused:
        check_settings(store="redis://127.0.0.1:6379/0")
    assert "pip install 'otelprof-middleware[redis]'" in str(refused.value)
