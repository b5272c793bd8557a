"""Stage 3, table-driven: every matcher and requirement, path tricks, and the claim shapes of
real IdPs through their presets."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ext_authz import errors
from ext_authz.authorization import Rules, explain_match
from ext_authz.config.model import Settings
from ext_authz.model import Credential, Principal, Request
from ext_authz.paths import RequestView, host_name, normalise_path, path_readings
from ext_authz.requirements import Context, cel_error_reason, evaluate, explain_requirement
from tests.support.tokens import make_settings


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


@pytest.mark.parametrize(
    ("authority", "host"),
    [
        ("API.example.com:8443", "api.example.com"),
        ("a.b", "a.b"),
        ("a.b.", "a.b"),
        ("a.b.:443", "a.b"),
        ("[::1]:80", "[::1]"),
        ("[0:0::1]", "[::1]"),
        ("[::FFFF:10.0.0.1]:", "[::ffff:a00:1]"),
        ("a.b:", "a.b"),
        ("a_b.c", "a_b.c"),
        ("1.2.3.4:80", "1.2.3.4"),
        ("", ""),
    ],
)
def test_host_name(authority: str, host: str) -> None:
    assert host_name(authority) == host


@pytest.mark.parametrize(
    "authority",
    [
        "h:x",
        "h:1:2",
        "h:-1",
        "h:123456",
        "u@h",
        "h h",
        " h",
        "h\r",
        "[::1",
        "[::1]]",
        "[x]",
        ":80",
        ".",
        "h..",
        "é.com",
    ],
)
def test_malformed_authority(authority: str) -> None:
    with pytest.raises(errors.InvalidHost):
        host_name(authority)


@pytest.mark.parametrize(
    ("raw", "readings"),
    [
        ("/a/b", ["/a/b"]),
        ("/a/%2e%2e/b", ["/b"]),  # one reading: nothing a backend could read otherwise
        ("/a;x=1/b", ["/a;x=1/b", "/a/b", "/a"]),
        ("/a/..;/b", ["/a/..;/b", "/b", "/"]),
        ("/a/x;jsessionid=1", ["/a/x;jsessionid=1", "/a/x"]),
        ("/a/..%2Fb", ["/a/..%2Fb", "/b"]),
        ("/a/..%2fb", ["/a/..%2fb", "/b"]),
        ("/a/..%5Cb", ["/a/..%5Cb", "/b"]),
        ("/a/..\\b", ["/a/..\\b", "/b"]),
        ("/a/%252e%252e/b", ["/a/%252e%252e/b", "/b"]),
        ("/a/%25252e%25252E/b", ["/a/%25252e%25252E/b", "/b"]),
        ("/a/100%25", ["/a/100%25", "/a/100%"]),
        ("/a;x%2f..%2f..%2fb", ["/a;x%2f..%2f..%2fb", "/a", "/b"]),
        ("/a//../b", ["/b", "/a/b"]),
        ("/a/x%00/../../b", ["/b", "/a/x"]),
    ],
)
def test_path_readings(raw: str, readings: list[str]) -> None:
    assert [p for _, p in path_readings(raw)] == readings
    assert path_readings(raw)[0] == ("rfc3986", normalise_path(raw))


def test_one_reading_costs_nothing_extra() -> None:
    plain = RequestView.of(Request("GET", "/orders/%2e%2e/x"))
    assert plain.other_paths == () and plain.path == "/x"
    assert RequestView.of(Request("GET", "/a;b"), "rfc3986").other_paths == ()
    assert RequestView.of(Request("GET", "/a;b")).other_paths == ("/a",)


def rules_of(*rules: Any, **provider: Any) -> tuple[Rules, Settings]:
    s = make_settings(rules=list(rules), provider=provider)
    return Rules(s.rules, s.providers), s


def view(
    path: str = "/",
    method: str = "GET",
    host: str = "api.example.com",
    context: dict[str, str] | None = None,
    **headers: str,
) -> RequestView:
    h = {k.replace("_", "-"): v for k, v in headers.items()}
    return RequestView.of(Request(method, path, host=host, headers=h, context=context or {}))


MATCH_CASES: list[tuple[str, dict[str, Any], RequestView, dict[str, str] | None]] = [
    ("every request", {}, view(), {}),
    ("method", {"methods": ["GET", "head"]}, view(method="HEAD"), {}),
    ("method other", {"methods": ["GET"]}, view(method="POST"), None),
    ("exact path", {"paths": ["/a"]}, view("/a"), {}),
    ("exact path is not prefix", {"paths": ["/a"]}, view("/a/b"), None),
    ("prefix", {"paths": ["/a/*"]}, view("/a/b/c"), {}),
    ("prefix needs its slash", {"paths": ["/a/*"]}, view("/a"), None),
    ("prefix without slash", {"paths": ["/api*"]}, view("/api-v2"), {}),
    ("template", {"paths": ["/users/{id}"]}, view("/users/alice"), {"id": "alice"}),
    ("template decodes", {"paths": ["/users/{id}"]}, view("/users/auth0%7C123"), {"id": "auth0|123"}),
    ("template one segment", {"paths": ["/users/{id}"]}, view("/users/a/b"), None),
    ("template empty segment", {"paths": ["/users/{id}"]}, view("/users/"), None),
    (
        "template prefix",
        {"paths": ["/orgs/{org}/projects/{project}/*"]},
        view("/orgs/o1/projects/p2/files/x"),
        {"org": "o1", "project": "p2"},
    ),
    ("template traversal", {"paths": ["/users/{id}"]}, view("/users/alice/../bob"), {"id": "bob"}),
    ("template regex chars", {"paths": ["/v1.0/{x}"]}, view("/v1x0/y"), None),
    ("host exact", {"hosts": ["api.example.com"]}, view(host="API.example.com:443"), {}),
    ("host other", {"hosts": ["api.example.com"]}, view(host="evil.com"), None),
    ("host wildcard", {"hosts": ["*.example.com"]}, view(host="a.b.example.com"), {}),
    ("host wildcard not apex", {"hosts": ["*.example.com"]}, view(host="example.com"), None),
    ("host wildcard not lookalike", {"hosts": ["*.example.com"]}, view(host="evilexample.com"), None),
    ("header equals", {"headers": {"x-env": "prod"}}, view(x_env="prod"), {}),
    ("header equals other", {"headers": {"x-env": "prod"}}, view(x_env="dev"), None),
    ("header present", {"headers": {"x-debug": {"present": True}}}, view(x_debug=""), {}),
    ("header present missing", {"headers": {"x-debug": {"present": True}}}, view(), None),
    ("header absent", {"headers": {"x-debug": {"present": False}}}, view(), {}),
    ("header regex", {"headers": {"x-ver": {"regex": "v[0-9]+"}}}, view(x_ver="v12"), {}),
    ("header regex is full", {"headers": {"x-ver": {"regex": "v[0-9]+"}}}, view(x_ver="v12-beta"), None),
    ("header regex lone surrogate", {"headers": {"x-ver": {"regex": "v.*"}}}, view(x_ver="v1\udcff"), None),
    ("context", {"context": {"rule": "admin-api"}}, view(context={"rule": "admin-api"}), {}),
    ("context other", {"context": {"rule": "admin-api"}}, view(context={"rule": "x"}), None),
    ("all conditions", {"paths": ["/a"], "methods": ["GET"], "hosts": ["h"]}, view("/a", host="h"), {}),
    (
        "all conditions one fails",
        {"paths": ["/a"], "methods": ["GET"], "hosts": ["h"]},
        view("/a", host="x"),
        None,
    ),
]


@pytest.mark.parametrize(
    ("match", "request_view", "params"), [c[1:] for c in MATCH_CASES], ids=[c[0] for c in MATCH_CASES]
)
def test_matchers(match: dict[str, Any], request_view: RequestView, params: dict[str, str] | None) -> None:
    rules, _ = rules_of({"match": match, "require": {}})
    matched = rules.match(request_view)
    assert (matched.params if matched else None) == params
    steps = explain_match(rules.rules[0].match, request_view)
    assert all(ok for _, ok in steps) == (params is not None)


TRAVERSAL = [
    "/public/../admin/x",
    "/public/%2e%2e/admin/x",
    "/public/.%2E/admin/x",
    "/public/./../admin/x",
    "//admin/x",
    "/public//../admin/x",
    "/%2e%2e/admin/x",
    "/%61dmin/x",
]


@pytest.mark.parametrize("path", TRAVERSAL)
def test_traversal_cannot_reach_an_anonymous_rule(path: str) -> None:
    rules, _ = rules_of(
        {"match": {"paths": ["/public/*"]}, "allow": "anonymous"},
        {"match": {"paths": ["/admin/*"]}, "require": {"scopes": ["admin"]}},
        {"require": {}},
    )
    matched = rules.match(view(path))
    assert matched is not None and matched.rule.name == "rules[1]"


def principal(claims: dict[str, Any], provider: str = "idp") -> Principal:
    return Principal(provider, claims, "", Credential("t", ()))


def holds(
    require: dict[str, Any], claims: dict[str, Any], request_view: RequestView | None = None, **provider: Any
) -> bool:
    rules, _ = rules_of({"match": {"paths": ["/users/{id}", "/*"]}, "require": require}, **provider)
    v = request_view or view("/users/alice")
    matched = rules.match(v)
    assert matched is not None
    ctx = rules.context(matched, principal(claims), v)
    try:
        rules.check(matched, ctx)
    except errors.AuthError:
        return False
    return True


REQUIREMENT_CASES: list[tuple[str, dict[str, Any], dict[str, Any], bool]] = [
    ("any valid token", {}, {}, True),
    ("scopes string", {"scopes": ["read", "write"]}, {"scope": "write read"}, True),
    ("scopes missing one", {"scopes": ["read", "write"]}, {"scope": "read"}, False),
    ("scopes scp array", {"scopes": ["read"]}, {"scp": ["read"]}, True),
    ("scopes scp string", {"scopes": ["read"]}, {"scp": "read x"}, True),
    ("claim equals", {"claims": {"tenant": "t1"}}, {"tenant": "t1"}, True),
    ("claim differs", {"claims": {"tenant": "t1"}}, {"tenant": "t2"}, False),
    ("claim missing", {"claims": {"tenant": "t1"}}, {}, False),
    ("claim array contains", {"claims": {"groups": "admins"}}, {"groups": ["users", "admins"]}, True),
    ("claim array lacks", {"claims": {"groups": "admins"}}, {"groups": ["users"]}, False),
    ("claim bool strict", {"claims": {"email_verified": True}}, {"email_verified": "true"}, False),
    ("claim bool", {"claims": {"email_verified": True}}, {"email_verified": True}, True),
    ("claim 1 is not true", {"claims": {"email_verified": True}}, {"email_verified": 1}, False),
    ("claim number", {"claims": {"level": 3}}, {"level": 3.0}, True),
    ("claim number string", {"claims": {"level": 3}}, {"level": "3"}, False),
    (
        "claim dotted",
        {"claims": {"realm_access.roles": "admin"}},
        {"realm_access": {"roles": ["admin"]}},
        True,
    ),
    (
        "claim bracket",
        {"claims": {'["https://example.com/roles"]': "admin"}},
        {"https://example.com/roles": ["admin"]},
        True,
    ),
    ("claim any_of", {"claims": {"tier": {"any_of": ["gold", "silver"]}}}, {"tier": "silver"}, True),
    ("claim any_of none", {"claims": {"tier": {"any_of": ["gold", "silver"]}}}, {"tier": "bronze"}, False),
    ("claim all_of", {"claims": {"groups": {"all_of": ["a", "b"]}}}, {"groups": ["b", "c", "a"]}, True),
    ("claim all_of lacks", {"claims": {"groups": {"all_of": ["a", "b"]}}}, {"groups": ["a"]}, False),
    ("roles generic", {"roles": ["admin", "ops"]}, {"roles": ["ops"]}, True),
    ("roles none", {"roles": ["admin"]}, {"roles": ["user"]}, False),
    ("roles single string", {"roles": ["admin"]}, {"roles": "admin"}, True),
    ("groups generic", {"groups": ["eng"]}, {"groups": ["eng"]}, True),
    ("any_of", {"any_of": [{"roles": ["admin"]}, {"scopes": ["write"]}]}, {"scope": "write"}, True),
    ("any_of none", {"any_of": [{"roles": ["admin"]}, {"scopes": ["write"]}]}, {"scope": "read"}, False),
    (
        "all_of",
        {"all_of": [{"roles": ["admin"]}, {"scopes": ["write"]}]},
        {"scope": "write", "roles": ["admin"]},
        True,
    ),
    ("all_of one", {"all_of": [{"roles": ["admin"]}, {"scopes": ["write"]}]}, {"scope": "write"}, False),
    ("not", {"not": {"claims": {"suspended": True}}}, {"suspended": False}, True),
    ("not holds", {"not": {"claims": {"suspended": True}}}, {"suspended": True}, False),
    ("expression owner", {"expression": "claims.sub == params.id"}, {"sub": "alice"}, True),
    ("expression not owner", {"expression": "claims.sub == params.id"}, {"sub": "bob"}, False),
    (
        "expression request",
        {"expression": 'request.method == "GET" && request.host == "api.example.com"'},
        {},
        True,
    ),
    ("expression missing claim is false", {"expression": 'claims.missing == "x"'}, {}, False),
    ("expression in list", {"expression": '"admin" in claims.roles'}, {"roles": ["admin"]}, True),
    ("provider", {"providers": ["idp"]}, {}, True),
    (
        "combined",
        {"scopes": ["read"], "claims": {"tenant": "t1"}, "expression": "claims.sub == params.id"},
        {"scope": "read", "tenant": "t1", "sub": "alice"},
        True,
    ),
]


@pytest.mark.parametrize(
    ("require", "claims", "ok"), [c[1:] for c in REQUIREMENT_CASES], ids=[c[0] for c in REQUIREMENT_CASES]
)
def test_requirements(require: dict[str, Any], claims: dict[str, Any], ok: bool) -> None:
    assert holds(require, claims) is ok


def test_failure_reasons() -> None:
    rules, _ = rules_of(
        {"match": {"paths": ["/scoped"]}, "require": {"scopes": ["admin"], "roles": ["x"]}},
        {"match": {"paths": ["/provider"]}, "require": {"providers": ["idp"]}},
        {"match": {"paths": ["/claims"]}, "require": {"claims": {"a": "b"}}},
    )

    def reason(path: str, claims: dict[str, Any], provider: str = "idp") -> type[errors.AuthError]:
        v = view(path)
        matched = rules.match(v)
        assert matched is not None
        with pytest.raises(errors.AuthError) as caught:
            rules.check(matched, rules.context(matched, principal(claims, provider), v))
        return type(caught.value)

    assert reason("/scoped", {}) is errors.InsufficientScope
    assert reason("/scoped", {"scope": "admin"}) is errors.RequirementNotMet
    assert reason("/provider", {}, provider="other") is errors.IssuerNotAccepted
    assert reason("/claims", {}) is errors.RequirementNotMet


# One token shaped like each mainstream IdP's, read through its preset.
IDP_SHAPES: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = [
    (
        "auth0",
        {"preset": "auth0", "roles_claim": '["https://example.com/roles"]'},
        {
            "scope": "openid read:orders",
            "permissions": ["write:orders"],
            "https://example.com/roles": ["admin"],
        },
        {"scopes": ["read:orders", "write:orders"], "roles": ["admin"]},
    ),
    (
        "okta",
        {"preset": "okta"},
        {"scp": ["orders.read"], "groups": ["Everyone", "Admins"]},
        {"scopes": ["orders.read"], "groups": ["Admins"]},
    ),
    (
        "keycloak",
        {"preset": "keycloak", "roles_claim": ["realm_access.roles", "resource_access.orders-api.roles"]},
        {
            "scope": "openid profile",
            "realm_access": {"roles": ["offline_access"]},
            "resource_access": {"orders-api": {"roles": ["order-admin"]}},
        },
        {"scopes": ["profile"], "roles": ["order-admin"]},
    ),
    (
        "cognito",
        {"preset": "cognito"},
        {"scope": "orders/read", "cognito:groups": ["admins"], "client_id": "abc"},
        {"scopes": ["orders/read"], "groups": ["admins"]},
    ),
    (
        "entra",
        {"preset": "entra"},
        {"scp": "Orders.Read User.Read", "roles": ["Orders.Admin"], "groups": ["0d1f-guid"]},
        {"scopes": ["Orders.Read"], "roles": ["Orders.Admin"], "groups": ["0d1f-guid"]},
    ),
    (
        "google",
        {"preset": "google"},
        {"hd": "example.com", "email_verified": True},
        {"claims": {"hd": "example.com", "email_verified": True}},
    ),
]


@pytest.mark.parametrize(
    ("provider", "claims", "require"), [c[1:] for c in IDP_SHAPES], ids=[c[0] for c in IDP_SHAPES]
)
def test_idp_shapes(provider: dict[str, Any], claims: dict[str, Any], require: dict[str, Any]) -> None:
    assert holds(require, claims, **provider)
    # The same requirement fails when the claims lack what it asks for.
    emptied: dict[str, Any] = {
        k: ([] if isinstance(v, list) else "" if isinstance(v, str) else v) for k, v in claims.items()
    }
    emptied = {k: v for k, v in emptied.items() if k not in ("hd", "email_verified")}
    assert not holds(require, emptied, **provider)


def test_cognito_audience_claim() -> None:
    s = make_settings(provider={"preset": "cognito", "audience_claim": "client_id"})
    assert s.providers[0].claims.audience == ("client_id",)


@pytest.mark.parametrize(
    ("text", "used"),
    [
        ("claims.sub == params.id", {"sub"}),
        (
            'claims["cognito:groups"].exists(g, g == "a") && claims . tenant == "t"',
            {"cognito:groups", "tenant"},
        ),
        ("size(claims) > 2", None),
        ("claims[request.method] == 1", None),
        ("request.method == 'GET'", set()),
    ],
)
def test_expressions_convert_only_the_claims_they_read(text: str, used: set[str] | None) -> None:
    from ext_authz.config.rules import claims_used

    assert claims_used(text) == (None if used is None else frozenset(used))


def test_cel_data_narrows_claims() -> None:
    rules, _ = rules_of({"require": {"expression": "claims.sub == 'alice'"}})
    v = view()
    matched = rules.match(v)
    assert matched is not None
    ctx: Context = rules.context(matched, principal({"sub": "alice", "groups": ["x"] * 100}), v)
    assert ctx.cel_data(frozenset({"sub"}))["claims"] == {"sub": "alice"}
    assert len(ctx.cel_data(None)["claims"]) == 2  # type: ignore[arg-type]


# ---- three-valued requirements: an error (unknown) never allows ----

CONTRACTOR = "claims.email.endsWith('@contractor.example')"
STRUCK = "int(claims.strikes) >= 3"

THREE_VALUED_CASES: list[tuple[str, dict[str, Any], dict[str, Any], bool | None]] = [
    # Each "error" case allowed before (an error counted as false, and `not false` is true).
    ("not expression, no email", {"not": {"expression": CONTRACTOR}}, {}, None),
    ("not expression, array email", {"not": {"expression": CONTRACTOR}}, {"email": ["e@x"]}, None),
    ("not expression, email ok", {"not": {"expression": CONTRACTOR}}, {"email": "bob@example.com"}, True),
    ("not expression, contractor", {"not": {"expression": CONTRACTOR}}, {"email": "e@contractor.example"},
     False),
    ("not int() of '9x'", {"not": {"expression": STRUCK}}, {"strikes": "9x"}, None),
    ("not int() of '1'", {"not": {"expression": STRUCK}}, {"strikes": "1"}, True),
    ("not a non-boolean", {"not": {"expression": "claims.level"}}, {"level": 3}, None),
    ("non-boolean top level", {"expression": "claims.level"}, {"level": 3}, None),
    ("error top level", {"expression": "claims.email.endsWith('@example.com')"}, {}, None),
    ("not not error", {"not": {"not": {"expression": CONTRACTOR}}}, {}, None),
    ("not any_of error or false", {"not": {"any_of": [{"expression": CONTRACTOR}, {"roles": ["x"]}]}},
     {}, None),
    ("not any_of error or true", {"not": {"any_of": [{"expression": CONTRACTOR}, {"roles": ["x"]}]}},
     {"roles": ["x"]}, False),
    ("not all_of error and false", {"not": {"all_of": [{"expression": CONTRACTOR}, {"roles": ["x"]}]}},
     {}, True),
    ("not all_of error and true", {"not": {"all_of": [{"expression": CONTRACTOR}, {"roles": ["x"]}]}},
     {"roles": ["x"]}, None),
    ("any_of not-error or false", {"any_of": [{"not": {"expression": CONTRACTOR}}, {"scopes": ["admin"]}]},
     {}, None),
    ("any_of not-error or true", {"any_of": [{"not": {"expression": CONTRACTOR}}, {"scopes": ["admin"]}]},
     {"scope": "admin"}, True),
    ("all_of not-error and true", {"all_of": [{"not": {"expression": CONTRACTOR}}, {"scopes": ["read"]}]},
     {"scope": "read"}, None),
    ("all_of not-error and false", {"all_of": [{"not": {"expression": CONTRACTOR}}, {"scopes": ["read"]}]},
     {}, False),
    # The missing-claim choice: a `claims:` leaf on an absent (or null) claim, or on an object, is
    # unknown, so `not` of it denies. scopes / roles / groups read an absent claim as the empty set.
    ("not claim, claim absent", {"not": {"claims": {"suspended": True}}}, {}, None),
    ("not claim, claim null", {"not": {"claims": {"suspended": True}}}, {"suspended": None}, None),
    ("not claim, claim an object", {"not": {"claims": {"role": "contractor"}}}, {"role": {"a": 1}}, None),
    ("not claim, parent not an object", {"not": {"claims": {"org.role": "x"}}}, {"org": "acme"}, None),
    ("not claim, other value", {"not": {"claims": {"role": "contractor"}}}, {"role": "staff"}, True),
    ("not claim, other type", {"not": {"claims": {"role": "contractor"}}}, {"role": 7}, True),
    ("not claim, empty array", {"not": {"claims": {"role": "contractor"}}}, {"role": []}, True),
    ("not claim, array with an object", {"not": {"claims": {"role": "contractor"}}},
     {"role": ["staff", {"name": "contractor"}]}, None),
    ("not claim, array with null", {"not": {"claims": {"role": "contractor"}}}, {"role": [None]}, None),
    ("not claim, array with the value", {"not": {"claims": {"role": "contractor"}}},
     {"role": [{"x": 1}, "contractor"]}, False),
    ("not claim all_of, one missing", {"not": {"claims": {"g": {"all_of": ["a", "b"]}}}},
     {"g": ["a", {"x": 1}]}, None),
    ("not claim all_of, one absent", {"not": {"claims": {"g": {"all_of": ["a", "b"]}}}}, {"g": ["a"]}, True),
    ("not claim any_of, one there", {"not": {"claims": {"g": {"any_of": ["a", "b"]}}}},
     {"g": [["b"], "a"]}, False),
    ("not scopes, absent", {"not": {"scopes": ["admin"]}}, {}, True),
    ("not roles, absent", {"not": {"roles": ["contractor"]}}, {}, True),
    ("not groups, absent", {"not": {"groups": ["contractors"]}}, {}, True),
    ("not providers", {"not": {"providers": ["idp"]}}, {}, False),
    # The documented idiom for "an absent claim means not suspended".
    ("idiom absent", {"not": {"expression": "has(claims.suspended) && claims.suspended == true"}}, {}, True),
    ("idiom suspended", {"not": {"expression": "has(claims.suspended) && claims.suspended == true"}},
     {"suspended": True}, False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("require", "token_claims", "truth"),
    [c[1:] for c in THREE_VALUED_CASES],
    ids=[c[0] for c in THREE_VALUED_CASES],
)
def test_three_valued(require: dict[str, Any], token_claims: dict[str, Any], truth: bool | None) -> None:
    rules, _ = rules_of({"require": require})
    v = view()
    matched = rules.match(v)
    assert matched is not None
    ctx = rules.context(matched, principal(token_claims), v)
    assert evaluate(matched.rule.require, ctx) is truth
    assert holds(require, token_claims) is (truth is True)  # only True allows
    steps = explain_requirement(matched.rule.require, ctx)
    assert steps[0][2] is truth
    assert all((value is None) == (reason is not None) for _, _, value, reason in steps)


def test_unknown_at_the_top_denies_with_the_rules_reason() -> None:
    rules, _ = rules_of({"require": {"scopes": ["read"], "expression": CONTRACTOR}})
    v = view()
    matched = rules.match(v)
    assert matched is not None
    with pytest.raises(errors.RequirementNotMet):
        rules.check(matched, rules.context(matched, principal({"scope": "read"}), v))


# ---- the reason explain shows for an error: short, and never data the request carried ----

SECRET = "s3cr3t-Value"

REASON_CASES: list[tuple[str, dict[str, Any], str]] = [
    (CONTRACTOR, {}, 'Key not found in map "email"'),
    (CONTRACTOR, {"email": [SECRET]}, "No matching overloads found (list).endsWith(string)"),
    (STRUCK, {"strikes": SECRET}, "cannot convert string to int"),
    ("claims.level", {"level": 3}, "gives int, not a boolean"),
    ("claims[claims.sub] == 1", {"sub": SECRET}, "Key not found in map"),
    ("request.headers[claims.sub] == 'x'", {"sub": SECRET}, "Key not found in map"),
    ("claims[request.headers.authorization] == 1", {}, "Key not found in map"),
    ("claims.sub.matches(claims.sub + '[')", {"sub": SECRET}, "invalid regular expression"),
    ("claims.l[claims.n] == 'x'", {"l": [SECRET], "n": 912345}, "Index error"),
    ("bool(claims.sub)", {"sub": SECRET}, "Type conversion error from 'string' to 'bool'"),
    ("claims.sub > 1", {"sub": SECRET}, "No matching overloads found _>_(string, int64)"),
]


@pytest.mark.parametrize(("text", "token_claims", "reason"), REASON_CASES)
def test_error_reason_shows_no_request_data(text: str, token_claims: dict[str, Any], reason: str) -> None:
    rules, _ = rules_of({"require": {"expression": text}})
    v = view(authorization=f"Bearer {SECRET}")
    matched = rules.match(v)
    assert matched is not None
    ctx = rules.context(matched, principal(token_claims), v)
    ((_, _, value, shown),) = [s for s in explain_requirement(matched.rule.require, ctx) if s[0] == 1]
    assert value is None
    assert shown == reason
    assert SECRET not in (shown or "") and "912345" not in (shown or "")


MESSAGES = (
    'NOT_FOUND: Key not found in map : "{}"',
    "INVALID_ARGUMENT: cannot convert '{}' to int",
    'INVALID_ARGUMENT: conversion of "{}" failed',
    "UNKNOWN: No matching overloads found : {}",
    "INVALID_ARGUMENT: invalid regular expression: {}",
    "UNKNOWN: Index error: index={} size=1",
    "{}",
)


@given(st.text(max_size=12), st.text(max_size=12), st.sampled_from(MESSAGES))
@settings(max_examples=300, deadline=None, database=None)
def test_error_reason_never_shows_a_request_value(before: str, after: str, message: str) -> None:
    """Whatever a claim or header value holds, the reason is the one a neutral value gives."""
    value = f"{before}Zq{after}"  # "Zq": a word that is neither a type name nor in the expression
    text = "claims[claims.sub] == 1 || request.headers[claims.sub] == 'x' || int(claims.sub) == 1"
    reason = cel_error_reason(message.format(value), text)
    assert "Zq" not in reason
    if not any(ch in value for ch in "'\":= "):  # not changing the message's own structure
        assert reason == cel_error_reason(message.format("Zq"), text)


# ---- property: an error can end in an allow only when both of its values would allow ----

# A tree of combinators over numbered leaves; leaf i reads claim l{i}, as a CEL expression or as a
# `claims:` leaf, which the claims make true, false or an error (unknown) in each of their ways.
Tree = Any
leaf_kinds = st.sampled_from(["expression", "claims"])
trees: st.SearchStrategy[Tree] = st.recursive(
    leaf_kinds,
    lambda kids: st.one_of(
        st.tuples(st.sampled_from(["all_of", "any_of"]), st.lists(kids, min_size=1, max_size=3)),
        st.tuples(st.just("not"), kids),
    ),
    max_leaves=7,
)
ERROR_VALUES: dict[str, list[object]] = {
    "expression": [None, 7, "x", [True]],
    "claims": [None, {"o": "yes"}, ["no", {"o": "yes"}], [None]],
}


def leaves(tree: Tree) -> list[str]:
    if isinstance(tree, str):
        return [tree]
    if tree[0] == "not":
        return leaves(tree[1])
    return [kind for child in tree[1] for kind in leaves(child)]


def require_of(tree: Tree, counter: list[int]) -> dict[str, Any]:
    if isinstance(tree, str):
        i = counter[0]
        counter[0] += 1
        return {"expression": f"claims.l{i}"} if tree == "expression" else {"claims": {f"l{i}": "yes"}}
    if tree[0] == "not":
        return {"not": require_of(tree[1], counter)}
    return {tree[0]: [require_of(child, counter) for child in tree[1]]}


def kleene(tree: Tree, values: list[bool | None], counter: list[int]) -> bool | None:
    """The reference semantics, written out independently of the evaluator."""
    if isinstance(tree, str):
        counter[0] += 1
        leaf: bool | None = values[counter[0] - 1]
        return leaf
    if tree[0] == "not":
        inner = kleene(tree[1], values, counter)
        return None if inner is None else not inner
    results = [kleene(child, values, counter) for child in tree[1]]
    absorbing: bool = tree[0] == "any_of"  # True absorbs any_of, False absorbs all_of
    if absorbing in results:
        return absorbing
    return None if None in results else not absorbing


def claim_for(kind: str, value: bool | None, error_way: int) -> object:
    if value is None:
        ways = ERROR_VALUES[kind]
        return ways[error_way % len(ways)]
    if kind == "expression":
        return value
    return "yes" if value else "no"


@given(trees, st.data())
@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
def test_an_error_allows_only_when_both_values_allow(tree: Tree, data: st.DataObject) -> None:
    kinds = leaves(tree)
    values: list[bool | None] = data.draw(
        st.lists(st.sampled_from([True, False, None]), min_size=len(kinds), max_size=len(kinds))
    )
    ways = data.draw(st.lists(st.integers(0, 3), min_size=len(kinds), max_size=len(kinds)))
    rules, _ = rules_of({"require": require_of(tree, [0])})
    v = view()
    matched = rules.match(v)
    assert matched is not None

    def allowed(assignment: list[bool | None]) -> bool:
        token_claims = {
            f"l{i}": claim_for(kind, value, ways[i])
            for i, (kind, value) in enumerate(zip(kinds, assignment, strict=True))
        }
        token_claims = {k: c for k, c in token_claims.items() if c is not None}  # None: absent
        try:
            rules.check(matched, rules.context(matched, principal(token_claims), v))
        except errors.RequirementNotMet:
            return False
        return True

    allows = allowed(values)
    assert allows == (kleene(tree, values, [0]) is True)
    if allows:
        for i, value in enumerate(values):
            if value is None:
                for forced in (True, False):
                    assert allowed([forced if j == i else x for j, x in enumerate(values)])
