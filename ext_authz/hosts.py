"""One spelling per host: what ``hosts:`` rules are compiled to and what requests are compared as.

A client can spell one host many ways that a backend or DNS reads alike: ``Admin.Example.COM``,
``admin.example.com.`` (the fully qualified form), ``admin.example.com:443`` or
``admin.example.com:`` (RFC 3986 §3.2.3: an empty port is the default port), ``[0:0::1]`` for
``[::1]``. ``canonical_host`` maps all of them to one string, so a ``hosts:`` rule cannot be
skipped by spelling; anything it cannot read with certainty (two ports, ``user@``, spaces,
characters no host name has, a numeric host that is not a dotted-quad IPv4 address, IPv6 zone
ids) is None, and the caller refuses it (a request answers 400, a config key is an error).
Imports nothing of the package: the config side (``config/rules.py``) and the request side
(``paths.py``) share it.
"""

from __future__ import annotations

import functools
import ipaddress
import re

# Letters, digits, "-" and "_" (seen in internal names) in labels separated by single dots.
_NAME_CHARACTERS = re.compile(r"[a-z0-9_.-]+")
# WHATWG URL §3.5 "ends in a number": such a host is parsed as IPv4 by URL parsers (`127.1`,
# `0x7f.0.0.1`), so only the one dotted-quad spelling is accepted.
_ENDS_IN_NUMBER = re.compile(r"(?:^|\.)(?:[0-9]+|0x[0-9a-f]*)$")


def _port_ok(port: str) -> bool:
    """Empty, or 0-65535 in ASCII digits (``str.isdigit`` alone accepts other scripts' digits)."""
    if len(port) < 5:
        return not port or (port.isascii() and port.isdigit())
    return len(port) == 5 and port.isascii() and port.isdigit() and int(port) <= 65535


# Requests name few hosts: their answers are kept (a pure function), the long ones are not.
_CACHED_HOSTS = 1024
_CACHED_HOST_CHARS = 255


def canonical_host(authority: str, *, port_allowed: bool = True) -> str | None:
    """The host of an authority in its one canonical spelling, None when it is malformed.

    Lower-case; one trailing dot removed; a port (0-65535, or empty) removed; an IPv6 literal in
    brackets in its compressed form (``[2001:db8::1]``).
    """
    if len(authority) <= _CACHED_HOST_CHARS:
        return _canonical_cached(authority, port_allowed)
    return _canonical(authority, port_allowed)


def _canonical(authority: str, port_allowed: bool) -> str | None:
    if not authority.isascii():
        # str.lower() folds some non-ASCII letters into ASCII ones (the Kelvin sign U+212A to "k"):
        # "\u212aube.example.com" would be judged as kube.example.com. A host on the wire is ASCII
        # (internationalised names travel as xn-- punycode).
        return None
    host = authority.lower()
    if host.startswith("["):
        end = host.find("]")
        literal, rest = host[1:end], host[end + 1 :]
        if end < 0 or "%" in literal or (rest and not (port_allowed and rest[0] == ":")):
            return None
        if rest and not _port_ok(rest[1:]):
            return None
        try:
            return f"[{ipaddress.IPv6Address(literal).compressed}]"
        except ValueError:
            return None
    name, colon, port = host.partition(":")
    if colon and not (port_allowed and _port_ok(port)):
        return None
    if name.endswith("."):
        name = name[:-1]
    if _NAME_CHARACTERS.fullmatch(name) is None or ".." in name or name[0] == "." or name[-1] == ".":
        return None
    if name[name.rfind(".") + 1].isdigit() and _ENDS_IN_NUMBER.search(name):
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            return None
    return name


_canonical_cached = functools.lru_cache(maxsize=_CACHED_HOSTS)(_canonical)
