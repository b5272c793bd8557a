"""End to end: a client -> real Envoy -> real ext-authz process -> echo backend.

The test issuer serves OIDC discovery and the JWKS over HTTP; ext-authz finds the keys through
discovery. Every test taking `gateway` runs twice: Envoy sending `headers` (field 3) and Envoy
sending `header_map` (field 13, `encode_raw_headers: true`).
"""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from ext_authz.jws import b64url
from tests.support.echo import EchoBackend
from tests.support.envoy import TRACE_HEADER, Exchange, Gateway, start_envoy
from tests.support.idp import (
    TestIssuer,
    decode_unverified_payload,
    generate_key,
    hmac_token,
    tamper_signature,
)
from tests.support.processes import ExtAuthzProcess, start_ext_authz

REALM = "ext-authz"
IDENTITY_HEADERS = ("x-user-id", "x-user-email", "x-user-groups", "x-jwt-payload")

_AUTH_PARAM = re.compile(r'([A-Za-z_]+)="((?:[^"\\]|\\.)*)"')


def www_authenticate(exchange: Exchange) -> dict[str, str]:
    """The auth-params of the single `WWW-Authenticate: Bearer ...` challenge (RFC 6750 §3)."""
    value = exchange.response.header("www-authenticate")
    assert value is not None, exchange.describe()
    assert value.startswith("Bearer "), exchange.describe()
    return {name: raw.replace('\\"', '"').replace("\\\\", "\\") for name, raw in _AUTH_PARAM.findall(value)}


def assert_denied(exchange: Exchange, status: int) -> None:
    assert exchange.response.status == status, exchange.describe()
    assert exchange.backend is None, exchange.describe()


def assert_rfc6750_body(exchange: Exchange) -> dict[str, Any]:
    response = exchange.response
    content_type = response.header("content-type") or ""
    assert content_type.split(";")[0].strip() == "application/json", exchange.describe()
    cache_control = response.header("cache-control") or ""
    assert "no-store" in [part.strip() for part in cache_control.split(",")], exchange.describe()
    body = response.json()
    assert isinstance(body, dict), exchange.describe()
    assert isinstance(body.get("error"), str), exchange.describe()
    assert isinstance(body.get("error_description"), str), exchange.describe()
    return body


def assert_not_leaked(exchange: Exchange, *secrets: str) -> None:
    response = exchange.response
    for secret in secrets:
        for part in {secret, *secret.split(".")} - {""}:
            if len(part) < 16:
                continue  # a short segment such as an empty signature may occur by chance
            assert part.encode() not in response.body, f"token material in body\n{exchange.describe()}"
            for name, value in response.headers:
                assert part not in value, f"token material in {name}\n{exchange.describe()}"


def backend_headers(exchange: Exchange) -> dict[str, list[str]]:
    assert exchange.response.status == 200, exchange.describe()
    assert exchange.backend is not None, exchange.describe()
    return exchange.backend.headers


def b64url_json(value: str) -> Any:
    assert "=" not in value, f"padding in {value!r}"
    return json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))


# ---- allowed requests ------------------------------------------------------------------------


def test_valid_token_reaches_backend_with_identity_headers(gateway: Gateway) -> None:
    token = gateway.issuer.mint({"email": "alice@example.com", "groups": ["a", "b"]})

    exchange = gateway.get("/orders", token=token)

    seen = backend_headers(exchange)
    assert seen.get("x-user-id") == ["alice"]
    assert seen.get("x-user-email") == ["alice@example.com"]
    assert seen.get("x-user-groups") == ["a,b"]
    payloads = seen.get("x-jwt-payload", [])
    assert len(payloads) == 1, exchange.describe()
    payload = b64url_json(payloads[0])
    assert payload["sub"] == "alice"
    assert payload == decode_unverified_payload(token)


def test_client_forged_identity_headers_are_replaced_or_removed(gateway: Gateway) -> None:
    token = gateway.issuer.mint({"groups": ["a"]})  # no `email` claim
    forged_payload = b64url(b'{"sub":"mallory"}')

    exchange = gateway.get(
        "/orders",
        [
            ("x-user-id", "mallory"),
            ("X-User-Email", "forged@x"),
            ("x-jwt-payload", forged_payload),
        ],
        token=token,
    )

    seen = backend_headers(exchange)
    assert seen.get("x-user-id") == ["alice"], exchange.describe()
    assert "x-user-email" not in seen, exchange.describe()
    payloads = seen.get("x-jwt-payload", [])
    assert len(payloads) == 1, exchange.describe()
    assert b64url_json(payloads[0]) == decode_unverified_payload(token)


@pytest.mark.parametrize("kid", ["ec-1", "ed-1"], ids=["ES256", "EdDSA"])
def test_non_rsa_keys_from_the_jwks_verify(gateway: Gateway, kid: str) -> None:
    exchange = gateway.get("/orders", token=gateway.issuer.mint(kid=kid))

    assert backend_headers(exchange).get("x-user-id") == ["alice"]


def test_lower_case_bearer_scheme_is_accepted(gateway: Gateway) -> None:
    token = gateway.issuer.mint()

    exchange = gateway.get("/orders", [("Authorization", f"bearer {token}")])

    assert backend_headers(exchange).get("x-user-id") == ["alice"]


# ---- 401: no token, invalid token ------------------------------------------------------------


def test_missing_token_is_401_with_bare_challenge(gateway: Gateway) -> None:
    exchange = gateway.get("/orders")

    assert_denied(exchange, 401)
    # RFC 6750 §3.1: no error attribute when the request carried no credentials.
    assert exchange.response.header("www-authenticate") == f'Bearer realm="{REALM}"', exchange.describe()
    assert_rfc6750_body(exchange)


def _expired(issuer: TestIssuer) -> str:
    # Well beyond any clock skew allowance.
    return issuer.mint({"iat": int(time.time()) - 7200}, ttl=-3600)


def _tampered_signature(issuer: TestIssuer) -> str:
    return tamper_signature(issuer.mint())


def _foreign_key_known_kid(issuer: TestIssuer) -> str:
    return issuer.mint(key=generate_key("RS256"))


def _wrong_audience(issuer: TestIssuer) -> str:
    return issuer.mint({"aud": "another-api"})


def _wrong_issuer(issuer: TestIssuer) -> str:
    return issuer.mint({"iss": "http://127.0.0.1:9/"})


def _alg_none(issuer: TestIssuer) -> str:
    return issuer.mint_unsigned()


def _hs256_with_rsa_public_key(issuer: TestIssuer) -> str:
    header = {"alg": "HS256", "typ": "JWT", "kid": issuer.default_kid}
    return hmac_token(header, issuer.claims(), issuer.public_pem())


def _garbage(issuer: TestIssuer) -> str:
    return "this-is-definitely-not-a-jwt"


INVALID_TOKENS: dict[str, Callable[[TestIssuer], str]] = {
    "expired": _expired,
    "tampered-signature": _tampered_signature,
    "foreign-key-known-kid": _foreign_key_known_kid,
    "wrong-audience": _wrong_audience,
    "wrong-issuer": _wrong_issuer,
    "alg-none": _alg_none,
    "hs256-with-rsa-public-key": _hs256_with_rsa_public_key,
    "garbage": _garbage,
}


def test_issuer_serves_discovery_and_a_public_jwks(issuer: TestIssuer) -> None:
    with urllib.request.urlopen(f"{issuer.url}/.well-known/openid-configuration", timeout=5) as response:
        discovery = json.load(response)
    assert discovery["issuer"] == issuer.url
    assert not issuer.url.endswith("/")
    assert discovery["jwks_uri"] == f"{issuer.url}/jwks.json"
    with urllib.request.urlopen(discovery["jwks_uri"], timeout=5) as response:
        jwks = json.load(response)
    assert {key["kid"] for key in jwks["keys"]} == set(issuer.kids)
    for key in jwks["keys"]:
        assert key["use"] == "sig"
        assert not {"d", "p", "q", "dp", "dq", "qi"} & set(key), "private key material published"
    keys = jwt.PyJWKSet.from_dict(jwks)
    for kid in issuer.kids:
        token = issuer.mint(kid=kid)
        claims = jwt.decode(token, keys[kid].key, algorithms=[issuer.key(kid).alg], audience=issuer.audience)
        assert claims["iss"] == issuer.url


# What PyJWT, checking everything the server checks, says about each token above: proves each
# one is invalid for the reason its name gives (the signature is checked before the claims).
EXPECTED_PYJWT_ERROR: dict[str, type[jwt.InvalidTokenError]] = {
    "expired": jwt.ExpiredSignatureError,
    "tampered-signature": jwt.InvalidSignatureError,
    "foreign-key-known-kid": jwt.InvalidSignatureError,
    "wrong-audience": jwt.InvalidAudienceError,
    "wrong-issuer": jwt.InvalidIssuerError,
    "alg-none": jwt.InvalidAlgorithmError,
    "hs256-with-rsa-public-key": jwt.InvalidAlgorithmError,
    "garbage": jwt.DecodeError,
}


def _verify_like_the_server(issuer: TestIssuer, token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(
        token,
        issuer.key().public_key,
        algorithms=["RS256"],
        audience=issuer.audience,
        issuer=issuer.url,
        leeway=60,
        options={"require": ["exp", "iss", "aud", "sub"]},
    )
    return claims


def test_token_builders_control(issuer: TestIssuer) -> None:
    assert _verify_like_the_server(issuer, issuer.mint())["sub"] == "alice"


@pytest.mark.parametrize("case", list(INVALID_TOKENS))
def test_token_builders_are_invalid_for_the_named_reason(issuer: TestIssuer, case: str) -> None:
    with pytest.raises(EXPECTED_PYJWT_ERROR[case]):
        _verify_like_the_server(issuer, INVALID_TOKENS[case](issuer))


@pytest.mark.parametrize("case", list(INVALID_TOKENS))
def test_invalid_token_is_401_invalid_token(gateway: Gateway, case: str) -> None:
    token = INVALID_TOKENS[case](gateway.issuer)

    exchange = gateway.get("/orders", [("x-user-id", "mallory")], token=token)

    assert_denied(exchange, 401)
    challenge = www_authenticate(exchange)
    assert challenge.get("realm") == REALM, exchange.describe()
    assert challenge.get("error") == "invalid_token", exchange.describe()
    assert challenge.get("error_description"), exchange.describe()
    if case == "expired":
        assert "expired" in challenge["error_description"].lower(), exchange.describe()
    body = assert_rfc6750_body(exchange)
    assert body["error"] == "invalid_token", exchange.describe()
    assert_not_leaked(exchange, token)


# ---- 403: scopes -----------------------------------------------------------------------------


def test_admin_write_without_scope_is_403_insufficient_scope(gateway: Gateway) -> None:
    token = gateway.issuer.mint({"scope": "read"})

    exchange = gateway.request("POST", "/admin/x", token=token)

    assert_denied(exchange, 403)
    challenge = www_authenticate(exchange)
    assert challenge.get("error") == "insufficient_scope", exchange.describe()
    assert challenge.get("scope") == "admin", exchange.describe()
    assert_not_leaked(exchange, token)


def test_admin_write_with_scope_is_allowed(gateway: Gateway) -> None:
    token = gateway.issuer.mint({"scope": "read admin"})

    exchange = gateway.request("POST", "/admin/x", token=token)

    assert backend_headers(exchange).get("x-user-id") == ["alice"]
    assert exchange.backend is not None
    assert exchange.backend["method"] == "POST"


def test_admin_read_falls_through_to_the_catch_all_rule(gateway: Gateway) -> None:
    exchange = gateway.get("/admin/x", token=gateway.issuer.mint())

    assert backend_headers(exchange).get("x-user-id") == ["alice"]


# ---- 400: ambiguous credentials --------------------------------------------------------------


def test_two_authorization_headers_are_400_invalid_request(gateway: Gateway) -> None:
    # Envoy's HTTP/1 codec folds repeated `authorization` lines into one "Bearer A,Bearer B"
    # value, in both encoding modes; the server must not pick one of the two.
    first = gateway.issuer.mint({"sub": "alice"})
    second = gateway.issuer.mint({"sub": "bob"})

    exchange = gateway.get(
        "/orders", [("Authorization", f"Bearer {first}"), ("Authorization", f"Bearer {second}")]
    )

    assert_denied(exchange, 400)
    assert www_authenticate(exchange).get("error") == "invalid_request", exchange.describe()
    assert_not_leaked(exchange, first, second)


# ---- anonymous routes ------------------------------------------------------------------------


def test_anonymous_route_without_token_strips_forged_identity(gateway: Gateway) -> None:
    exchange = gateway.get("/public/x", [("x-user-id", "mallory"), ("x-user-email", "forged@x")])

    seen = backend_headers(exchange)
    assert "x-user-id" not in seen, exchange.describe()
    assert "x-user-email" not in seen, exchange.describe()


def test_anonymous_route_with_valid_token_forwards_identity(gateway: Gateway) -> None:
    exchange = gateway.get("/public/x", [("x-user-id", "mallory")], token=gateway.issuer.mint())

    assert backend_headers(exchange).get("x-user-id") == ["alice"], exchange.describe()


def test_anonymous_route_with_invalid_token_has_no_identity(gateway: Gateway) -> None:
    token = tamper_signature(gateway.issuer.mint({"email": "alice@example.com", "groups": ["a"]}))

    exchange = gateway.get("/public/x", [("x-user-id", "mallory"), ("x-jwt-payload", "e30")], token=token)

    seen = backend_headers(exchange)
    for name in IDENTITY_HEADERS:
        assert name not in seen, exchange.describe()


# ---- the Envoy config around the server -------------------------------------------------------


def test_dot_segments_cannot_escape_to_an_anonymous_rule(gateway: Gateway) -> None:
    # Envoy normalises the path before ext_authz sees it, so this is /orders, not /public/*.
    exchange = gateway.get("/public/../orders")

    assert_denied(exchange, 401)


def test_underscored_lookalike_of_an_identity_header_is_dropped(gateway: Gateway) -> None:
    exchange = gateway.get("/public/x", [("x_user_id", "mallory")])

    seen = backend_headers(exchange)
    assert "x_user_id" not in seen, exchange.describe()
    assert "x-user-id" not in seen, exchange.describe()


# ---- forged headers the authorizer never sees ------------------------------------------------


@pytest.fixture(scope="module")
def hiding_gateway(issuer: TestIssuer, echo: EchoBackend, authz_server: ExtAuthzProcess) -> Iterator[Gateway]:
    """Envoy whose ext_authz filter shows ext-authz only the token and the trace header
    (`allowed_headers`), keeping Envoy's default `headers_with_underscores_action: ALLOW`."""
    with start_envoy(
        authz_server.address,
        echo.port,
        allowed_headers=["authorization", TRACE_HEADER],
        headers_with_underscores_action="ALLOW",
    ) as envoy:
        yield Gateway(envoy, echo, issuer, authz_server, False)
        authz_server.process.check_alive()


FORGED_HIDDEN = [
    ("x-user-id", "mallory"),
    ("x_user_id", "mallory"),
    ("x-user_id", "mallory"),
    ("x-user-email", "forged@x"),
    ("x_user_email", "forged@x"),
    ("x_jwt_payload", "e30"),
]


@pytest.mark.parametrize(
    ("path", "claims", "sets"),
    [
        ("/public/x", None, {}),  # anonymous route, no token
        ("/orders", {"sub": None}, {"x-user-id": None}),  # token route, the claim is absent
        ("/orders", {}, {"x-user-id": ["alice"]}),  # the claim is there: ours replaces theirs
    ],
    ids=["anonymous", "token-without-claim", "token-with-claim"],
)
def test_forged_identity_headers_hidden_from_the_authorizer_never_reach_the_backend(
    hiding_gateway: Gateway, path: str, claims: dict[str, Any] | None, sets: dict[str, list[str] | None]
) -> None:
    token = hiding_gateway.issuer.mint(claims) if claims is not None else None

    exchange = hiding_gateway.get(path, FORGED_HIDDEN, token=token)

    seen = backend_headers(exchange)
    for name, _ in FORGED_HIDDEN:
        assert seen.get(name) == sets.get(name), exchange.describe()
    for values in seen.values():
        assert not any(v in ("mallory", "forged@x", "e30") for v in values), exchange.describe()


# ---- process lifecycle -----------------------------------------------------------------------


def test_server_exits_zero_on_sigterm(ext_authz_config_file: Path) -> None:
    server = start_ext_authz(ext_authz_config_file)
    code = server.stop()

    assert code == 0, server.process.describe_failure("stopped")
