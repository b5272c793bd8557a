"""Attacks found in the review of the hardening work, each through the whole decision path.

Every test here failed before its fix: the input got a request allowed that must be denied.
"""

from __future__ import annotations

from typing import Any

import pytest

from ext_authz.compiled import compile
from ext_authz.config.rules import claims_used
from ext_authz.keys.static import StaticKeys
from ext_authz.model import Allow, Deny, Request
from ext_authz.paths import path_readings
from ext_authz.pipeline import Pipeline
from tests.support.attacks import Forge
from tests.support.tokens import clock, make_settings


@pytest.fixture
def forge(keys: Any) -> Forge:
    return Forge(keys)


def pipeline(resolver: StaticKeys, rules: list[Any]) -> Pipeline:
    return Pipeline(compile(make_settings(rules=rules)), resolver, clock=clock)


def get(path: str, token: str | None = None, host: str = "api.example.com") -> Request:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return Request("GET", path, host=host, headers=headers)


# ---- CEL macros over the whole claims map ----

# `claims.all(...)`, `claims.exists(...)` iterate over the claim names. The claim narrowing of
# policy.claims_used read `claims.all` as "the claim named all", so the expression ran over a map
# holding (at most) that claim: every macro over the claims saw an empty map.
MACRO_EXPRESSIONS = [
    "claims.all(k, k != 'suspended')",
    "!claims.exists(k, k == 'suspended')",
    "claims.exists_one(k, k == 'suspended') == false",
    "claims.filter(k, k == 'suspended').size() == 0",
    "claims.size() != 6",  # iss, aud, sub, iat, exp and suspended
]


@pytest.mark.parametrize("expression", MACRO_EXPRESSIONS)
async def test_a_macro_over_the_claims_sees_every_claim(
    resolver: StaticKeys, forge: Forge, expression: str
) -> None:
    assert claims_used(expression) is None
    p = pipeline(resolver, [{"match": {"paths": ["/*"]}, "require": {"expression": expression}}])
    suspended = await p.decide(get("/x", forge.token(suspended=True)))
    assert isinstance(suspended, Deny), (expression, suspended)
    assert (suspended.status, suspended.code) == (403, "requirement_not_met")
    assert isinstance(await p.decide(get("/x", forge.token())), Allow)


def test_member_functions_of_a_claim_still_narrow() -> None:
    used = claims_used("claims.email.endsWith('@example.com') && claims.sub.size() > 0")
    assert used == frozenset({"email", "sub"})


# ---- double decoding of a percent sign written as escapes ----

# A backend that decodes the path twice reads `%25%32%65` as `%2e` and then as `.`; so does one
# that decodes once when the path is `%%32%65` (a stray `%`, then `%32%65` = `2e`). The "%25 decoded
# again" reading only collapsed `%25` itself, and a stray `%` was no reason to look further.
DOUBLE_DECODED = [
    "/public/%25%32%65%25%32%65/admin/x",
    "/public/%25%32%45%25%32%45/admin/x",
    "/public/%25%32e%25%32e/admin/x",
    "/public/%252%65%252%65/admin/x",
    "/public/%%32%65%%32%65/admin/x",
    "/public/..%25%32%66admin/x",
    "/public/..%25%32Fadmin/x",
]
PUBLIC_AND_ADMIN = [
    {"match": {"paths": ["/public/*"]}, "allow": "anonymous"},
    {"match": {"paths": ["/admin/*"]}, "require": {"scopes": ["admin"]}},
    {"match": {"paths": ["/*"]}, "require": {}},
]


@pytest.mark.parametrize("path", DOUBLE_DECODED)
async def test_escaped_escapes_are_read_as_a_double_decoder_reads_them(
    resolver: StaticKeys, forge: Forge, path: str
) -> None:
    assert "/admin/x" in [p for _, p in path_readings(path)]
    p = pipeline(resolver, PUBLIC_AND_ADMIN)
    for token in (None, forge.token()):
        decision = await p.decide(get(path, token))
        assert isinstance(decision, Deny), (path, decision)
        assert (decision.status, decision.code) == (400, "ambiguous_path")


@pytest.mark.parametrize("path", ["/public/100%25", "/public/%25%32%30off", "/public/50%", "/public/a%zz"])
async def test_percent_signs_that_stay_data_still_work(resolver: StaticKeys, path: str) -> None:
    p = pipeline(resolver, PUBLIC_AND_ADMIN)
    assert isinstance(await p.decide(get(path)), Allow), path
