"""Which URLs may reach an issuer or its keys: read by the parser and by the key fetcher."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def url_problem(url: str, *, allow_insecure_http: bool) -> str | None:
    """Why ``url`` may not be used to reach an issuer or its keys; None when it may."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "must be an absolute http(s) URL"
    if parts.fragment or parts.username or parts.password:
        return "must not contain a fragment or credentials"
    if parts.scheme == "http" and not allow_insecure_http and not is_loopback(parts.hostname):
        return "must use https (plain http is allowed for loopback hosts, or with allow_insecure_http)"
    return None


def is_loopback(host: str) -> bool:
    """localhost or a loopback IP address (IPv6 without brackets)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
