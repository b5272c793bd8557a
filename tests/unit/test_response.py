"""Stage 4: identity headers and RFC 6750 denials."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from ext_authz import errors
from ext_authz.claims import claim_value
from ext_authz.config.model import DEFAULT_RULE, DenySettings
from ext_authz.model import Credential, Principal, Request
from ext_authz.response import Answers, header_value, is_safe_header_value, underscore_spellings
from ext_authz.sources import CookieToken, HeaderToken, ParamToken, TokenSource
from tests.support.tokens import make_settings

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


def principal(claims: dict[str, object], *locations: TokenSource) -> Principal:
    return Principal("idp", claims, "PAYLOAD", Credential("tok", locations))


def spellings(*names: str) -> set[str]:
    return {spelling for name in names for spelling in underscore_spellings(name)}


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
    assert is_safe_header_value("Zoë, a@b.c")


@pytest.mark.parametrize("unsafe", ["a\r\nx-admin: 1", "a\nb", "a\x00", "a\x7f", "a\tb", " a", "x" * 9000])
def test_unsafe_header_values(unsafe: str) -> None:
    assert not is_safe_header_value(unsafe)


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
    # Owned headers this decision does not set are removed: no email claim, and the unsafe claim
    # value is left out (the decision stands); so is every underscore spelling of an owned name.
    owned = [c["header"] for c in CLAIM_HEADERS] + ["x-jwt-payload"]
    assert set(allow.headers_to_remove) == spellings(*owned) - set(dict(allow.headers_to_set))
    assert {"x-email", "x-bad", "x_user_id", "x_user-id", "x-user_id", "x_email"} <= set(
        allow.headers_to_remove
    )
    assert allow.metadata == {"rule": "rules[0]", "provider": "idp", "claims": claims}


def test_anonymous_allow_removes_every_owned_header() -> None:
    forged = {"x-user-id": "mallory", "x-jwt-payload": "e30", "x-other": "kept"}
    allow = answers(payload_header="x-jwt-payload").allow(Request("GET", "/", headers=forged), None, RULE)
    assert allow.headers_to_set == ()
    owned = [c["header"] for c in CLAIM_HEADERS] + ["x-jwt-payload"]
    assert set(allow.headers_to_remove) == spellings(*owned)
    assert allow.metadata == {"rule": "rules[0]"}


def test_forward_token_false_removes_the_carrier() -> None:
    a = answers(forward_token=False, from_cookies=["session"], from_params=["access_token"])
    headers = {"authorization": "Bearer tok", "cookie": "a=1; session=tok"}
    allow = a.allow(
        Request("GET", "/", query="access_token=tok", headers=headers),
        principal(
            {"sub": "alice"},
            HeaderToken("authorization", "Bearer "),
            CookieToken("session"),
            ParamToken("access_token"),
        ),
        RULE,
    )
    assert "authorization" in allow.headers_to_remove
    assert ("cookie", "a=1") in allow.headers_to_set
    assert allow.query_params_to_remove == ("access_token",)
    only_cookie = a.allow(
        Request("GET", "/", headers={"cookie": "session=tok"}),
        principal({"sub": "alice"}, CookieToken("session")),
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


@pytest.mark.parametrize(
    "error", [errors.RequirementNotMet(), errors.InsufficientScope(("admin",))], ids=["requirement", "scope"]
)
def test_rule_deny_replaces_403_answers(error: errors.AuthError) -> None:
    deny = answers().deny(error, replace(RULE, deny=DenySettings(404, "no such order")))
    assert deny.status == 404
    assert "www-authenticate" not in dict(deny.headers)
    assert json.loads(deny.body) == {"error": "access_denied", "error_description": "no such order"}


def test_rule_deny_leaves_a_401() -> None:
    # A 401 stays a 401: the client must learn to authenticate.
    rule = replace(RULE, deny=DenySettings(404, "no such order"))
    assert answers().deny(errors.MissingToken(), rule).status == 401


def test_rule_claim_headers_are_added_and_owned() -> None:
    from ext_authz.config.model import ClaimHeader

    rule = replace(RULE, claim_to_headers=(ClaimHeader("x-org", "org", ("org",)),))
    a = Answers(make_settings(provider={"claim_to_headers": CLAIM_HEADERS}))
    assert "x-org" not in a.owned_headers  # owned only when a rule of the config declares it
    allow = a.allow(Request("GET", "/"), principal({"sub": "alice", "org": "o1"}), rule)
    assert ("x-org", "o1") in allow.headers_to_set


def test_owned_headers_are_removed_even_when_the_request_does_not_show_them() -> None:
    # Envoy's allowed_headers (or an earlier filter) may hide a forged copy from the CheckRequest.
    a = answers(payload_header="x-jwt-payload")
    anonymous = a.allow(Request("GET", "/"), None, RULE)
    assert set(anonymous.headers_to_remove) == spellings(
        *(c["header"] for c in CLAIM_HEADERS), "x-jwt-payload"
    )
    assert anonymous.headers_to_remove is a.headers_always_removed  # nothing computed per request
    token = a.allow(Request("GET", "/"), principal({"sub": "alice"}), RULE)
    removed = set(token.headers_to_remove)
    assert "x-user-id" not in removed  # set by this decision: Envoy removes after it sets
    assert {"x-user_id", "x_user-id", "x_user_id", "x-email", "x_email", "x-bad", "x_bad"} <= removed
    assert "x-jwt-payload" not in removed and "x_jwt_payload" in removed
    # Another decision of the same config sets another list of names: its own removals.
    with_email = a.allow(Request("GET", "/"), principal({"sub": "alice", "email": "a@x"}), RULE)
    assert "x-email" not in with_email.headers_to_remove and "x_email" in with_email.headers_to_remove
    again = a.allow(Request("GET", "/"), principal({"sub": "bob"}), RULE)
    assert again.headers_to_remove == token.headers_to_remove and "x-email" in again.headers_to_remove


def test_underscore_spellings() -> None:
    assert underscore_spellings("x-user-id") == ("x-user-id", "x-user_id", "x_user-id", "x_user_id")
    assert underscore_spellings("single") == ("single",)
    assert set(underscore_spellings("x_user")) == {"x_user", "x-user"}
    assert len(underscore_spellings("x-forwarded-user-id")) == 8
    # More dashes than that: the name, its dashed and its all-underscore spelling.
    assert set(underscore_spellings("x-a-b-c-d")) == {"x-a-b-c-d", "x_a_b_c_d"}


def test_long_names_lose_any_spelling_the_request_shows() -> None:
    a = answers(claim_to_headers=[{"header": "x-auth-user-org-id", "claim": "sub"}])
    assert set(a.headers_always_removed) == {"x-auth-user-org-id", "x_auth_user_org_id"}
    shown = {"x-auth_user-org_id": "forged", "x_auth-user_org-id": "forged", "x-other_name": "kept"}
    anonymous = a.allow(Request("GET", "/", headers=shown), None, RULE)
    assert set(anonymous.headers_to_remove) == {"x-auth-user-org-id", "x_auth_user_org_id", *shown} - {
        "x-other_name"
    }
    token = a.allow(Request("GET", "/", headers=shown), principal({"sub": "alice"}), RULE)
    assert set(token.headers_to_remove) == {"x_auth_user_org_id", "x-auth_user-org_id", "x_auth-user_org-id"}


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (["a", "b"], "a,b"),
        (["a b", "c"], "a b,c"),
        (["x,admin"], None),
        (["reader", "x, admin"], None),
        (["reader", " admin"], None),
        (["admin\t"], None),
        (["a", ["b"]], None),
        ([["a", "b"]], None),
        (["a", {"b": 1}], None),
        ([1, True, 2.5], "1,true,2.5"),
    ],
)
def test_array_values_that_would_read_as_other_elements(value: object, text: str | None) -> None:
    assert header_value(value) == text


def test_ambiguous_array_claim_is_left_out_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    a = answers()
    claims: dict[str, object] = {"sub": "alice", "groups": ["staff", "x,admin-secret-value"]}
    with caplog.at_level("WARNING", logger="ext_authz.response"):
        allow = a.allow(Request("GET", "/", headers={"x-groups": "admin"}), principal(claims), RULE)
    assert dict(allow.headers_to_set) == {"x-user-id": "alice"}
    assert "x-groups" in allow.headers_to_remove  # the client's copy goes too
    (record,) = caplog.records
    assert record.fields == {"header": "x-groups", "claim": "groups"}  # type: ignore[attr-defined]
    assert "admin-secret-value" not in record.getMessage()
    # An absent claim is not worth a log line.
    caplog.clear()
    with caplog.at_level("WARNING", logger="ext_authz.response"):
        a.allow(Request("GET", "/"), principal({"sub": "alice"}), RULE)
    assert caplog.records == []
