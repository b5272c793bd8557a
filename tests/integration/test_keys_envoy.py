"""Key rotation as a client sees it: client -> real Envoy -> real ext-authz -> echo backend.

The issuer starts signing with a new key while ext-authz runs: the first request with the new
`kid` goes through with no restart, and once the old key is unpublished and a refresh has
passed, requests signed with it get 401 `invalid_token` from Envoy.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.authz import REFRESH, AuthzClient, config, fast, provider, write_config
from tests.support.echo import EchoBackend
from tests.support.envoy import TRACE_HEADER, EnvoyProcess, HttpResponse, send, start_envoy
from tests.support.idp import JWKS_PATH, TestIssuer
from tests.support.processes import ExtAuthzProcess, start_ext_authz

_ERROR_PARAM = re.compile(r'error="([^"]*)"')


class Stack:
    def __init__(self, issuer: TestIssuer, echo: EchoBackend, authz: ExtAuthzProcess, envoy: EnvoyProcess):
        self.issuer = issuer
        self.echo = echo
        self.authz = authz
        self.envoy = envoy

    def get(self, token: str) -> tuple[HttpResponse, bool]:
        """GET /orders with the token; the response and whether the backend saw the request."""
        trace = uuid.uuid4().hex
        response = send(
            self.envoy.base_url,
            "GET",
            "/orders",
            [(TRACE_HEADER, trace), ("Authorization", f"Bearer {token}")],
        )
        reached = any(r.header_values(TRACE_HEADER) == [trace] for r in self.echo.requests)
        return response, reached

    def describe(self, response: HttpResponse) -> str:
        return (
            f"{response.describe()}\n--- ext-authz log ---\n{self.authz.process.tail(40)}"
            f"\n--- envoy log ---\n{self.envoy.process.tail(10)}"
        )


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with TestIssuer() as issuer, EchoBackend() as echo:
        document = config(provider(issuer, **fast(refresh_interval_seconds=REFRESH)))
        with start_ext_authz(write_config(tmp_path, document)) as authz:
            client = AuthzClient(authz.address)
            try:
                client.wait_serving()
            finally:
                client.close()
            with start_envoy(authz.address, echo.port) as envoy:
                yield Stack(issuer, echo, authz, envoy)
                authz.process.check_alive()


def test_rotation_through_envoy(stack: Stack) -> None:
    issuer = stack.issuer
    old_kid = issuer.default_kid
    old_token = issuer.mint()
    response, reached = stack.get(old_token)
    assert response.status == 200 and reached, stack.describe(response)

    # Rotate right after a routine refresh: the new kid can only be learnt by a refetch.
    issuer.wait_for_count(JWKS_PATH, issuer.request_count(JWKS_PATH) + 1, timeout=REFRESH + 2)
    time.sleep(0.2)
    new_kid = issuer.rotate()
    new_token = issuer.mint(kid=new_kid)
    response, reached = stack.get(new_token)
    assert response.status == 200 and reached, stack.describe(response)

    issuer.remove_key(old_kid)
    issuer.wait_for_count(JWKS_PATH, issuer.request_count(JWKS_PATH) + 1, timeout=REFRESH + 2)
    deadline = time.monotonic() + 2
    while True:
        response, reached = stack.get(old_token)
        if response.status != 200:
            break
        assert time.monotonic() < deadline, "the removed key is still accepted after a refresh"
        time.sleep(0.05)
    assert response.status == 401, stack.describe(response)
    assert not reached, stack.describe(response)
    challenge = response.header("www-authenticate") or ""
    assert challenge.startswith("Bearer "), stack.describe(response)
    assert _ERROR_PARAM.findall(challenge) == ["invalid_token"], stack.describe(response)

    response, reached = stack.get(new_token)
    assert response.status == 200 and reached, stack.describe(response)
    response, reached = stack.get(issuer.mint())  # the new key is the signing default now
    assert response.status == 200 and reached, stack.describe(response)
