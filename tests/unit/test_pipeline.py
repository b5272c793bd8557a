"""The decision core end to end, in process: request in, decision out."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ext_authz.compiled import compile
from ext_authz.keys.static import StaticKeys
from ext_authz.model import Allow, Deny, Request
from ext_authz.pipeline import Pipeline
from tests.support.tokens import NOW, Mint, clock, make_settings

RULES: list[Any] = [
    {"match": {"paths": ["/public/*"]}, "allow": "anonymous"},
    {"match": {"paths": ["/admin/*"], "methods": ["POST"]}, "require": {"scopes": ["admin"]}},
    {"match": {"paths": ["/*"]}, "require": {}},
]


def pipeline(resolver: StaticKeys, **provider: Any) -> Pipeline:
    p = {"claim_to_headers": [{"header": "x-user-id", "claim": "sub"}], **provider}
    return Pipeline(compile(make_settings(provider=p, rules=RULES)), resolver, clock=clock)


def req(path: str = "/orders", method: str = "GET", token: str | None = None, **headers: str) -> Request:
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return Request(method, path, headers={k.replace("_", "-"): v for k, v in headers.items()})


async def test_allow_with_identity(resolver: StaticKeys, mint: Mint) -> None:
    decision = await pipeline(resolver).decide(req(token=mint(), x_user_id="mallory"))
    assert isinstance(decision, Allow)
    assert decision.headers_to_set == (("x-user-id", "alice"),)
    assert decision.rule == "rules[2]" and decision.provider == "idp"


@pytest.mark.parametrize(
    ("request_of", "status", "code"),
    [
        (lambda mint: req(), 401, "missing_token"),
        (lambda mint: req(token=mint(exp=int(NOW) - 3600)), 401, "token_expired"),
        (lambda mint: req(token="garbage"), 401, "malformed_token"),
        (lambda mint: req("/admin/x", "POST", token=mint()), 403, "insufficient_scope"),
        (lambda mint: req(authorization="Bearer a, Bearer b"), 400, "multiple_tokens"),
        (lambda mint: req(path=""), 403, "no_matching_rule"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
async def test_denials(
    resolver: StaticKeys, mint: Mint, request_of: Callable[[Mint], Request], status: int, code: str
) -> None:
    decision = await pipeline(resolver).decide(request_of(mint))
    assert isinstance(decision, Deny), code
    assert (decision.status, decision.code) == (status, code)
    assert "garbage" not in decision.body and "Bearer" not in decision.body


async def test_the_scope_the_denial_named_allows(resolver: StaticKeys, mint: Mint) -> None:
    assert isinstance(
        await pipeline(resolver).decide(req("/admin/x", "POST", token=mint(scope="admin"))), Allow
    )


async def test_anonymous_route(resolver: StaticKeys, mint: Mint) -> None:
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
    p = pipeline(StaticKeys({}))
    decision = await p.decide(req(token=mint()))
    assert isinstance(decision, Deny) and decision.status == 503
    assert dict(decision.headers)["retry-after"] == "7"
    assert json.loads(decision.body)["error"] == "temporarily_unavailable"
    # An anonymous route goes on without identity.
    assert isinstance(await p.decide(req("/public/x", token=mint())), Allow)


# ---- a requirement that errs never allows (three-valued requirements) ----

CONTRACTOR = "claims.email.endsWith('@contractor.example')"
ERROR_RULES: list[Any] = [
    {"match": {"paths": ["/not"]}, "require": {"not": {"expression": CONTRACTOR}}},
    {"match": {"paths": ["/strikes"]}, "require": {"not": {"expression": "int(claims.strikes) >= 3"}}},
    {"match": {"paths": ["/level"]}, "require": {"not": {"expression": "claims.level"}}},
    {
        "match": {"paths": ["/any"]},
        "require": {"any_of": [{"not": {"expression": CONTRACTOR}}, {"scopes": ["admin"]}]},
    },
    {"match": {"paths": ["/all"]}, "require": {"scopes": ["read"], "not": {"expression": CONTRACTOR}}},
    {
        "match": {"paths": ["/not-any"]},
        "require": {"not": {"any_of": [{"expression": CONTRACTOR}, {"claims": {"banned": True}}]}},
    },
    {"match": {"paths": ["/not-claim"]}, "require": {"not": {"claims": {"role": "contractor"}}}},
    {"match": {"paths": ["/top"]}, "require": {"expression": "claims.email.endsWith('@example.com')"}},
]

# (path, claims) pairs that allowed on a two-valued evaluator (an error counted as false) and deny now.
ERRORS_THAT_ALLOWED: list[tuple[str, dict[str, Any]]] = [
    ("/not", {}),  # no email claim
    ("/not", {"email": ["eve@contractor.example"]}),  # an array email
    ("/strikes", {"strikes": "9x"}),  # int("9x")
    ("/level", {"level": 3}),  # not a boolean
    ("/any", {}),
    ("/any", {"email": ["eve@contractor.example"], "scope": "read"}),
    ("/all", {"scope": "read"}),
    ("/all", {"scope": "read", "strikes": 1, "email": 7}),
    ("/not-any", {"banned": False}),
    ("/not-claim", {}),  # a missing claim under not: unknown, denied (the documented choice)
    ("/not-claim", {"role": {"name": "contractor"}}),  # an object
]


@pytest.mark.parametrize(("path", "token_claims"), ERRORS_THAT_ALLOWED)
async def test_an_error_under_not_denies(
    resolver: StaticKeys, mint: Mint, path: str, token_claims: dict[str, Any]
) -> None:
    p = Pipeline(compile(make_settings(rules=ERROR_RULES)), resolver, clock=clock)
    decision = await p.decide(req(path, token=mint(**token_claims)))
    assert isinstance(decision, Deny), (path, token_claims)
    assert (decision.status, decision.code) == (403, "requirement_not_met"), (path, token_claims)


@pytest.mark.parametrize(
    ("path", "token_claims", "allowed"),
    [
        ("/not", {"email": "bob@example.com"}, True),
        ("/not", {"email": "eve@contractor.example"}, False),
        ("/strikes", {"strikes": "1"}, True),
        ("/strikes", {"strikes": "3"}, False),
        ("/any", {"scope": "admin"}, True),  # any_of: one true child wins over an error
        ("/all", {"scope": "read", "email": "bob@example.com"}, True),
        ("/all", {"email": "bob@example.com"}, False),
        ("/not-any", {"email": "bob@example.com", "banned": False}, True),
        ("/not-any", {"banned": True}, False),  # any_of: true, whatever the error beside it
        ("/not-claim", {"role": "staff"}, True),
        ("/not-claim", {"role": ["staff", "contractor"]}, False),
        ("/top", {"email": "bob@example.com"}, True),
        ("/top", {}, False),
    ],
)
async def test_defined_requirements_still_decide(
    resolver: StaticKeys, mint: Mint, path: str, token_claims: dict[str, Any], allowed: bool
) -> None:
    p = Pipeline(compile(make_settings(rules=ERROR_RULES)), resolver, clock=clock)
    decision = await p.decide(req(path, token=mint(**token_claims)))
    assert isinstance(decision, Allow) is allowed, (path, token_claims)


async def test_an_error_in_dry_run_is_a_recorded_denial(resolver: StaticKeys, mint: Mint) -> None:
    rules = [{"require": {"not": {"expression": CONTRACTOR}}, "mode": "dry_run"}]
    p = Pipeline(compile(make_settings(rules=rules)), resolver, clock=clock)
    decision = await p.decide(req(token=mint()))
    assert isinstance(decision, Allow)
    assert decision.metadata["dry_run_denial"] == {"status": 403, "code": "requirement_not_met"}


# ---- header regexes are linear-time (RE2) ----

# Run in a child process with a deadline: on a backtracking engine this pattern against this value
# takes exponential time (tens of seconds at 30 characters), and no in-process timeout can interrupt
# a regex match that holds the GIL.
REDOS_CHILD = """
import asyncio, json, time
from ext_authz.model import Request
from ext_authz.pipeline import Pipeline
from ext_authz.config.parse import parse
from ext_authz.compiled import compile

settings = parse({
    "providers": [{"name": "idp", "issuer": "https://idp.example.com/", "audiences": ["api"],
                   "jwks_uri": "https://idp.example.com/jwks"}],
    "rules": [
        {"match": {"headers": {"x-id": {"regex": "([a-z0-9]+-?)+"}}}, "allow": "anonymous"},
        {"require": {}},
    ],
})
pipeline = Pipeline(compile(settings), keys=None)
result = {}
for name, value in (("pathological", "a" * 10240 + "!"), ("matching", "a-" * 5120)):
    request = Request("GET", "/orders", headers={"x-id": value})
    started = time.perf_counter()
    decision = asyncio.run(pipeline.decide(request))
    result[name] = [time.perf_counter() - started, type(decision).__name__]
print(json.dumps(result))
"""


def test_a_pathological_header_regex_answers_in_milliseconds() -> None:
    try:
        done = subprocess.run(
            [sys.executable, "-c", REDOS_CHILD],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd=Path(__file__).parents[2],
        )
    except subprocess.TimeoutExpired:
        pytest.fail("one decision with a 10 KB header took more than 30 s (a backtracking regex)")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    pathological_seconds, pathological = result["pathological"]
    matching_seconds, matching = result["matching"]
    assert pathological == "Deny"  # no match: the next rule needs a token
    assert matching == "Allow"
    # A few milliseconds on RE2 (the decision includes asyncio.run's loop set-up); 50 ms leaves room
    # for a loaded machine.
    assert pathological_seconds < 0.05 and matching_seconds < 0.05, result
