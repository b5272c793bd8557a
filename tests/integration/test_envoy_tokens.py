"""End to end through a real Envoy: token locations, forward_token, claim rendering, header
checks, and the dynamic metadata Envoy receives. Complements test_envoy_e2e.py with a provider
that reads tokens from a header, a cookie and a query parameter and never forwards them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from ext_authz import jws
from tests.support.echo import EchoBackend
from tests.support.envoy import AUTHZ_METADATA_HEADER, Exchange, Gateway, start_envoy
from tests.support.idp import TestIssuer, b64url
from tests.support.processes import ExtAuthzProcess, start_ext_authz


@pytest.fixture(scope="module")
def issuer() -> Iterator[TestIssuer]:
    with TestIssuer(audience="api") as running:
        yield running


@pytest.fixture(scope="module")
def authz(issuer: TestIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExtAuthzProcess]:
    config: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "providers": [
            {
                "name": "locations",
                "issuer": issuer.url,
                "audiences": ["api"],
                "jwks_uri": issuer.jwks_uri,
                "from_cookies": ["session"],
                "from_params": ["access_token"],
                "forward_token": False,
                "claim_to_headers": [
                    {"header": "x-user-id", "claim": "sub"},
                    {"header": "x-level", "claim": "level"},
                    {"header": "x-admin", "claim": "admin"},
                    {"header": "x-roles", "claim": "realm_access.roles"},
                    {"header": "x-tenant", "claim": '["https://example.com/tenant"]'},
                    {"header": "x-note", "claim": "note"},
                ],
            }
        ],
    }
    file = tmp_path_factory.mktemp("tokens") / "ext-authz.yaml"
    file.write_text(yaml.safe_dump(config))
    with start_ext_authz(file) as server:
        yield server


@pytest.fixture(scope="module", params=[False, True], ids=["headers", "raw-headers"])
def gateway(request: pytest.FixtureRequest, issuer: TestIssuer, authz: ExtAuthzProcess) -> Iterator[Gateway]:
    with (
        EchoBackend() as echo,
        start_envoy(authz.address, echo.port, encode_raw_headers=request.param) as envoy,
    ):
        yield Gateway(envoy, echo, issuer, authz, request.param)


def seen(exchange: Exchange) -> dict[str, list[str]]:
    assert exchange.response.status == 200, exchange.describe()
    assert exchange.backend is not None, exchange.describe()
    return exchange.backend.headers


def challenge_error(exchange: Exchange) -> str | None:
    value = exchange.response.header("www-authenticate") or ""
    for part in value.split(", "):
        if part.startswith('error="'):
            return part[len('error="') : -1]
    return None


def test_claims_rendered_and_unsafe_values_left_out(gateway: Gateway) -> None:
    token = gateway.issuer.mint(
        {
            "level": 3,
            "admin": True,
            "realm_access": {"roles": ["reader", "writer"]},
            "https://example.com/tenant": "t-1",
            "note": "hello\r\nx-injected: 1",
        }
    )
    headers = seen(gateway.get("/orders", [("x-note", "forged")], token=token))
    assert headers["x-user-id"] == ["alice"]
    assert headers["x-level"] == ["3"]
    assert headers["x-admin"] == ["true"]
    assert headers["x-roles"] == ["reader,writer"]
    assert headers["x-tenant"] == ["t-1"]
    # The unsafe value is not emitted, the decision stands, and the client's copy is removed.
    assert "x-note" not in headers
    assert "x-injected" not in headers


def test_token_from_header_is_not_forwarded(gateway: Gateway) -> None:
    headers = seen(gateway.get("/orders", token=gateway.issuer.mint()))
    assert "authorization" not in headers
    assert headers["x-user-id"] == ["alice"]


def test_token_from_cookie_is_stripped_other_cookies_kept(gateway: Gateway) -> None:
    token = gateway.issuer.mint()
    exchange = gateway.get("/orders", [("Cookie", f"theme=dark; session={token}; lang=en")])
    headers = seen(exchange)
    assert headers["x-user-id"] == ["alice"]
    cookies = ";".join(headers.get("cookie", []))
    assert token not in cookies
    assert "theme=dark" in cookies and "lang=en" in cookies


def test_token_from_query_parameter_is_removed(gateway: Gateway) -> None:
    token = gateway.issuer.mint()
    exchange = gateway.get(f"/orders?page=2&access_token={token}")
    assert seen(exchange)["x-user-id"] == ["alice"]
    assert exchange.backend is not None
    assert exchange.backend["path"] == "/orders?page=2"


def test_different_tokens_in_header_and_query_are_400(gateway: Gateway) -> None:
    exchange = gateway.get(
        f"/orders?access_token={gateway.issuer.mint()}", token=gateway.issuer.mint({"sub": "bob"})
    )
    assert exchange.response.status == 400, exchange.describe()
    assert challenge_error(exchange) == "invalid_request"
    assert exchange.backend is None


def test_same_token_by_two_rfc6750_methods_is_400_but_a_cookie_is_not_a_method(gateway: Gateway) -> None:
    same = gateway.issuer.mint()
    exchange = gateway.get(f"/orders?access_token={same}", token=same)
    assert exchange.response.status == 400, exchange.describe()
    assert challenge_error(exchange) == "invalid_request"
    assert exchange.response.json()["error_description"] == "the token is sent by more than one method"
    assert exchange.backend is None
    assert same not in exchange.response.body.decode()
    # RFC 6750 §2 names the header, the form body and the query; a cookie is none of them.
    assert seen(gateway.get("/orders", [("Cookie", f"session={same}")], token=same))["x-user-id"] == ["alice"]
    cookie_and_query = gateway.get(f"/orders?access_token={same}", [("Cookie", f"session={same}")])
    assert seen(cookie_and_query)["x-user-id"] == ["alice"]


def signed_with_header(issuer: TestIssuer, header: dict[str, Any]) -> str:
    """A token validly signed over its encoded payload, with these header members as given
    (PyJWT would drop `b64: true` and detach the payload for `b64: false`)."""
    key = issuer.key()
    head = json.dumps({"alg": key.alg, "kid": key.kid, "typ": "JWT", **header}).encode()
    return jws.sign(head, json.dumps(issuer.claims()).encode(), key.private_key, key.alg)


@pytest.mark.parametrize(
    ("case", "header", "description"),
    [
        ("crit", {"crit": ["exp"], "exp": 1}, "critical"),
        ("typ", {"typ": "JOSE+JSON"}, "type"),
        # RFC 7797 is not implemented: b64 is refused, crit or not, even when validly signed.
        ("b64-true", {"b64": True}, "b64"),
        ("b64-false", {"b64": False}, "b64"),
        ("b64-with-crit", {"b64": False, "crit": ["b64"]}, "b64"),
    ],
)
def test_header_checks_through_envoy(
    gateway: Gateway, case: str, header: dict[str, Any], description: str
) -> None:
    exchange = gateway.get("/orders", token=signed_with_header(gateway.issuer, header))
    assert exchange.response.status == 401, exchange.describe()
    assert challenge_error(exchange) == "invalid_token"
    assert description in (exchange.response.header("www-authenticate") or "")


def test_jwe_and_oversized_tokens_are_invalid(gateway: Gateway) -> None:
    jwe = ".".join(
        b64url(json.dumps(p).encode()) for p in ({"alg": "RSA-OAEP", "enc": "A256GCM"}, {}, {}, {}, {})
    )
    exchange = gateway.get("/orders", token=jwe)
    assert exchange.response.status == 401, exchange.describe()
    assert "encrypted" in exchange.response.json()["error_description"]
    huge = gateway.issuer.mint({"pad": "x" * 20_000})
    exchange = gateway.get("/orders", token=huge)
    assert exchange.response.status == 401, exchange.describe()
    assert exchange.response.json()["error_description"] == "the token is too large"


def test_decision_metadata_reaches_envoy(gateway: Gateway) -> None:
    headers = seen(gateway.get("/orders", token=gateway.issuer.mint()))
    assert headers[AUTHZ_METADATA_HEADER] == ["provider=locations rule=default"]
