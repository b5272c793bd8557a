"""The decision core end to end, in process: request in, decision out."""

from __future__ import annotations

import json
from typing import Any

from ext_authz.model import Allow, Deny, Request
from ext_authz.pipeline import Pipeline
from tests.unit.conftest import NOW, Mint, StaticResolver, clock, make_settings

RULES: list[Any] = [
    {"match": {"paths": ["/public/*"]}, "allow": "anonymous"},
    {"match": {"paths": ["/admin/*"], "methods": ["POST"]}, "require": {"scopes": ["admin"]}},
    {"match": {"paths": ["/*"]}, "require": {}},
]


def pipeline(resolver: StaticResolver, **provider: Any) -> Pipeline:
    p = {"claim_to_headers": [{"header": "x-user-id", "claim": "sub"}], **provider}
    return Pipeline(make_settings(provider=p, rules=RULES), resolver, clock=clock)


def req(path: str = "/orders", method: str = "GET", token: str | None = None, **headers: str) -> Request:
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return Request(method, path, headers={k.replace("_", "-"): v for k, v in headers.items()})


async def test_allow_with_identity(resolver: StaticResolver, mint: Mint) -> None:
    decision = await pipeline(resolver).decide(req(token=mint(), x_user_id="mallory"))
    assert isinstance(decision, Allow)
    assert decision.headers_to_set == (("x-user-id", "alice"),)
    assert decision.rule == "rules[2]" and decision.provider == "idp"


async def test_denials(resolver: StaticResolver, mint: Mint) -> None:
    p = pipeline(resolver)
    cases = [
        (req(), 401, "missing_token"),
        (req(token=mint(exp=int(NOW) - 3600)), 401, "token_expired"),
        (req(token="garbage"), 401, "malformed_token"),
        (req("/admin/x", "POST", token=mint()), 403, "insufficient_scope"),
        (req(authorization="Bearer a, Bearer b"), 400, "multiple_tokens"),
        (req(path=""), 403, "no_matching_rule"),
    ]
    for request, status, code in cases:
        decision = await p.decide(request)
        assert isinstance(decision, Deny), code
        assert (decision.status, decision.code) == (status, code)
        assert "garbage" not in decision.body and "Bearer" not in decision.body
    assert isinstance(await p.decide(req("/admin/x", "POST", token=mint(scope="admin"))), Allow)


async def test_anonymous_route(resolver: StaticResolver, mint: Mint) -> None:
    p = pipeline(resolver)
    without = await p.decide(req("/public/x", x_user_id="mallory"))
    # Every spelling of the owned name goes, whether the request shows it or not.
    owned = ("x-user-id", "x-user_id", "x_user-id", "x_user_id")
    assert isinstance(without, Allow) and without.headers_to_set == ()
    assert set(without.headers_to_remove) == set(owned)
    bare = await p.decide(req("/public/x"))
    assert isinstance(bare, Allow) and set(bare.headers_to_remove) == set(owned)
    valid = await p.decide(req("/public/x", token=mint()))
    assert isinstance(valid, Allow) and valid.headers_to_set == (("x-user-id", "alice"),)
    for bad in (mint(exp=int(NOW) - 3600), "garbage"):
        invalid = await p.decide(req("/public/x", token=bad, x_user_id="mallory"))
        assert isinstance(invalid, Allow) and invalid.headers_to_set == ()
        assert set(invalid.headers_to_remove) == set(owned)
    ambiguous = await p.decide(req("/public/x", authorization="Bearer a, Bearer b"))
    assert isinstance(ambiguous, Allow) and ambiguous.headers_to_set == ()


async def test_keys_unavailable(mint: Mint) -> None:
    p = pipeline(StaticResolver({}))
    decision = await p.decide(req(token=mint()))
    assert isinstance(decision, Deny) and decision.status == 503
    assert dict(decision.headers)["retry-after"] == "7"
    assert json.loads(decision.body)["error"] == "temporarily_unavailable"
    # An anonymous route goes on without identity.
    assert isinstance(await p.decide(req("/public/x", token=mint())), Allow)
