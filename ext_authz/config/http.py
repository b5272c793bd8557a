"""``listen_http:`` and ``http:``: the HTTP authorization listener, checked at load."""

from __future__ import annotations

import re

from ext_authz.config.model import DIALECTS, HttpSettings, TlsSettings
from ext_authz.config.urls import is_loopback
from ext_authz.config.values import boolean, fail, header_name, mapping, string

_PREFIX = re.compile(r"/[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*")


def is_loopback_address(address: str) -> bool:
    """Whether HOST:PORT listens on loopback only."""
    return is_loopback(address.rpartition(":")[0].strip("[]"))


def http_settings(raw: object, listen_http: str | None, tls: TlsSettings | None) -> HttpSettings:
    c = mapping(raw, "http", ("dialects", "allow_plaintext", "original_method_header", "original_uri_header"))
    default = HttpSettings()
    dialects = default.dialects
    if "dialects" in c:
        given = mapping(c["dialects"], "http.dialects", DIALECTS)
        if not given:
            fail("http.dialects", f"name at least one of {', '.join(DIALECTS)}")
        dialects = tuple((name, _prefix(prefix, f"http.dialects.{name}")) for name, prefix in given.items())
    for i, (name, prefix) in enumerate(dialects):
        for other, other_prefix in dialects[:i]:
            if f"{prefix}/".startswith(f"{other_prefix}/") or f"{other_prefix}/".startswith(f"{prefix}/"):
                fail(
                    f"http.dialects.{name}",
                    f"overlaps {other}'s prefix {other_prefix!r}: each path names one dialect",
                )
    allow_plaintext = boolean(c.get("allow_plaintext", False), "http.allow_plaintext")
    if (
        listen_http is not None
        and tls is None
        and not allow_plaintext
        and not is_loopback_address(listen_http)
    ):
        fail(
            "listen_http",
            "a non-loopback HTTP listener needs tls (or http.allow_plaintext: true): the proxy's "
            "X-Forwarded-* and X-Original-* headers are believed only from the proxy",
        )
    return HttpSettings(
        dialects=dialects,
        allow_plaintext=allow_plaintext,
        original_method_header=header_name(
            c.get("original_method_header", default.original_method_header), "http.original_method_header"
        ),
        original_uri_header=header_name(
            c.get("original_uri_header", default.original_uri_header), "http.original_uri_header"
        ),
    )


def _prefix(value: object, path: str) -> str:
    text = string(value, path)
    if not _PREFIX.fullmatch(text):
        fail(path, "must be a path of plain segments without a trailing slash, e.g. /envoy")
    return text
