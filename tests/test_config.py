from __future__ import annotations

import os

import pytest

from otelprof_middleware import Config, check_settings
from otelprof_middleware._config import env_name


def test_defaults_are_safe() -> None:
    config = Config.load({})
    assert config.enabled is True
    assert config.debug_route is False
    assert config.debug_token is None
    # The production recipe: every request profiled cheaply, the keep policy decides.
    assert (config.mode, config.sample_rate, config.hook_sample_rate) == ("always_on", 1.0, 0.0)
    assert config.min_duration_ms is None  # no threshold to pick: slow for its route
    assert 0 < config.keep_per_second <= 10  # the writer's cost is bounded
    assert config.slow_floor_ms > 0
    assert config.resolved_store_url().startswith("sqlite:///")
    assert config.resolved_store_url().endswith("/otelprof/unknown_service/profiles.db")


def test_environment_is_read_and_keyword_wins() -> None:
    env = {"OTELPROF_SAMPLE_RATE": "0.25", "OTELPROF_DEBUG_ROUTE": "yes", "OTELPROF_ENABLED": "0"}
    config = Config.load(env)
    assert (config.sample_rate, config.debug_route, config.enabled) == (0.25, True, False)
    assert Config.load(env, sample_rate=0.5).sample_rate == 0.5


def test_blank_min_duration_means_the_keep_policy() -> None:
    assert Config.load({"OTELPROF_MIN_DURATION_MS": " "}).min_duration_ms is None
    assert Config.load({"OTELPROF_MIN_DURATION_MS": "0"}).min_duration_ms == 0.0


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("sample_rate", "1.5", "between 0 and 1"),
        ("sample_rate", "nan", "between 0 and 1"),
        ("sample_rate", "lots", "must be a number"),
        ("min_duration_ms", "-1", ">= 0"),
        ("enabled", "maybe", "true/false"),
        ("debug_route", "2", "true/false"),
        ("store", "ftp://x", "sqlite:///"),
        ("public_url", "example.com", "absolute http(s) URL"),
        ("public_url", "https://x.example/?a=1", "query"),
        ("public_url", "https://x.example/svc?", "query"),  # links read /svc?/debug/...
        ("public_url", "https://x.example/svc#", "query"),
        ("public_url", "http://[::1", "absolute http(s) URL"),
        ("public_url", "https://x.example:443a", "absolute http(s) URL"),
        ("pyroscope_url", "http://[::1:4040", "absolute http(s) URL"),
        ("pyroscope_url", "http://pyroscope:99999", "absolute http(s) URL"),
        ("interval_ms", "0", "between"),
        ("exclude_paths", "health", "start with '/'"),
        ("trigger_header", "bad header", "HTTP header name"),
        ("max_concurrent", "0", ">= 1"),
        ("store_max_profiles", "ten", "integer"),
        ("service_name", "a/b", "letters"),
        ("service_name", "..", "not only dots"),  # would name otelprof's parent directory
        ("service_name", ".", "not only dots"),
    ],
)
def test_invalid_values_name_the_setting_and_variable(name: str, value: str, fragment: str) -> None:
    with pytest.raises(ValueError) as from_env:
        Config.load({env_name(name): value})
    assert name in str(from_env.value)
    assert env_name(name) in str(from_env.value)
    assert fragment in str(from_env.value)
    with pytest.raises(ValueError, match=env_name(name)):
        Config.load({}, **{name: value})


def test_unknown_keyword_is_refused() -> None:
    with pytest.raises(ValueError, match="sample_rat"):
        Config.load({}, sample_rat=0.5)


def test_exclude_paths_and_service_name() -> None:
    config = Config.load(
        {"OTELPROF_EXCLUDE_PATHS": "/health, /metrics/", "OTEL_SERVICE_NAME": "shop"}
    )
    assert config.exclude_paths == ("/health", "/metrics")
    assert config.resolved_state_dir().endswith("/otelprof/shop")
    assert Config.load({}, exclude_paths=["/a"]).exclude_paths == ("/a",)


def test_base_url_prefers_public_url() -> None:
    assert Config.load({}).base_url("https", "api.test:8443", "/v1/") == "https://api.test:8443/v1"
    config = Config.load({}, public_url="https://profiles.example.com/")
    assert config.base_url("http", "internal:80", "") == "https://profiles.example.com"


def test_any_otel_service_name_is_accepted_and_tamed() -> None:
    config = Config.load({"OTEL_SERVICE_NAME": "my shop/api"})
    assert config.service_name == "my_shop_api"
    assert config.resolved_state_dir().endswith("/otelprof/my_shop_api")


def test_state_dir_starting_with_a_tilde_is_the_home_directory() -> None:
    """An environment file (Docker's ``env_file``, systemd's ``Environment=``, a ``.env``)
    expands no ``~``: ``OTELPROF_STATE_DIR=~/.local/state/otelprof/api`` made a directory
    named ``~`` in the working directory and put the store there."""
    config = Config.load({"OTELPROF_STATE_DIR": "~/.local/state/otelprof/api"})
    home = os.path.expanduser("~")
    assert config.resolved_state_dir() == os.path.join(home, ".local/state/otelprof/api")
    assert config.resolved_store_url() == (
        "sqlite:///" + os.path.join(home, ".local/state/otelprof/api", "profiles.db")
    )
    assert Config.load(state_dir="/srv/otelprof").resolved_state_dir() == "/srv/otelprof"


def test_public_url_with_credentials_is_refused_without_echoing_them() -> None:
    """``user:password@`` in ``public_url`` went into every span link, that is into the
    tracing backend, readable by everyone who can see a trace."""
    for url in ("https://ann:s3cret@api.example.com", "https://s3cret@api.example.com/svc"):
        with pytest.raises(ValueError, match="OTELPROF_PUBLIC_URL") as refused:
            Config.load({"OTELPROF_PUBLIC_URL": url})
        assert "s3cret" not in str(refused.value)
        assert "user:password@" in str(refused.value)


@pytest.mark.parametrize(
    "url", ["reddis://:s3cret@cache:6379/0", "redis2://c:6379/0?password=s3cret"]
)
def test_a_store_url_of_unknown_scheme_is_refused_without_its_password(url: str) -> None:
    """The settings check echoed the URL as given: the password of a mistyped Redis URL
    went into the 'profiling is OFF' error log and the CLI's message."""
    with pytest.raises(ValueError, match="OTELPROF_STORE") as from_env:
        Config.load({"OTELPROF_STORE": url})
    with pytest.raises(ValueError, match="OTELPROF_STORE") as from_keyword:
        Config.load({}, store=url)
    for raised in (from_env, from_keyword):
        assert "must be a URL like" in str(raised.value)
        assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize("url", ["redis://:s3cret@[::1/0", "reddis://u:s3cret@[fe80::1/0"])
def test_a_store_url_that_does_not_split_is_refused_by_name_without_its_password(
    url: str,
) -> None:
    """urlsplit raises on a malformed IPv6 host: the check passed on its bare "Invalid
    IPv6 URL" (naming no setting), and the redaction gave such a URL back untouched."""
    with pytest.raises(ValueError, match="OTELPROF_STORE") as raised:
        check_settings(store=url)
    assert "s3cret" not in str(raised.value)


def test_without_a_home_directory_the_default_store_is_in_memory_not_under_the_cwd(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With ``HOME`` unset and no password-file entry (``env -i``, a CI container under an
    arbitrary uid), ``~`` does not expand: a test run made ``./~/.local/state/otelprof/
    unknown_service/profiles.db`` in the checkout it ran in. The default store is then
    in memory, said once, and nothing is written under the current directory."""
    import pwd

    from opentelemetry.sdk.trace import TracerProvider

    from otelprof_middleware import WSGIProfilingMiddleware

    def no_entry(uid: int) -> pwd.struct_passwd:
        raise KeyError(uid)

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.delenv("OTELPROF_STORE", raising=False)
    monkeypatch.delenv("OTELPROF_STATE_DIR", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    monkeypatch.chdir(tmp_path)
    assert os.path.expanduser("~") == "~"  # (what the user's process sees)
    assert Config.load().resolved_store_url() == "memory://"
    monkeypatch.setenv("XDG_STATE_HOME", "state")  # relative: ignored, as XDG says
    assert Config.load().resolved_store_url() == "memory://"
    monkeypatch.delenv("XDG_STATE_HOME")

    def app(environ: dict[str, object], start_response: object) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])  # type: ignore[operator]
        return [b"ok"]

    middleware = WSGIProfilingMiddleware(
        app, tracer_provider=TracerProvider(), sample_rate=1.0, min_duration_ms=0, mode="hook"
    )
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "SERVER_NAME": "t",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
        "REMOTE_ADDR": "127.0.0.1",
    }
    with caplog.at_level("WARNING"):
        for _ in range(2):
            body = middleware(environ, lambda status, headers, exc_info=None: None)
            assert b"".join(body) == b"ok"
            body.close()  # type: ignore[attr-defined]
        assert middleware.core.writer.flush()
    middleware.core.writer.close()
    assert os.listdir(tmp_path) == []
    assert len(middleware.core.get_store().list()) == 2
    said = [r.getMessage() for r in caplog.records if "no home directory" in r.getMessage()]
    assert len(said) == 1, said


def test_a_state_dir_under_a_tilde_without_a_home_directory_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``OTELPROF_STATE_DIR=~/state`` with no home directory to expand ``~`` to put the
    store in a directory literally named ``~`` under the working one."""
    import pwd

    def no_entry(uid: int) -> pwd.struct_passwd:
        raise KeyError(uid)

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    with pytest.raises(ValueError, match=r"OTELPROF_STATE_DIR.*no home directory"):
        Config.load({"OTELPROF_STATE_DIR": "~/state"})
    assert Config.load({"OTELPROF_STATE_DIR": "/srv/state"}).state_dir == "/srv/state"
