"""Stage 4: identity headers and RFC 6750 denials."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from ext_authz import errors
from ext_authz.claims import claim_value
from ext_authz.model import Credential, Principal, Request, TokenLocation
from ext_authz.policy import DEFAULT_RULE
from ext_authz.response import Answers, header_value, is_safe_header_value
from tests.unit.conftest import make_settings

CLAIM_HEADERS = [
    {"header": "x-user-id", "claim": "sub"},
    {"header": "x-email", "claim": "email"},
    {"header": "x-groups", "claim": "groups"},
    {"header": "x-roles", "claim": "realm_access.roles"},
    {"header": "x-tenant", "claim": '["https://example.com/tenant"]'},
    {"header": "x-verified", "claim": "email_verified"},
    {"header": "x-bad", "claim": "bad"},
]


RULE = replace(DEFAULT_RULE, name="rules[0]")


def answers(**provider: object) -> Answers:
    return Answers(make_settings(provider={"claim_to_headers": CLAIM_HEADERS, **provider}))


def principal(claims: dict[str, object], *locations: TokenLocation) -> Principal:
    return Principal("idp", claims, "PAYLOAD", Credential("tok", locations))


def test_values() -> None:
    assert header_value("a b") == "a b"
    assert header_value(5) == "5"
    assert header_value(1.5) == "1.5"
    assert header_value(True) == "true"
    assert header_value(["a", "b", 3]) == "a,b,3"
    assert header_value([]) == ""
    assert header_value([{"a": 1}]) is None
    assert header_value({"a": [1]}) == '{"a":[1]}'
    assert header_value(None) is None
    assert claim_value({"a": {"b": ["x"]}}, ("a", "b")) == ["x"]
    assert claim_value({"a": "s"}, ("a", "b")) is None
    for unsafe in ("a\r\nx-admin: 1", "a\nb", "a\x00", "a\x7f", "a\tb", " a", "x" * 9000):
        assert not is_safe_header_value(unsafe)
    assert is_safe_header_value("Zoë, a@b.c")


def test_allow_sets_claims_and_strips_forgeries() -> None:
    claims = {
        "sub": "alice",
        "groups": ["a", "b"],
        "realm_access": {"roles": ["admin"]},
        "https://example.com/tenant": "t1",
        "email_verified": True,
        "bad": "x\r\ny",
    }
    forged = {"x-user-id": "mallory", "x-email": "forged@example.com", "x-bad": "1", "x-other": "kept"}
    allow = answers(payload_header="x-jwt-payload").allow(
        Request("GET", "/", headers=forged), principal(claims), RULE
    )
    assert dict(allow.headers_to_set) == {
        "x-user-id": "alice",
        "x-groups": "a,b",
        "x-roles": "admin",
        "x-tenant": "t1",
        "x-verified": "true",
        "x-jwt-payload": "PAYLOAD",
    }
    # Owned headers the client sent and this decision does not set are removed: no email claim,
    # and the unsafe claim value is left out (the decision stands).
    assert set(allow.headers_to_remove) == {"x-email", "x-bad"}
    assert allow.metadata == {"rule": "rules[0]", "provider": "idp", "claims": claims}


def test_anonymous_allow_removes_every_owned_header() -> None:
    forged = {"x-user-id": "mallory", "x-jwt-payload": "e30", "x-other": "kept"}
    allow = answers(payload_header="x-jwt-payload").allow(Request("GET", "/", headers=forged), None, RULE)
    assert allow.headers_to_set == ()
    assert set(allow.headers_to_remove) == {"x-user-id", "x-jwt-payload"}
    assert allow.metadata == {"rule": "rules[0]"}


def test_forward_token_false_removes_the_carrier() -> None:
    a = answers(forward_token=False, from_cookies=["session"], from_params=["access_token"])
    headers = {"authorization": "Bearer tok", "cookie": "a=1; session=tok"}
    allow = a.allow(
        Request("GET", "/", query="access_token=tok", headers=headers),
        principal(
            {"sub": "alice"},
            TokenLocation("header", "authorization", "Bearer "),
            TokenLocation("cookie", "session"),
            TokenLocation("param", "access_token"),
        ),
        RULE,
    )
    assert "authorization" in allow.headers_to_remove
    assert ("cookie", "a=1") in allow.headers_to_set
    assert allow.query_params_to_remove == ("access_token",)
    only_cookie = a.allow(
        Request("GET", "/", headers={"cookie": "session=tok"}),
        principal({"sub": "alice"}, TokenLocation("cookie", "session")),
        RULE,
    )
    assert "cookie" in only_cookie.headers_to_remove


@pytest.mark.parametrize(
    ("error", "status", "challenge", "body_error"),
    [
        (errors.MissingToken(), 401, 'Bearer realm="ext-authz"', "missing_token"),
        (
            errors.TokenExpired(),
            401,
            'Bearer realm="ext-authz", error="invalid_token", error_description="the token has expired"',
            "invalid_token",
        ),
        (
            errors.MultipleTokens(),
            400,
            'Bearer realm="ext-authz", error="invalid_request", '
            'error_description="the request carries more than one token"',
            "invalid_request",
        ),
        (
            errors.InsufficientScope(("admin", "write")),
            403,
            'Bearer realm="ext-authz", error="insufficient_scope", '
            'error_description="the token lacks a required scope", scope="admin write"',
            "insufficient_scope",
        ),
        (errors.NoMatchingRule(), 403, None, "access_denied"),
        (errors.KeysUnavailable(9), 503, None, "temporarily_unavailable"),
        (errors.InternalError(), 500, None, "server_error"),
    ],
)
def test_denials(error: errors.AuthError, status: int, challenge: str | None, body_error: str) -> None:
    deny = answers().deny(error, RULE)
    headers = dict(deny.headers)
    assert deny.status == status
    assert headers.get("www-authenticate") == challenge
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    assert json.loads(deny.body) == {"error": body_error, "error_description": error.detail}
    assert deny.grpc_code != 0
    if status == 503:
        assert headers["retry-after"] == "9"


def test_realm_is_configurable() -> None:
    deny = Answers(make_settings(realm="orders")).deny(errors.MissingToken())
    assert dict(deny.headers)["www-authenticate"] == 'Bearer realm="orders"'


def test_rule_deny_replaces_403_answers() -> None:
    from ext_authz.policy import DenySettings

    rule = replace(RULE, deny=DenySettings(404, "no such order"))
    for error in (errors.RequirementNotMet(), errors.InsufficientScope(("admin",))):
        deny = answers().deny(error, rule)
        assert deny.status == 404
        assert "www-authenticate" not in dict(deny.headers)
        assert json.loads(deny.body) == {"error": "access_denied", "error_description": "no such order"}
    # A 401 stays a 401: the client must learn to authenticate.
    assert answers().deny(errors.MissingToken(), rule).status == 401


def test_rule_claim_headers_are_added_and_owned() -> None:
    from ext_authz.configreader import ClaimHeader

    rule = replace(RULE, claim_to_headers=(ClaimHeader("x-org", "org", ("org",)),))
    a = Answers(make_settings(provider={"claim_to_headers": CLAIM_HEADERS}))
    assert "x-org" not in a.owned_headers  # owned only when a rule of the config declares it
    allow = a.allow(Request("GET", "/"), principal({"sub": "alice", "org": "o1"}), rule)
    assert ("x-org", "o1") in allow.headers_to_set
