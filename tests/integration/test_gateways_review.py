"""Review: attacks through the shipped nginx.conf and Caddyfile against ext-authz's HTTP listener
(real binaries, real ext-authz process, echo backend)."""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from tests.support.echo import EchoBackend, EchoRequest
from tests.support.gateways import (
    GATEWAY_AUDIENCE,
    GATEWAY_IDENTITY,
    GatewayProcess,
    gateway_authz_config,
    http_listener_address,
    start_caddy,
    start_nginx,
)
from tests.support.idp import TestIssuer
from tests.support.processes import start_ext_authz

AUDIENCE = GATEWAY_AUDIENCE
IDENTITY = GATEWAY_IDENTITY
TRACE = "x-review-trace"


def config(issuer: str) -> dict[str, Any]:
    return gateway_authz_config(issuer, admin_rule=False)


@dataclass
class Stack:
    issuer: TestIssuer
    echo: EchoBackend
    nginx: GatewayProcess
    caddy: GatewayProcess

    def raw(self, gateway: str, request: bytes) -> tuple[bytes, list[EchoRequest]]:
        """Send raw bytes (one trace id substituted for {trace}); the answer and what the backend saw."""
        trace = uuid.uuid4().hex
        port = getattr(self, gateway).port
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(request.replace(b"{trace}", trace.encode()))
            chunks = []
            with contextlib.suppress(TimeoutError):
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
        reached = [r for r in self.echo.requests if r.header_values(TRACE) == [trace]]
        return b"".join(chunks), reached


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("gateways-review")
    with contextlib.ExitStack() as stack:
        issuer = stack.enter_context(TestIssuer(audience=AUDIENCE))
        echo = stack.enter_context(EchoBackend())
        path = directory / "ext-authz.yaml"
        path.write_text(yaml.safe_dump(config(issuer.url), sort_keys=False))
        authz = stack.enter_context(start_ext_authz(path))
        http = http_listener_address(authz)
        nginx = stack.enter_context(start_nginx(http, echo.port, identity_headers=IDENTITY))
        caddy = stack.enter_context(start_caddy(http, echo.port, identity_headers=IDENTITY))
        yield Stack(issuer, echo, nginx, caddy)
        authz.process.check_alive()


def get(target: str, *headers: str) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: app", f"{TRACE}: {{trace}}", *headers, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def identity_seen(reached: list[EchoRequest]) -> dict[str, list[str]]:
    """Every header the backend got whose name is an identity header in any spelling."""
    assert reached, "the backend was not reached"
    return {name: values for name, values in reached[0].headers.items() if name.replace("_", "-") in IDENTITY}


# ---- forged identity past the shipped configs ----


@pytest.mark.parametrize("gateway", ["nginx", "caddy"])
def test_underscore_spellings_of_identity_headers_never_reach_the_backend(stack: Stack, gateway: str) -> None:
    # ATTACK (outside review; fixed) through Caddy (and, by the same config shape, Traefik's
    # dynamic.yml): the Caddyfile deletes only X-User-Id etc.; X_User_Id / X-User_Email pass to
    # the backend, where WSGI/CGI/PHP/Django-style servers read them as HTTP_X_USER_ID, the
    # very identity header. nginx drops them (underscores_in_headers off); ext-authz's Envoy
    # answers list the underscore spellings in x-envoy-auth-headers-to-remove.
    answer, reached = stack.raw(
        gateway, get("/public/x", "X_User_Id: admin", "X-User_Email: forged@x", "x_jwt_payload: e30")
    )
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert identity_seen(reached) == {}


@pytest.mark.parametrize("gateway", ["nginx", "caddy"])
def test_case_variants_and_repeats_of_identity_headers_are_cleared(stack: Stack, gateway: str) -> None:
    _, reached = stack.raw(
        gateway, get("/public/x", "x-user-id: admin", "X-USER-ID: admin2", "X-User-Id: a3")
    )
    assert identity_seen(reached) == {}
    token = stack.issuer.mint({"email": "a@example.com"})
    _, reached = stack.raw(
        gateway, get("/orders", f"Authorization: Bearer {token}", "X-USER-ID: admin", "x-user-groups: admins")
    )
    seen = identity_seen(reached)
    assert seen["x-user-id"] == ["alice"] and seen["x-user-email"] == ["a@example.com"]
    assert "x-user-groups" not in seen  # the token has none: the forged one is gone


# ---- the path judged vs the path served ----


def test_a_fragment_in_the_request_target_through_nginx(stack: Stack) -> None:
    # ATTACK (outside review; fixed). nginx sends X-Original-URI: /public/x#/../../orders (and proxies
    # exactly that target to the backend); the nginx dialect cuts at "#" and judges /public/x
    # (anonymous). A backend resolving dot segments in that raw path (Go http.FileServer) serves
    # /orders without a token.
    answer, reached = stack.raw("nginx", get("/public/x#/../../orders"))
    served = [r["path"] for r in reached]
    assert not any("#" in path for path in served), (answer[:40], served)


@pytest.mark.parametrize("gateway", ["nginx", "caddy"])
def test_a_client_original_uri_header_is_not_believed(stack: Stack, gateway: str) -> None:
    answer, reached = stack.raw(
        gateway,
        get("/orders", "X-Original-URI: /public/x", "X-Forwarded-Uri: /public/x", "X-Original-Method: GET"),
    )
    assert answer.startswith(b"HTTP/1.1 401 ") and not reached


@pytest.mark.parametrize("gateway", ["nginx", "caddy"])
def test_absolute_form_and_traversal_targets_are_judged_as_served(stack: Stack, gateway: str) -> None:
    for target in ("http://other/orders", "/public/../orders", "/public/%2e%2e/orders"):
        answer, reached = stack.raw(gateway, get(target))
        assert answer.startswith((b"HTTP/1.1 401 ", b"HTTP/1.1 400 ")) and not reached, (gateway, target)


@pytest.mark.parametrize("gateway", ["nginx", "caddy"])
def test_head_then_a_pipelined_request_stays_in_step(stack: Stack, gateway: str) -> None:
    head = b"HEAD /public/x HTTP/1.1\r\nHost: app\r\nx-review-trace: {trace}\r\n\r\n"
    answer, _ = stack.raw(gateway, head + get("/orders"))
    statuses = [line[:12] for line in answer.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]
    assert statuses == [b"HTTP/1.1 200", b"HTTP/1.1 401"]


def test_cl_and_te_together_are_refused_by_nginx(stack: Stack) -> None:
    answer, reached = stack.raw("nginx", get("/public/x", "Content-Length: 5", "Transfer-Encoding: chunked"))
    assert answer.startswith(b"HTTP/1.1 400 ") and not reached
