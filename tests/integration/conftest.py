"""Fixtures for end-to-end tests: test issuer, echo backend, the real ext-authz, the real Envoy.

The issuer, the backend and the ext-authz process start once per session; Envoy starts once
per header-encoding mode (`encode_raw_headers` false and true), and every test using `gateway`
runs under both. Every process started here is stopped in the fixture's teardown.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.echo import EchoBackend
from tests.support.envoy import Gateway, start_envoy
from tests.support.idp import TestIssuer
from tests.support.processes import ExtAuthzProcess, start_ext_authz

AUDIENCE = "api"


@pytest.fixture(scope="session")
def issuer() -> Iterator[TestIssuer]:
    """RS256 (the signing default), plus one ES256 and one EdDSA key, all published up front."""
    test_issuer = TestIssuer(audience=AUDIENCE)
    test_issuer.add_key("ES256", kid="ec-1")
    test_issuer.add_key("EdDSA", kid="ed-1")
    with test_issuer:
        yield test_issuer


@pytest.fixture(scope="session")
def echo() -> Iterator[EchoBackend]:
    with EchoBackend() as backend:
        yield backend


def ext_authz_config(issuer_url: str) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "providers": [
            {
                "name": "test",
                # Exactly as the discovery document states it; no jwks_uri: OIDC discovery.
                "issuer": issuer_url,
                "audiences": [AUDIENCE],
                "claim_to_headers": [
                    {"header": "x-user-id", "claim": "sub"},
                    {"header": "x-user-email", "claim": "email"},
                    {"header": "x-user-groups", "claim": "groups"},
                ],
                "payload_header": "x-jwt-payload",
            }
        ],
        "rules": [
            {"match": {"paths": ["/public/*"]}, "allow": "anonymous"},
            {
                "match": {"paths": ["/admin/*"], "methods": ["POST", "PUT", "DELETE"]},
                "require": {"scopes": ["admin"]},
            },
            {"match": {"paths": ["/*"]}, "require": {}},
        ],
    }


@pytest.fixture(scope="session")
def ext_authz_config_file(issuer: TestIssuer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ext-authz") / "ext-authz.yaml"
    path.write_text(yaml.safe_dump(ext_authz_config(issuer.url), sort_keys=False))
    return path


@pytest.fixture(scope="session")
def authz_server(ext_authz_config_file: Path) -> Iterator[ExtAuthzProcess]:
    with start_ext_authz(ext_authz_config_file) as server:
        yield server


@pytest.fixture(scope="module", params=[False, True], ids=["headers", "raw-headers"])
def gateway(
    request: pytest.FixtureRequest,
    issuer: TestIssuer,
    echo: EchoBackend,
    authz_server: ExtAuthzProcess,
) -> Iterator[Gateway]:
    encode_raw_headers: bool = request.param
    with start_envoy(authz_server.address, echo.port, encode_raw_headers=encode_raw_headers) as envoy:
        yield Gateway(envoy, echo, issuer, authz_server, encode_raw_headers)
        authz_server.process.check_alive()
