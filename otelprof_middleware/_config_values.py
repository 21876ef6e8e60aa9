"""One setting's value: parsed from a keyword argument or an ``OTELPROF_*`` variable.

Each parser takes the setting's name and the raw value and returns the typed value, or
raises ``ValueError`` naming the keyword and its environment variable. :class:`Config`
(``_config``) maps every setting to its parser.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
from collections.abc import Mapping

from ._net import http_url_parts
from .stores._base import redact_url

__all__ = [
    "MODES",
    "env_name",
    "parse_bool",
    "parse_float",
    "parse_header",
    "parse_int",
    "parse_mode",
    "parse_optional_float",
    "parse_optional_str",
    "parse_path",
    "parse_paths",
    "parse_public_url",
    "parse_pyroscope_url",
    "parse_service",
    "parse_store",
    "warn_unknown_variables",
    "where",
]

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")

logger = logging.getLogger("otelprof_middleware")


def env_name(field_name: str) -> str:
    """The environment variable of a setting: ``sample_rate`` -> ``OTELPROF_SAMPLE_RATE``."""
    return "OTELPROF_" + field_name.upper()


def where(name: str) -> str:
    return f"{name} ({env_name(name)})"


def parse_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError(f"{where(name)} must be true/false/1/0/yes/no, got {value!r}")


def parse_float(name: str, value: object, *, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where(name)} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{where(name)} must be a number, got {value!r}") from None
    if math.isnan(number) or not low <= number <= high:
        bounds = f"between {low:g} and {high:g}" if high != math.inf else f">= {low:g}"
        raise ValueError(f"{where(name)} must be {bounds}, got {value!r}")
    return number


def parse_optional_float(name: str, value: object, *, low: float) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None  # blank means unset: the keep policy decides
    return parse_float(name, value, low=low)


def parse_int(name: str, value: object, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where(name)} must be an integer, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{where(name)} must be an integer, got {value!r}") from None
    if number < low:
        raise ValueError(f"{where(name)} must be >= {low}, got {value!r}")
    return number


def parse_optional_str(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where(name)} must be a string, got {value!r}")
    return value.strip() or None


def parse_path(name: str, value: object) -> str | None:
    """A directory; a leading ``~`` is the home directory, as in a shell (environment
    files expand none: a literal ``~`` directory would be made in the working one)."""
    text = parse_optional_str(name, value)
    if text is None:
        return None
    path = os.path.expanduser(text)
    if path.startswith("~"):  # no home directory to expand it to: not the working one
        raise ValueError(f"{where(name)} starts with '~', but there is no home directory")
    return path


def parse_paths(name: str, value: object) -> tuple[str, ...]:
    items: list[object]
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple, frozenset, set)):
        items = list(value)
    else:
        raise ValueError(f"{where(name)} must be a comma-separated string or a list of paths")
    paths: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item.startswith("/"):
            raise ValueError(f"{where(name)}: every path must start with '/', got {item!r}")
        paths.append(item.rstrip("/") or "/")
    return tuple(paths)


def parse_public_url(name: str, value: object) -> str | None:
    text = parse_optional_str(name, value)
    if text is None:
        return None
    if "@" in text.partition("://")[2].partition("/")[0]:  # never echoed: a password
        raise ValueError(
            f"{where(name)} must not carry user:password@: it would be in every span link"
        )
    if http_url_parts(text) is None:
        raise ValueError(f"{where(name)} must be an absolute http(s) URL, got {text!r}")
    if "?" in text or "#" in text:  # (an empty one too: links would read ...?/debug/...)
        raise ValueError(f"{where(name)} must not carry a query or fragment, got {text!r}")
    return text.rstrip("/")


def parse_store(name: str, value: object) -> str | None:
    text = parse_optional_str(name, value)
    if text is None:
        return None
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    if scheme not in ("sqlite", "memory", "redis", "rediss"):
        # A mistyped Redis URL ("reddis://:pw@...") still hides its password.
        raise ValueError(
            f"{where(name)} must be a URL like sqlite:///path/profiles.db, memory:// "
            f"or redis://host:6379/0, got {redact_url(text)!r}"
        )
    return text


def parse_pyroscope_url(name: str, value: object) -> str | None:
    text = parse_optional_str(name, value)
    if text is None:
        return None
    parts = http_url_parts(text)
    if parts is None:
        # Never echo the value: it may carry basic-auth credentials.
        raise ValueError(f"{where(name)} must be an absolute http(s) URL")
    if parts.query or parts.fragment:
        raise ValueError(f"{where(name)} must not carry a query or fragment")
    return text


def parse_header(name: str, value: object) -> str:
    text = parse_optional_str(name, value)
    if text is None or _HEADER_NAME.fullmatch(text) is None:
        raise ValueError(f"{where(name)} must be an HTTP header name, got {value!r}")
    return text.lower()


def parse_service(name: str, value: object) -> str | None:
    text = parse_optional_str(name, value)
    if text is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", text):
        raise ValueError(
            f"{where(name)} may hold only letters, digits, '.', '_' and '-', got {text!r}"
        )
    if text is not None and not text.strip("."):  # "..": the state directory's parent
        raise ValueError(f"{where(name)} names a directory: not only dots, got {text!r}")
    return text


_OUR_TOOLING = ("OTELPROF_DEMO_", "OTELPROF_BENCH_", "OTELPROF_SOAK_", "OTELPROF_KEEP_REPORT")
"""Variables of this repository's demo, benchmark and tests, not settings."""
_warned_unknown: set[str] = set()


def warn_unknown_variables(env: Mapping[str, str], known: set[str]) -> None:
    """Warn once per process about an ``OTELPROF_*`` variable no setting reads (a typo)."""
    names = {env_name(name) for name in known}
    for variable in env:
        if (
            not variable.startswith("OTELPROF_")
            or variable in names
            or variable in _warned_unknown
            or variable.startswith(_OUR_TOOLING)
        ):
            continue
        _warned_unknown.add(variable)
        close = difflib.get_close_matches(variable, sorted(names), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        logger.warning("otelprof: %s is not a setting and is ignored%s", variable, hint)


MODES = ("hook", "always_on")


def parse_mode(name: str, value: object) -> str:
    text = parse_optional_str(name, value)
    mode = (text or "").lower().replace("-", "_")
    if mode not in MODES:
        raise ValueError(f"{where(name)} must be one of {', '.join(MODES)}, got {value!r}")
    return mode
