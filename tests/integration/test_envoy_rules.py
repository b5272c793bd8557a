"""End to end through a real Envoy: the rules of issue 4 against tokens shaped like six real IdPs.

One ext-authz process trusts six test issuers at once, one per IdP shape (Auth0, Okta, Keycloak,
Cognito, Entra ID, Google), each provider with its preset; every token is minted by its own
issuer with that IdP's claim shapes. Envoy runs once per header-encoding mode, with two routes
that send `context_extensions` to ext-authz, and copies the decision's `dry_run_denial` metadata
into a header so the backend shows it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from tests.support.echo import EchoBackend
from tests.support.envoy import AUTHZ_METADATA_HEADER, Exchange, Gateway, start_envoy
from tests.support.idp import TestIssuer, tamper_signature
from tests.support.processes import TAIL_LINES, ExtAuthzProcess, json_log_line, start_ext_authz

DRY_RUN_HEADER = "x-test-authz-dry-run"
LOG_TIMEOUT = 5.0
AUTH0_ROLES = "https://example.com/roles"


@dataclass(frozen=True, slots=True)
class Idp:
    """A provider shaped like one IdP: its settings, a token it would issue, a rule for it."""

    name: str
    audience: str
    settings: Mapping[str, Any]
    claims: Mapping[str, Any]  # on top of the issuer's iss/aud/sub/iat/exp
    require: Mapping[str, Any]
    sub: str = "alice"


IDPS: dict[str, Idp] = {
    idp.name: idp
    for idp in [
        Idp(
            "auth0",
            "https://api.example.com",
            {"preset": "auth0", "roles_claim": f'["{AUTH0_ROLES}"]'},
            {
                "aud": ["https://api.example.com", "https://tenant.us.auth0.com/userinfo"],
                "azp": "spa-client",
                "scope": "openid profile read:orders",
                "permissions": ["write:orders"],
                AUTH0_ROLES: ["admin"],
            },
            {"scopes": ["read:orders", "write:orders"], "roles": ["admin"]},
            sub="auth0|123",
        ),
        Idp(
            "okta",
            "api://default",
            {"preset": "okta"},
            {
                "cid": "0oa1",
                "uid": "00u1",
                "scp": ["openid", "orders.read"],
                "groups": ["Everyone", "Admins"],
            },
            {"scopes": ["orders.read"], "groups": ["Admins"]},
            sub="alice@example.com",
        ),
        Idp(
            "keycloak",
            "orders-api",
            {"preset": "keycloak", "roles_claim": ["realm_access.roles", "resource_access.orders-api.roles"]},
            {
                "aud": ["orders-api", "account"],
                "azp": "web",
                "scope": "openid profile email",
                "realm_access": {"roles": ["offline_access", "uma_authorization"]},
                "resource_access": {
                    "orders-api": {"roles": ["order-admin"]},
                    "account": {"roles": ["manage-account"]},
                },
                "groups": ["/staff"],
            },
            {"scopes": ["profile"], "roles": ["order-admin"]},
            sub="f5c1e0a2-7b39-4a8e-9d4f-0d1c2b3a4e5f",
        ),
        Idp(
            "cognito",
            "cognito-app-client",
            {"preset": "cognito", "audience_claim": "client_id"},
            {
                "aud": None,  # Cognito access tokens carry client_id, not aud
                "client_id": "cognito-app-client",
                "token_use": "access",
                "username": "alice",
                "scope": "orders/read orders/write",
                "cognito:groups": ["admins"],
            },
            {"scopes": ["orders/read"], "groups": ["admins"]},
            sub="0c7a9e6e-1f1e-4a6b-8d3e-5b0f2c9d8a71",
        ),
        Idp(
            "entra",
            "api://orders",
            {"preset": "entra"},
            {
                "ver": "2.0",
                "tid": "72f988bf-86f1-41af-91ab-2d7cd011db47",
                "oid": "2a4c6e80-1b3d-4f5a-9c7e-0d2f4a6c8e1b",
                "scp": "Orders.Read User.Read",
                "roles": ["Orders.Admin"],
                "groups": ["0d1f2e3c-4b5a-6978-8a9b-0c1d2e3f4a5b"],
            },
            {
                "scopes": ["Orders.Read"],
                "roles": ["Orders.Admin"],
                "groups": ["0d1f2e3c-4b5a-6978-8a9b-0c1d2e3f4a5b"],
            },
            sub="AAAAAAAAAAAAAAAAAAAAAIkzqFVrSaSaFHy782bbtaQ",
        ),
        Idp(
            "google",
            "client-1.apps.googleusercontent.com",
            {"preset": "google"},
            {
                "azp": "client-1.apps.googleusercontent.com",
                "email": "alice@example.com",
                "email_verified": True,
                "hd": "example.com",
            },
            {"claims": {"hd": "example.com", "email_verified": True}},
            sub="110169484474386276334",
        ),
    ]
}

RULES: list[dict[str, Any]] = [
    {"name": "public", "match": {"paths": ["/public/*"]}, "allow": "anonymous"},
    *(
        {
            "name": idp.name,
            "match": {"paths": [f"/{idp.name}/*"]},
            "require": {"providers": [idp.name], **idp.require},
        }
        for idp in IDPS.values()
    ),
    {
        "name": "owner",
        "match": {"paths": ["/users/{id}", "/users/{id}/*"], "methods": ["GET", "PUT"]},
        "require": {"expression": "claims.sub == params.id"},
    },
    {
        "name": "admin-host",
        "match": {"hosts": ["admin.example.com", "*.admin.example.com"], "paths": ["/hosted/*"]},
        "require": {},
    },
    {"name": "hosted-open", "match": {"paths": ["/hosted/*"]}, "allow": "anonymous"},
    {
        "name": "flags-strict",
        "match": {
            "paths": ["/flags/*"],
            "headers": {"x-env": "prod", "x-debug": {"present": False}, "x-ver": {"regex": "v[0-9]+"}},
        },
        "require": {},
    },
    {"name": "flags-open", "match": {"paths": ["/flags/*"]}, "allow": "anonymous"},
    {
        "name": "admin-api",
        "match": {"context": {"rule": "admin-api"}},
        "require": {"providers": ["keycloak"], "roles": ["order-admin"]},
    },
    {"name": "reports", "match": {"context": {"rule": "reports"}}, "allow": "anonymous"},
    {
        "name": "hidden",
        "match": {"paths": ["/hidden/*"]},
        "require": {"scopes": ["read:orders"], "roles": ["admin"]},
        "deny": {"status": 404, "message": "no such resource"},
    },
    {
        "name": "tenant",
        "match": {"paths": ["/tenant/*"]},
        "require": {},
        "claim_to_headers": [
            {"header": "x-tenant", "claim": "tenant"},
            {"header": "x-user-roles", "claim": f'["{AUTH0_ROLES}"]'},
        ],
    },
    {
        "name": "rollout",
        "match": {"paths": ["/rollout/*"]},
        "require": {"roles": ["admin"]},
        "mode": "dry_run",
    },
]

# Envoy routes (by path prefix) that tell ext-authz which rule they want.
ROUTE_CONTEXT = {"/ctx-admin/": {"rule": "admin-api"}, "/ctx-reports/": {"rule": "reports"}}


def ext_authz_config(issuers: Mapping[str, TestIssuer]) -> dict[str, Any]:
    providers = [
        {
            "name": idp.name,
            "issuer": issuers[idp.name].url,
            "audiences": [idp.audience],
            "jwks_uri": issuers[idp.name].jwks_uri,
            "claim_to_headers": [{"header": "x-user-id", "claim": "sub"}],
            **idp.settings,
        }
        for idp in IDPS.values()
    ]
    return {"listen": "127.0.0.1:0", "providers": providers, "rules": RULES}


@dataclass(frozen=True, slots=True)
class Stack:
    """Envoy (one header-encoding mode) → ext-authz → echo backend, and the six issuers."""

    gateway: Gateway
    issuers: Mapping[str, TestIssuer]

    @property
    def authz(self) -> ExtAuthzProcess:
        return self.gateway.authz

    def mint(self, idp: str, overrides: Mapping[str, Any] | None = None, **kwargs: Any) -> str:
        """A token from `idp`'s issuer with its claim shapes; an override of None drops a claim."""
        shape = IDPS[idp]
        claims: dict[str, Any] = {"sub": shape.sub, **shape.claims, **(overrides or {})}
        return self.issuers[idp].mint(claims, **kwargs)

    def get(
        self,
        path: str,
        headers: list[tuple[str, str]] | None = None,
        *,
        token: str | None = None,
        host: str | None = None,
    ) -> Exchange:
        return self.gateway.get(path, headers or [], token=token, host=host)


@pytest.fixture(scope="module")
def issuers() -> Iterator[dict[str, TestIssuer]]:
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(TestIssuer(audience=idp.audience)) for name, idp in IDPS.items()}


@pytest.fixture(scope="module")
def authz(
    issuers: dict[str, TestIssuer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ExtAuthzProcess]:
    file = tmp_path_factory.mktemp("rules") / "ext-authz.yaml"
    file.write_text(yaml.safe_dump(ext_authz_config(issuers), sort_keys=False))
    with start_ext_authz(file) as server:
        yield server


@pytest.fixture(scope="module", params=[False, True], ids=["headers", "raw-headers"])
def stack(
    request: pytest.FixtureRequest, issuers: dict[str, TestIssuer], authz: ExtAuthzProcess
) -> Iterator[Stack]:
    with (
        EchoBackend() as echo,
        start_envoy(
            authz.address,
            echo.port,
            encode_raw_headers=request.param,
            route_context_extensions=ROUTE_CONTEXT,
            metadata_headers={DRY_RUN_HEADER: "dry_run_denial"},
        ) as envoy,
    ):
        yield Stack(Gateway(envoy, echo, issuers["auth0"], authz, request.param), issuers)
        authz.process.check_alive()


# ---- helpers ----


def allowed(exchange: Exchange) -> dict[str, list[str]]:
    """The headers the backend saw; fails unless the request got through."""
    assert exchange.response.status == 200, exchange.describe()
    assert exchange.backend is not None, exchange.describe()
    return exchange.backend.headers


def decided_by(exchange: Exchange) -> str:
    """`provider=... rule=...` from Envoy's dynamic metadata, as the backend saw it."""
    values = allowed(exchange).get(AUTHZ_METADATA_HEADER, [])
    assert len(values) == 1, exchange.describe()
    return values[0]


def denied(exchange: Exchange, status: int) -> dict[str, Any]:
    """The JSON body of a denial; fails unless Envoy answered `status` without the backend."""
    assert exchange.response.status == status, exchange.describe()
    assert exchange.backend is None, exchange.describe()
    assert exchange.response.header("content-type") == "application/json", exchange.describe()
    body = exchange.response.json()
    assert isinstance(body, dict), exchange.describe()
    return body


def challenge(exchange: Exchange) -> str:
    value = exchange.response.header("www-authenticate")
    assert value is not None, exchange.describe()
    return value


# ---- one token per IdP shape ----


@pytest.mark.parametrize("idp", list(IDPS))
def test_idp_token_allowed_on_its_rule(stack: Stack, idp: str) -> None:
    exchange = stack.get(f"/{idp}/orders", token=stack.mint(idp))
    headers = allowed(exchange)
    assert headers["x-user-id"] == [IDPS[idp].sub]
    assert decided_by(exchange) == f"provider={idp} rule={idp}"


# (idp, what the token lacks, claim overrides, status, RFC 6750 error / body error)
MISSING: list[tuple[str, str, dict[str, Any], int, str]] = [
    ("auth0", "namespaced roles", {AUTH0_ROLES: None}, 403, "access_denied"),
    ("auth0", "role", {AUTH0_ROLES: ["viewer"]}, 403, "access_denied"),
    ("auth0", "roles not namespaced", {AUTH0_ROLES: None, "roles": ["admin"]}, 403, "access_denied"),
    ("auth0", "permissions", {"permissions": None}, 403, "insufficient_scope"),
    ("auth0", "scope", {"scope": "openid profile"}, 403, "insufficient_scope"),
    ("okta", "group", {"groups": ["Everyone"]}, 403, "access_denied"),
    ("okta", "groups", {"groups": None}, 403, "access_denied"),
    ("okta", "scp", {"scp": ["openid"]}, 403, "insufficient_scope"),
    ("okta", "scope instead of scp", {"scp": None, "scope": "orders.read"}, 403, "insufficient_scope"),
    (
        "keycloak",
        "client role",
        {"resource_access": {"account": {"roles": ["order-admin"]}}},
        403,
        "access_denied",
    ),
    ("keycloak", "resource_access", {"resource_access": None}, 403, "access_denied"),
    (
        "keycloak",
        "roles at top level",
        {"resource_access": None, "roles": ["order-admin"]},
        403,
        "access_denied",
    ),
    ("keycloak", "scope", {"scope": "openid email"}, 403, "insufficient_scope"),
    ("cognito", "cognito:groups", {"cognito:groups": None}, 403, "access_denied"),
    ("cognito", "groups not cognito:", {"cognito:groups": None, "groups": ["admins"]}, 403, "access_denied"),
    ("cognito", "scope", {"scope": "orders/write"}, 403, "insufficient_scope"),
    ("entra", "roles", {"roles": None}, 403, "access_denied"),
    ("entra", "groups", {"groups": ["another-guid"]}, 403, "access_denied"),
    ("entra", "scp", {"scp": "User.Read"}, 403, "insufficient_scope"),
    ("entra", "scope instead of scp", {"scp": None, "scope": "Orders.Read"}, 403, "insufficient_scope"),
    ("google", "email_verified false", {"email_verified": False}, 403, "access_denied"),
    ("google", "email_verified as a string", {"email_verified": "true"}, 403, "access_denied"),
    ("google", "email_verified", {"email_verified": None}, 403, "access_denied"),
    ("google", "hd", {"hd": None}, 403, "access_denied"),
    ("google", "another hd", {"hd": "gmail.com"}, 403, "access_denied"),
]


@pytest.mark.parametrize(
    ("idp", "overrides", "status", "error"),
    [c[:1] + c[2:] for c in MISSING],
    ids=[f"{c[0]}-{c[1]}" for c in MISSING],
)
def test_idp_token_denied_without_the_claim(
    stack: Stack, idp: str, overrides: dict[str, Any], status: int, error: str
) -> None:
    exchange = stack.get(f"/{idp}/orders", token=stack.mint(idp, overrides))
    body = denied(exchange, status)
    assert body["error"] == error
    if error == "insufficient_scope":
        wanted = " ".join(IDPS[idp].require["scopes"])
        assert 'error="insufficient_scope"' in challenge(exchange)
        assert f'scope="{wanted}"' in challenge(exchange)
    else:
        assert body["error_description"] == "the token does not grant access to this resource"
        assert exchange.response.header("www-authenticate") is None, exchange.describe()


def test_a_token_from_another_idp_is_not_accepted(stack: Stack) -> None:
    # Each IdP's rule names its provider: another IdP's valid token is 401, even with the claims.
    token = stack.issuers["auth0"].mint({**IDPS["okta"].claims, "aud": "https://api.example.com"})
    exchange = stack.get("/okta/orders", token=token)
    assert denied(exchange, 401) == {
        "error": "invalid_token",
        "error_description": "the token issuer is not accepted for this resource",
    }
    assert 'error="invalid_token"' in challenge(exchange)
    # The same token signed by another issuer's key does not verify.
    forged = stack.issuers["okta"].mint(
        {**IDPS["auth0"].claims, "iss": stack.issuers["auth0"].url, "sub": "auth0|123"}
    )
    assert denied(stack.get("/auth0/orders", token=forged), 401)["error"] == "invalid_token"


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"client_id": "another-client"}, "client_id of another app"),
        ({"client_id": None, "aud": "cognito-app-client"}, "aud instead of client_id"),
        ({"client_id": None}, "no client_id"),
    ],
    ids=["other-client", "aud-not-client_id", "no-client_id"],
)
def test_cognito_audience_is_client_id(stack: Stack, overrides: dict[str, Any], why: str) -> None:
    exchange = stack.get("/cognito/orders", token=stack.mint("cognito", overrides))
    assert denied(exchange, 401)["error"] == "invalid_token", why
    assert 'error="invalid_token"' in challenge(exchange)


def test_keycloak_realm_role_counts_too(stack: Stack) -> None:
    token = stack.mint("keycloak", {"resource_access": None, "realm_access": {"roles": ["order-admin"]}})
    assert decided_by(stack.get("/keycloak/orders", token=token)) == "provider=keycloak rule=keycloak"


# ---- owner check: claims.sub == params.id ----

# (path as sent, token sub, expected status, what the backend's path is when allowed)
OWNER: list[tuple[str, str, int, str | None]] = [
    ("/users/alice", "alice", 200, "/users/alice"),
    ("/users/bob", "alice", 403, None),
    ("/users/alice/orders/7", "alice", 200, "/users/alice/orders/7"),
    ("/users/bob/orders/7", "alice", 403, None),
    ("/users/auth0%7C123", "auth0|123", 200, "/users/auth0%7C123"),
    ("/users/auth0%7c123/orders", "auth0|123", 200, "/users/auth0%7c123/orders"),
    # Decoded exactly once: the literal text "auth0%7C123" is not the id auth0|123.
    ("/users/auth0%7C123", "auth0%7C123", 403, None),
    ("/users/alice/../bob", "alice", 403, None),
    ("/users/alice/../bob", "bob", 200, "/users/bob"),
    ("/users/bob/../alice", "alice", 200, "/users/alice"),
    ("/users/alice/%2e%2e/bob", "alice", 403, None),
    ("/users/alice/.%2E/bob", "alice", 403, None),
    ("/users/./bob", "alice", 403, None),
    ("//users//alice", "alice", 200, "/users/alice"),
    ("/users/%61lice", "alice", 200, None),
    ("/users/bob?id=alice", "alice", 403, None),
    ("/users/alice?id=bob", "alice", 200, "/users/alice?id=bob"),
]


@pytest.mark.parametrize(
    ("path", "sub", "status", "backend_path"), OWNER, ids=[f"{c[0]}-as-{c[1]}" for c in OWNER]
)
def test_owner_check(stack: Stack, path: str, sub: str, status: int, backend_path: str | None) -> None:
    exchange = stack.get(path, token=stack.mint("auth0", {"sub": sub}))
    if status == 200:
        assert decided_by(exchange) == "provider=auth0 rule=owner"
        assert exchange.backend is not None
        if backend_path is not None:
            assert exchange.backend["path"] == backend_path
    else:
        body = denied(exchange, status)
        assert body == {
            "error": "access_denied",
            "error_description": "the token does not grant access to this resource",
        }


def test_owner_rule_only_for_its_methods(stack: Stack) -> None:
    token = stack.mint("auth0", {"sub": "alice"})
    assert decided_by(stack.gateway.request("PUT", "/users/alice", token=token)) == (
        "provider=auth0 rule=owner"
    )
    body = denied(stack.gateway.request("DELETE", "/users/alice", token=token), 403)
    assert body["error_description"] == "no rule allows this request"


def test_owner_encoded_slash_never_reaches_the_backend(stack: Stack) -> None:
    # Envoy (path_with_escaped_slashes_action: UNESCAPE_AND_REDIRECT) redirects instead.
    exchange = stack.get("/users/alice%2F..%2Fbob", token=stack.mint("auth0", {"sub": "alice"}))
    assert exchange.backend is None, exchange.describe()
    assert exchange.response.status != 200, exchange.describe()


# ---- hosts, headers and route context ----


@pytest.mark.parametrize(
    ("host", "rule"),
    [
        ("admin.example.com", "admin-host"),
        ("admin.example.com:8443", "admin-host"),
        ("API.Admin.Example.com", "admin-host"),
        ("a.b.admin.example.com", "admin-host"),
        ("example.com", "hosted-open"),
        ("evil-admin.example.com", "hosted-open"),
        ("admin.example.com.evil.net", "hosted-open"),
        ("localhost", "hosted-open"),
    ],
)
def test_host_matcher(stack: Stack, host: str, rule: str) -> None:
    anonymous = stack.get("/hosted/x", host=host)
    if rule == "admin-host":
        assert denied(anonymous, 401) == {
            "error": "missing_token",
            "error_description": "a bearer token is required",
        }
        with_token = stack.get("/hosted/x", host=host, token=stack.mint("okta"))
        assert decided_by(with_token) == "provider=okta rule=admin-host"
    else:
        assert decided_by(anonymous) == f"provider= rule={rule}"


@pytest.mark.parametrize("host", ["admin.example.com.", "admin.example.com.:8443"])
def test_host_matcher_ignores_a_trailing_dot(stack: Stack, host: str) -> None:
    # The same name in DNS; Envoy routes it to the same virtual host (domains: ["*"]).
    assert denied(stack.get("/hosted/x", host=host), 401)["error"] == "missing_token"


GOOD_FLAGS = [("x-env", "prod"), ("x-ver", "v12")]


@pytest.mark.parametrize(
    ("headers", "rule"),
    [
        (GOOD_FLAGS, "flags-strict"),
        ([("X-Env", "prod"), ("X-VER", "v1")], "flags-strict"),
        ([("x-env", "dev"), ("x-ver", "v12")], "flags-open"),
        ([("x-ver", "v12")], "flags-open"),
        ([*GOOD_FLAGS, ("x-debug", "1")], "flags-open"),
        ([*GOOD_FLAGS, ("x-debug", "")], "flags-open"),
        ([("x-env", "prod"), ("x-ver", "v12-beta")], "flags-open"),
        ([("x-env", "prod"), ("x-ver", "V12")], "flags-open"),
        ([("x-env", "prod"), ("x-env", "prod"), ("x-ver", "v12")], "flags-open"),
    ],
    ids=["all", "case-insensitive-names", "other-value", "missing", "present", "present-empty",
         "regex-partial", "regex-case", "repeated"],
)  # fmt: skip
def test_header_matchers(stack: Stack, headers: list[tuple[str, str]], rule: str) -> None:
    anonymous = stack.get("/flags/x", headers)
    if rule == "flags-strict":
        assert denied(anonymous, 401)["error"] == "missing_token"
        exchange = stack.get("/flags/x", headers, token=stack.mint("google"))
        assert decided_by(exchange) == "provider=google rule=flags-strict"
    else:
        assert decided_by(anonymous) == "provider= rule=flags-open"


def test_route_context_picks_the_rule(stack: Stack) -> None:
    admin = stack.mint("keycloak")
    # Both Envoy routes send a context; no rule names these paths.
    assert denied(stack.get("/ctx-admin/orders"), 401)["error"] == "missing_token"
    assert decided_by(stack.get("/ctx-admin/orders", token=admin)) == "provider=keycloak rule=admin-api"
    assert decided_by(stack.get("/ctx-reports/q1")) == "provider= rule=reports"
    # The rule's own requirements still apply.
    lacking = stack.mint("keycloak", {"resource_access": None})
    assert denied(stack.get("/ctx-admin/orders", token=lacking), 403)["error"] == "access_denied"
    other_idp = denied(stack.get("/ctx-admin/orders", token=stack.mint("auth0")), 401)
    assert other_idp["error"] == "invalid_token"
    # Without the route's context the same token matches no rule; a client cannot forge it.
    for path in ("/admin-api/orders", "/orders/ctx-admin/x"):
        exchange = stack.get(path, [("x-rule", "admin-api"), ("rule", "admin-api")], token=admin)
        assert denied(exchange, 403)["error_description"] == "no rule allows this request"


# ---- rule-level answers ----


def test_rule_deny_answers_404_with_its_message(stack: Stack) -> None:
    for overrides in ({AUTH0_ROLES: ["viewer"]}, {"scope": "openid"}):
        exchange = stack.get("/hidden/x", token=stack.mint("auth0", overrides))
        body = denied(exchange, 404)
        assert body == {"error": "access_denied", "error_description": "no such resource"}
        assert exchange.response.header("www-authenticate") is None, exchange.describe()
    assert decided_by(stack.get("/hidden/x", token=stack.mint("auth0"))) == "provider=auth0 rule=hidden"
    # `deny` replaces the 403 of a failed requirement; a missing token is still a 401 challenge.
    exchange = stack.get("/hidden/x")
    assert denied(exchange, 401)["error"] == "missing_token"
    assert challenge(exchange) == 'Bearer realm="ext-authz"'


def test_rule_claim_to_headers_reach_the_backend(stack: Stack) -> None:
    token = stack.mint("auth0", {"tenant": "acme", AUTH0_ROLES: ["admin", "billing"]})
    headers = allowed(stack.get("/tenant/x", [("x-tenant", "forged")], token=token))
    assert headers["x-tenant"] == ["acme"]
    assert headers["x-user-roles"] == ["admin,billing"]
    assert headers["x-user-id"] == ["auth0|123"]
    # The rule's headers belong to that rule: the same claims on another rule set nothing.
    elsewhere = allowed(stack.get("/auth0/orders", token=token))
    assert "x-tenant" not in elsewhere
    assert "x-user-roles" not in elsewhere


FORGED = [
    ("x-tenant", "evil"),
    ("X-Tenant", "evil-2"),
    ("x-user-roles", "admin"),
    ("x-user-id", "root"),
    ("x-user-id", "root-2"),
]

# (path, host, token kind, the x-user-id the backend must see)
EVERY_ROUTE: list[tuple[str, str | None, str | None, str | None]] = [
    ("/public/x", None, None, None),
    ("/public/x", None, "bad", None),
    ("/tenant/x", None, "auth0", "auth0|123"),
    ("/auth0/orders", None, "auth0", "auth0|123"),
    ("/okta/orders", None, "okta", "alice@example.com"),
    ("/users/auth0%7C123", None, "auth0", "auth0|123"),
    ("/hosted/x", "admin.example.com", "auth0", "auth0|123"),
    ("/hosted/x", None, None, None),
    ("/flags/x", None, None, None),
    ("/ctx-admin/x", None, "keycloak", IDPS["keycloak"].sub),
    ("/ctx-reports/x", None, "auth0", "auth0|123"),
    ("/hidden/x", None, "auth0", "auth0|123"),
    ("/rollout/x", None, None, None),
    ("/rollout/x", None, "bad", None),
    ("/rollout/x", None, "auth0", "auth0|123"),
]


@pytest.mark.parametrize(
    ("path", "host", "token_kind", "user"),
    EVERY_ROUTE,
    ids=[f"{c[0]}-{c[1] or 'any'}-{c[2] or 'none'}" for c in EVERY_ROUTE],
)
def test_forged_identity_headers_removed_on_every_route(
    stack: Stack, path: str, host: str | None, token_kind: str | None, user: str | None
) -> None:
    token = None
    if token_kind == "bad":
        token = tamper_signature(stack.mint("auth0", {"tenant": "acme"}))
    elif token_kind is not None:
        token = stack.mint(token_kind)  # no tenant claim: the rule's x-tenant is not set either
    headers = allowed(stack.get(path, FORGED, token=token, host=host))
    assert "x-tenant" not in headers
    assert "x-user-roles" not in headers or path == "/tenant/x"
    assert headers.get("x-user-id") == ([user] if user else None)
    if path == "/tenant/x":
        assert headers["x-user-roles"] == ["admin"]  # the token's own claim, not the forged copy


# ---- dry run ----


def dry_run_log(authz: ExtAuthzProcess, before: set[str], status: int, reason: str) -> dict[str, object]:
    """The dry-run log line for a request sent after `before` was taken (bounded wait)."""

    def wanted(line: str) -> bool:
        record = json_log_line(line)
        return (
            line not in before
            and record is not None
            and str(record.get("event", "")).startswith("dry-run")
            and record.get("rule") == "rollout"
            and record.get("dry_run_status") == status
            and record.get("reason") == reason
        )

    line = authz.process.wait_for_line(
        wanted, timeout=LOG_TIMEOUT, what=f"logging a dry-run {status} {reason} for rule rollout"
    )
    record = json_log_line(line)
    assert record is not None
    return record


@pytest.mark.parametrize(
    ("token_kind", "status", "reason"),
    [("lacks-role", 403, "requirement_not_met"), ("bad", 401, "bad_signature"), (None, 401, "missing_token")],
    ids=["lacks-role", "bad-signature", "no-token"],
)
def test_dry_run_allows_and_records_the_would_be_denial(
    stack: Stack, token_kind: str | None, status: int, reason: str
) -> None:
    token = None
    if token_kind == "lacks-role":
        token = stack.mint("auth0", {AUTH0_ROLES: ["viewer"]})
    elif token_kind == "bad":
        token = tamper_signature(stack.mint("auth0"))
    before = set(stack.authz.process.tail(TAIL_LINES).splitlines())
    exchange = stack.get("/rollout/x", [("x-user-id", "forged")], token=token)
    headers = allowed(exchange)
    if token_kind == "lacks-role":
        # A valid token: the request carries its identity even though the rule would deny it.
        assert headers["x-user-id"] == ["auth0|123"]
        assert decided_by(exchange) == "provider=auth0 rule=rollout"
    else:
        assert "x-user-id" not in headers
        assert decided_by(exchange) == "provider= rule=rollout"
    assert [json.loads(v) for v in headers.get(DRY_RUN_HEADER, [])] == [{"status": status, "code": reason}]
    record = dry_run_log(stack.authz, before, status, reason)
    assert record["level"] == "warning"


def test_dry_run_records_nothing_when_the_rule_holds(stack: Stack) -> None:
    exchange = stack.get("/rollout/x", token=stack.mint("auth0"))
    assert decided_by(exchange) == "provider=auth0 rule=rollout"
    assert DRY_RUN_HEADER not in allowed(exchange)
    # Enforced rules are not affected by the dry-run rule: the same role check denies elsewhere.
    denied(stack.get("/hidden/x", token=stack.mint("auth0", {AUTH0_ROLES: ["viewer"]})), 404)
