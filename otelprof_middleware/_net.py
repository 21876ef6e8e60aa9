"""Small network helpers shared by the viewer, sampling and the profile links."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import SplitResult, urlsplit

__all__ = ["http_url_parts", "is_loopback", "safe_host"]

# A host name (dot-separated labels, an optional final dot) or a bracketed IPv6 address,
# with an optional port: nothing that could end an attribute, a URL's authority or a line.
_HOST = re.compile(
    r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.?|\[[0-9A-Fa-f:.]{2,45}\])"  # name, [v6]
    r"(?::[0-9]{1,5})?"  # port
)
_MAX_HOST = 253 + len(":65535")


def is_loopback(host: str | None) -> bool:
    """True when ``host`` is an IPv4 or IPv6 loopback address (IPv4-mapped too).

    Host names (``localhost``) are not resolved: only the peer's IP address counts.
    """
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def safe_host(host: str | None) -> str | None:
    """``host`` when it is a plain ``name[:port]`` or ``[v6][:port]`` fit for a link; else None.

    Used on the ``Host`` header before it goes into a profile link or the viewer's JSON.
    """
    if host and len(host) <= _MAX_HOST and _HOST.fullmatch(host):
        return host
    return None


def http_url_parts(text: str) -> SplitResult | None:
    """``text`` split, when it is an absolute ``http``/``https`` URL with a host and, if
    any, a port from 0 to 65535; else None.

    ``urlsplit`` raises on some malformed URLs (``http://[::1``) and accepts others
    (``http://h:99999``, whose ``port`` raises only when read): both are None here, so a
    setting's check can name the setting instead of passing on "Invalid IPv6 URL".
    """
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises for a port that is not one
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts
