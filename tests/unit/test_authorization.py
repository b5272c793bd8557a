"""Stage 3: rule matching, path normalisation and requirements."""

from __future__ import annotations

from typing import Any

import pytest

from ext_authz import errors
from ext_authz.authorization import Rules, granted_scopes, normalise_path
from ext_authz.model import Credential, Principal, Request
from tests.unit.conftest import make_settings


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/", "/"),
        ("/a/b", "/a/b"),
        ("/a/../b", "/b"),
        ("/a/./b", "/a/b"),
        ("/../../b", "/b"),
        ("/a/b/..", "/a/"),
        ("/a/%2e%2e/b", "/b"),
        ("/a/%2E%2E/b", "/b"),
        ("/a/.%2e/b", "/b"),
        ("//admin", "/admin"),
        ("/a//b", "/a/b"),
        ("/%61dmin", "/admin"),
        ("/a%2Fb", "/a%2Fb"),  # an encoded slash is data, not a separator
        ("/a/..b", "/a/..b"),
        ("", ""),
    ],
)
def test_normalise_path(raw: str, normal: str) -> None:
    assert normalise_path(raw) == normal


RULES: list[Any] = [
    {"match": {"paths": ["/healthz", "/public/*"]}, "allow": "anonymous"},
    {"match": {"paths": ["/admin/*"], "methods": ["POST", "DELETE"]}, "require": {"scopes": ["admin"]}},
    {"match": {"paths": ["/internal"]}, "require": {"providers": ["idp"]}},
    {"match": {"methods": ["GET"]}, "require": {}},
]


@pytest.mark.parametrize(
    ("method", "path", "rule"),
    [
        ("GET", "/healthz", "rules[0]"),
        ("POST", "/healthz", "rules[0]"),
        ("GET", "/public/", "rules[0]"),
        ("GET", "/public/a/b", "rules[0]"),
        ("GET", "/public", "rules[3]"),
        ("GET", "/healthz/x", "rules[3]"),
        ("post", "/admin/users", "rules[1]"),
        ("GET", "/admin/users", "rules[3]"),
        ("POST", "/public/../admin/x", "rules[1]"),
        ("POST", "/public/%2e%2e/admin/x", "rules[1]"),
        ("POST", "//admin/x", "rules[1]"),
        ("PUT", "/internal", "rules[2]"),
        ("PUT", "/other", None),
        ("", "", None),
    ],
)
def test_first_match_wins(method: str, path: str, rule: str | None) -> None:
    rules = Rules(make_settings(rules=RULES).rules)
    matched = rules.match(Request(method, path))
    assert (matched.name if matched else None) == rule


def principal(provider: str = "idp", **claims: object) -> Principal:
    return Principal(provider, claims, "", Credential("t", ()))


def test_requirements() -> None:
    rules = Rules(make_settings(rules=RULES).rules)
    admin = rules.match(Request("POST", "/admin/x"))
    assert admin is not None
    admin.check(principal(scope="read admin"))
    admin.check(principal(scp=["admin"]))
    with pytest.raises(errors.InsufficientScope) as caught:
        admin.check(principal(scope="read"))
    assert caught.value.scopes == ("admin",) and caught.value.status == 403
    internal = rules.match(Request("GET", "/internal"))
    assert internal is not None
    internal.check(principal())
    with pytest.raises(errors.IssuerNotAccepted):
        internal.check(principal("other"))


def test_granted_scopes() -> None:
    assert granted_scopes({"scope": "a  b"}) == {"a", "b"}
    assert granted_scopes({"scp": "a b"}) == {"a", "b"}
    assert granted_scopes({"scp": ["a", 1, "c"], "scope": "b"}) == {"a", "b", "c"}
    assert granted_scopes({"scope": 5}) == frozenset()
