"""One answer everywhere: the same requests through every gateway ext-authz serves — Envoy over
gRPC, Envoy's HTTP ext_authz (``http_service``), nginx ``auth_request`` and Caddy
``forward_auth`` (real binaries) — get the same status, and the backend the same identity headers.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from tests.support.echo import EchoBackend
from tests.support.envoy import TRACE_HEADER, send, start_envoy
from tests.support.gateways import (
    GATEWAY_AUDIENCE,
    GATEWAY_IDENTITY,
    gateway_authz_config,
    http_listener_address,
    start_caddy,
    start_nginx,
)
from tests.support.idp import TestIssuer
from tests.support.processes import start_ext_authz

AUDIENCE = GATEWAY_AUDIENCE
IDENTITY = GATEWAY_IDENTITY
COMPARED = (*IDENTITY, "cookie")  # and the client's other cookies, as they were


def config(issuer: str) -> dict[str, Any]:
    return gateway_authz_config(issuer)


@dataclass(frozen=True, slots=True)
class Seen:
    status: int
    identity: dict[str, list[str]]  # what reached the backend, None-free; {} when it was not reached
    reached: bool
    challenge: str | None


@dataclass
class Gateways:
    issuer: TestIssuer
    echo: EchoBackend
    urls: dict[str, str]

    def send(self, gateway: str, path: str, headers: list[tuple[str, str]]) -> Seen:
        trace = uuid.uuid4().hex
        response = send(self.urls[gateway], "GET", path, [(TRACE_HEADER, trace), *headers])
        reached = [r for r in self.echo.requests if r.header_values(TRACE_HEADER) == [trace]]
        identity = {}
        if reached:
            identity = {
                name: reached[0].header_values(name) for name in IDENTITY if reached[0].header_values(name)
            }
        return Seen(response.status, identity, bool(reached), response.header("www-authenticate"))


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateways]:
    directory = tmp_path_factory.mktemp("gateways")
    with contextlib.ExitStack() as stack:
        issuer = stack.enter_context(TestIssuer(audience=AUDIENCE))
        echo = stack.enter_context(EchoBackend())
        path = directory / "ext-authz.yaml"
        path.write_text(yaml.safe_dump(config(issuer.url), sort_keys=False))
        authz = stack.enter_context(start_ext_authz(path))
        http = http_listener_address(authz)
        urls = {
            "envoy-grpc": stack.enter_context(start_envoy(authz.address, echo.port)).base_url,
            "envoy-http": stack.enter_context(start_envoy(http, echo.port, http_service=True)).base_url,
            "nginx": stack.enter_context(start_nginx(http, echo.port, identity_headers=IDENTITY)).base_url,
            "caddy": stack.enter_context(start_caddy(http, echo.port, identity_headers=IDENTITY)).base_url,
        }
        yield Gateways(issuer, echo, urls)
        authz.process.check_alive()


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


CASES: dict[str, tuple[str, Callable[[TestIssuer], list[tuple[str, str]]]]] = {
    "valid token": ("/orders", lambda i: bearer(i.mint({"email": "a@example.com", "groups": ["g1", "g2"]}))),
    "expired token": ("/orders", lambda i: bearer(i.mint(ttl=-600))),
    "no token": ("/orders", lambda i: []),
    "missing scope": ("/admin/users", lambda i: bearer(i.mint({"scope": "read"}))),
    "forged identity, anonymous route": (
        "/public/x",
        lambda i: [("X-User-Id", "admin"), ("X-User-Groups", "admins"), ("X-Jwt-Payload", "e30")],
    ),
    "forged identity beside a valid token": (
        "/orders",
        lambda i: [*bearer(i.mint({"groups": ["g1"]})), ("X-User-Id", "admin"), ("X-User-Email", "forged@x")],
    ),
    "anonymous route": ("/public/page", lambda i: []),
    "traversal to a token route": ("/public/../orders", lambda i: []),
    "no rule": ("/elsewhere", lambda i: bearer(i.mint())),
    "cookies pass untouched": ("/orders", lambda i: [*bearer(i.mint()), ("Cookie", "theme=dark; lang=en")]),
}
GATEWAYS = ("envoy-http", "nginx", "caddy")


@pytest.mark.parametrize("case", list(CASES))
def test_one_answer_everywhere(gateways: Gateways, case: str) -> None:
    path, headers_of = CASES[case]
    headers = headers_of(gateways.issuer)
    reference = gateways.send("envoy-grpc", path, headers)
    for gateway in GATEWAYS:
        seen = gateways.send(gateway, path, headers)
        assert seen.status == reference.status, f"{case} through {gateway}: {seen} vs {reference}"
        assert seen.reached == reference.reached, f"{case} through {gateway}"
        assert seen.identity == reference.identity, f"{case} through {gateway}: {seen} vs {reference}"
        if reference.status == 401:
            assert seen.challenge == reference.challenge, f"{case} through {gateway}"


def test_the_reference_answers_are_the_right_ones(gateways: Gateways) -> None:
    expected = {
        "valid token": 200,
        "expired token": 401,
        "no token": 401,
        "missing scope": 403,
        "forged identity, anonymous route": 200,
        "forged identity beside a valid token": 200,
        "anonymous route": 200,
        "traversal to a token route": 401,
        "no rule": 403,
        "cookies pass untouched": 200,
    }
    for case, status in expected.items():
        path, headers_of = CASES[case]
        seen = gateways.send("envoy-grpc", path, headers_of(gateways.issuer))
        assert seen.status == status, case
    forged = gateways.send(
        "envoy-grpc", "/public/x", CASES["forged identity, anonymous route"][1](gateways.issuer)
    )
    assert forged.identity == {}
    valid = gateways.send("envoy-grpc", "/orders", CASES["valid token"][1](gateways.issuer))
    assert valid.identity["x-user-id"] == ["alice"] and valid.identity["x-user-groups"] == ["g1,g2"]
