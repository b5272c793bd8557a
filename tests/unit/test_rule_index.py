"""The rule index (authorization._RuleIndex) picks the same rule as a scan of every rule.

Random configs of every matcher kind, random requests of every shape (paths that share or
differ in their first segment, encoded readings, methods, hosts, headers, context): the indexed
``Rules.choose`` and a plain first-match scan must agree on every one, including the
AmbiguousPath and InvalidHost refusals.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from ext_authz import errors
from ext_authz.compiled import compile
from ext_authz.config.parse import parse
from ext_authz.model import Request
from ext_authz.paths import RequestView
from tests.support.ruleindex import outcome

PATHS = [
    "/orders/*", "/orders/{id}", "/orders", "/ord*", "/", "/*", "/{a}/x", "/users/{id}/*",
    "/admin/*", "/a/b", "/a/{b}", "/reports/{y}/{m}/*", "/x%2Fy/*", "/{v}", "/orders/{id}/items",
]  # fmt: skip
REQUEST_PATHS = [
    "/orders", "/orders/", "/orders/42", "/orders/42/items", "/ord", "/ordersx/1", "/", "",
    "/a/b", "/a/x", "/b/x", "/users/7/profile", "/admin/panel", "/ADMIN/panel", "/reports/2024/05/x",
    "/x%2Fy/z", "/orders%2F42", "/orders;v=1/42", "/a//b", "/./orders/1", "/%61dmin/x", "/orders\\\\42",
    "*", "/users/%2e%2e/admin/x",
]  # fmt: skip
HOSTS = ["api.example.com", "a.internal.example.com", "internal.example.com", "other.test", ""]
HEADER_NAMES = ["x-env", "x-tenant"]


def random_match(chance: random.Random) -> dict[str, Any]:
    match: dict[str, Any] = {}
    if chance.random() < 0.7:
        match["paths"] = chance.sample(PATHS, chance.randint(1, 3))
    if chance.random() < 0.3:
        match["methods"] = chance.sample(["GET", "POST", "DELETE"], chance.randint(1, 2))
    if chance.random() < 0.25:
        match["hosts"] = chance.sample(["api.example.com", "*.internal.example.com", "other.test"], 1)
    if chance.random() < 0.25:
        name = chance.choice(HEADER_NAMES)
        match["headers"] = {
            name: chance.choice(["staging", {"present": True}, {"present": False}, {"regex": "stag.*|dev"}])
        }
    if chance.random() < 0.15:
        match["context"] = {"route": chance.choice(["billing", "api"])}
    return match


def random_request(chance: random.Random) -> Request:
    headers = {
        name: chance.choice(["staging", "dev", "prod"]) for name in HEADER_NAMES if chance.random() < 0.4
    }
    context = {"route": chance.choice(["billing", "api"])} if chance.random() < 0.3 else {}
    path = chance.choice(REQUEST_PATHS)
    return Request(
        method=chance.choice(["GET", "POST", "DELETE", "get"]),
        path=path,
        host=chance.choice(HOSTS),
        headers=headers,
        context=context,
    )


@pytest.mark.parametrize("seed", range(40))
def test_the_index_picks_what_a_scan_picks(seed: int) -> None:
    chance = random.Random(seed)  # noqa: S311 - test data
    rules = [
        {"name": f"r{i}", "match": random_match(chance), "require": {}} for i in range(chance.randint(5, 30))
    ]
    provider = {
        "name": "idp",
        "issuer": "https://idp.test/",
        "audiences": ["api"],
        "jwks_uri": "https://idp.test/jwks",
    }
    settings = parse({"listen": "127.0.0.1:0", "providers": [provider], "rules": rules})
    compiled = compile(settings).rules
    assert compiled._index is not None
    for _ in range(300):
        request = random_request(chance)
        try:
            view = RequestView.of(request, settings.path_readings)
        except errors.AuthError:
            continue
        assert outcome(compiled, view, indexed=True) == outcome(compiled, view, indexed=False), request
