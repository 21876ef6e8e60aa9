"""Small network helpers shared by the viewer and sampling."""

from __future__ import annotations

import ipaddress

__all__ = ["is_loopback"]


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
