"""The pipeline's trace: what each stage checked, recorded only when asked for, never changing
the decision (explain and the policy tests render it; the request path builds none of it)."""

from __future__ import annotations

from typing import Any

import pytest

from ext_authz.compiled import compile
from ext_authz.keys.static import StaticKeys
from ext_authz.model import Allow, Deny, Request, WouldDeny, reason_of
from ext_authz.pipeline import Pipeline
from ext_authz.sources import HeaderToken
from ext_authz.trace import Trace
from tests.support.tokens import NOW, Mint, clock, make_settings

RULES: list[Any] = [
    {"name": "public", "match": {"paths": ["/public/*"]}, "allow": "anonymous"},
    {"name": "admin", "match": {"paths": ["/admin/*"]}, "require": {"scopes": ["admin"]}},
    {"name": "audit", "match": {"paths": ["/audit/*"]}, "mode": "dry_run", "require": {"scopes": ["audit"]}},
    {
        "name": "user",
        "match": {"paths": ["/users/{id}"]},
        "require": {"expression": "claims.sub == params.id"},
    },
]


def pipeline(resolver: StaticKeys, **top: Any) -> Pipeline:
    return Pipeline(compile(make_settings(rules=RULES, **top)), resolver, clock=clock)


def req(path: str, token: str | None = None, method: str = "GET") -> Request:
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    return Request(method, path, headers=headers)


async def test_an_allow_records_rule_token_and_requirements(resolver: StaticKeys, mint: Mint) -> None:
    trace = Trace()
    decision = await pipeline(resolver).decide(req("/admin/x", mint(scope="admin")), trace)
    assert isinstance(decision, Allow) and trace.decision is decision
    assert trace.matched is not None and trace.matched.name == "admin"
    assert [(r.name, r.matched) for r in trace.rules] == [("public", False), ("admin", True)]
    assert trace.token is not None and trace.token.error is None
    assert trace.token.principal is not None and trace.token.principal.claims["sub"] == "alice"
    assert trace.token.locations == (HeaderToken("authorization", "Bearer "),)
    assert [j.denial for j in trace.judged] == [None] and trace.not_judged is None


async def test_a_denial_records_the_requirement_that_failed(resolver: StaticKeys, mint: Mint) -> None:
    trace = Trace()
    decision = await pipeline(resolver).decide(req("/users/bob", mint()), trace)
    assert isinstance(decision, Deny) and decision.code == "requirement_not_met"
    assert trace.params == {"id": "bob"}
    (judged,) = trace.judged
    assert judged.denial is not None and judged.denial.code == decision.code
    assert [value for _, _, value, _ in judged.steps] == [False, False]


@pytest.mark.parametrize(
    ("path", "token", "why"),
    [
        ("/admin/x", None, "no_token"),
        ("/admin/x", "garbage", "not_verified"),
        ("/public/x", None, "anonymous"),
        ("/nowhere", None, "no_rule"),
        ("/public/..;/admin/x", None, "refused"),
    ],
)
async def test_why_requirements_were_not_judged(
    resolver: StaticKeys, path: str, token: str | None, why: str
) -> None:
    trace = Trace()
    await pipeline(resolver).decide(req(path, token), trace)
    assert trace.not_judged == why and trace.judged == []
    assert (trace.refused is not None) == (why == "refused")


async def test_a_dry_run_allow_carries_the_typed_denial(resolver: StaticKeys, mint: Mint) -> None:
    trace = Trace()
    decision = await pipeline(resolver).decide(req("/audit/x", mint(scope="read")), trace)
    assert isinstance(decision, Allow)
    assert decision.would_deny == WouldDeny(403, "insufficient_scope")
    assert reason_of(decision) == "dry_run:insufficient_scope"
    assert trace.dry_run is True and trace.decision is decision
    assert dict(decision.metadata)["dry_run_denial"] == {"status": 403, "code": "insufficient_scope"}


async def test_an_enforced_allow_has_no_would_deny(resolver: StaticKeys, mint: Mint) -> None:
    decision = await pipeline(resolver).decide(req("/audit/x", mint(scope="audit")))
    assert isinstance(decision, Allow) and decision.would_deny is None
    assert reason_of(decision) == "token"


@pytest.mark.parametrize("mode", ["enforce", "dry_run"])
@pytest.mark.parametrize(
    ("path", "claims", "method"),
    [
        ("/admin/x", {"scope": "admin"}, "GET"),
        ("/admin/x", {"scope": "read"}, "POST"),
        ("/admin/x", None, "GET"),
        ("/admin/x", {"exp": int(NOW) - 3600}, "GET"),
        ("/audit/x", {"scope": "read"}, "GET"),
        ("/users/alice", {}, "GET"),
        ("/users/bob", {}, "GET"),
        ("/users/alice;v=1", {}, "GET"),
        ("/public/x", {"aud": "other"}, "GET"),
        ("/nowhere", {}, "GET"),
        ("/public/..;/admin/x", {"scope": "admin"}, "GET"),
        ("", None, "GET"),
    ],
)
async def test_tracing_never_changes_the_decision(
    resolver: StaticKeys, mint: Mint, mode: str, path: str, claims: dict[str, Any] | None, method: str
) -> None:
    request = req(path, None if claims is None else mint(**claims), method)
    p = pipeline(resolver, mode=mode)
    trace = Trace()
    traced = await p.decide(request, trace)
    assert traced == await p.decide(request) and trace.decision == traced


@pytest.mark.parametrize("path", ["/admin/x", "/users/bob", "/public/x"])
async def test_the_token_itself_is_never_recorded(resolver: StaticKeys, mint: Mint, path: str) -> None:
    token = mint(scope="admin")
    trace = Trace()
    await pipeline(resolver).decide(req(path, token), trace)
    assert token.split(".")[2] not in repr(trace)
