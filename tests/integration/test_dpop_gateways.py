"""DPoP through the HTTP gateways as deploy/ configures them (Envoy http_service, nginx
auth_request, Caddy forward_auth; real binaries): a valid proof passes and never reaches the
backend, a server nonce reaches the client on 401 use_dpop_nonce, and a forged X-Forwarded-Proto
cannot move a proof's htu."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.dpop import DPoPKey
from tests.support.echo import EchoBackend
from tests.support.envoy import EnvoyProcess, start_envoy
from tests.support.envoy import send as envoy_send
from tests.support.gateways import Response, http_listener_address, start_caddy, start_nginx
from tests.support.idp import TestIssuer
from tests.support.processes import start_ext_authz

IDENTITY = ("x-user-id",)


@contextlib.contextmanager
def dpop_gateway(
    tmp_path: Path, gateway: str, *, nonce: bool
) -> Iterator[tuple[Any, EchoBackend, TestIssuer]]:
    with contextlib.ExitStack() as stack:
        issuer = stack.enter_context(TestIssuer(audience="api"))
        echo = stack.enter_context(EchoBackend())
        document: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "listen_http": "127.0.0.1:0",
            "providers": [
                {
                    "name": "bank",
                    "issuer": issuer.url,
                    "audiences": ["api"],
                    "jwks_uri": issuer.jwks_uri,
                    "dpop": "required",
                    "dpop_nonce": nonce,
                    "claim_to_headers": [{"header": "x-user-id", "claim": "sub"}],
                }
            ],
            "rules": [{"match": {"paths": ["/*"]}, "require": {}}],
        }
        path = tmp_path / "ext-authz.yaml"
        path.write_text(yaml.safe_dump(document))
        authz = stack.enter_context(start_ext_authz(path))
        http = http_listener_address(authz)
        if gateway == "envoy-http":
            proxy: Any = stack.enter_context(start_envoy(http, echo.port, http_service=True))
        elif gateway == "nginx":
            proxy = stack.enter_context(start_nginx(http, echo.port, identity_headers=IDENTITY))
        else:
            proxy = stack.enter_context(start_caddy(http, echo.port, identity_headers=IDENTITY))
        yield proxy, echo, issuer


def send(proxy: Any, path: str, headers: list[tuple[str, str]]) -> Response:
    if isinstance(proxy, EnvoyProcess):
        answer = envoy_send(proxy.base_url, "GET", path, headers)
        return Response(answer.status, answer.headers, answer.body)
    response: Response = proxy.request(path, headers)
    return response


def url(proxy: Any, path: str) -> str:
    return f"http://127.0.0.1:{proxy.port}{path}"


@pytest.mark.parametrize("gateway", ["envoy-http", "nginx", "caddy"])
def test_dpop_through_the_gateway(tmp_path: Path, gateway: str) -> None:
    with dpop_gateway(tmp_path, gateway, nonce=False) as (proxy, echo, issuer):
        holder = DPoPKey()
        token = issuer.mint({"sub": "alice", "cnf": {"jkt": holder.thumbprint}})
        proof = holder.proof("GET", url(proxy, "/orders"), token)
        ok = send(proxy, "/orders", [("Authorization", f"DPoP {token}"), ("DPoP", proof)])
        assert ok.status == 200, ok.describe()
        seen = echo.requests[-1]
        assert seen.header_values("x-user-id") == ["alice"]
        assert seen.header_values("dpop") == [], "the proof reached the backend"
        # The same proof again: a replay.
        again = send(proxy, "/orders", [("Authorization", f"DPoP {token}"), ("DPoP", proof)])
        assert again.status == 401, again.describe()
        assert (again.header("www-authenticate") or "").startswith("DPoP ")
        # A forged X-Forwarded-Proto that would end the URL early and move the htu elsewhere.
        moved = holder.proof("GET", url(proxy, "/orders"), token)
        forged = send(
            proxy,
            "/admin/delete",
            [
                ("Authorization", f"DPoP {token}"),
                ("DPoP", moved),
                ("X-Forwarded-Proto", f"{url(proxy, '/orders')}#"),
            ],
        )
        assert forged.status in (400, 401), forged.describe()


@pytest.mark.parametrize("gateway", ["envoy-http", "nginx", "caddy"])
def test_the_server_nonce_reaches_the_client(tmp_path: Path, gateway: str) -> None:
    with dpop_gateway(tmp_path, gateway, nonce=True) as (proxy, _echo, issuer):
        holder = DPoPKey()
        token = issuer.mint({"sub": "alice", "cnf": {"jkt": holder.thumbprint}})
        first = send(
            proxy,
            "/orders",
            [("Authorization", f"DPoP {token}"), ("DPoP", holder.proof("GET", url(proxy, "/orders"), token))],
        )
        assert first.status == 401, first.describe()
        assert 'error="use_dpop_nonce"' in (first.header("www-authenticate") or ""), first.describe()
        nonce = first.header("dpop-nonce")
        assert nonce, first.describe()
        proof = holder.proof("GET", url(proxy, "/orders"), token, nonce=nonce)
        retry = send(proxy, "/orders", [("Authorization", f"DPoP {token}"), ("DPoP", proof)])
        assert retry.status == 200, retry.describe()
