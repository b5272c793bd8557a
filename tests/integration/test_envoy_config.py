"""The Envoy configs we ship and generate are accepted by the real Envoy, and fail closed.

`envoy --mode validate` parses the whole bootstrap, resolves every typed extension and checks
proto constraints, without binding a port or connecting anywhere.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.echo import EchoBackend
from tests.support.envoy import send, start_envoy, validate_config, write_envoy_config

REPO_ROOT = Path(__file__).resolve().parents[2]
ENVOY_YAML = REPO_ROOT / "envoy.yaml"


def _assert_valid(path: Path) -> None:
    result = validate_config(path)
    assert result.returncode == 0, f"envoy rejected {path}:\n{result.stdout}\n{result.stderr}"
    assert "OK" in result.stdout + result.stderr


def test_repository_envoy_yaml_validates() -> None:
    _assert_valid(ENVOY_YAML)


@pytest.mark.parametrize("encode_raw_headers", [False, True], ids=["headers", "raw-headers"])
def test_generated_test_config_validates(tmp_path: Path, encode_raw_headers: bool) -> None:
    path = write_envoy_config(
        tmp_path / "envoy.yaml", "127.0.0.1:9001", 8080, encode_raw_headers=encode_raw_headers
    )

    _assert_valid(path)


def test_validation_rejects_a_broken_config(tmp_path: Path) -> None:
    # Guards the two tests above against a validate mode that accepts anything.
    config = yaml.safe_load(ENVOY_YAML.read_text())
    _ext_authz_filter(config)["typed_config"]["failure_mode_alow"] = False
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(config))

    assert validate_config(path).returncode != 0


def _ext_authz_filter(config: dict[str, Any]) -> dict[str, Any]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters: list[dict[str, Any]] = hcm["http_filters"]
    assert [f["name"] for f in filters] == ["envoy.filters.http.ext_authz", "envoy.filters.http.router"]
    return filters[0]


def test_repository_envoy_yaml_fails_closed() -> None:
    """The settings the comments in envoy.yaml promise, so an edit cannot drop them silently."""
    config = yaml.safe_load(ENVOY_YAML.read_text())
    authz = _ext_authz_filter(config)["typed_config"]

    assert authz["transport_api_version"] == "V3"
    assert authz["failure_mode_allow"] is False
    assert authz["status_on_error"] == {"code": "ServiceUnavailable"}
    assert authz["grpc_service"]["timeout"] == "0.25s"
    assert authz["clear_route_cache"] is False
    assert "with_request_body" not in authz
    assert authz["decoder_header_mutation_rules"].get("allow_all_routing", False) is False
    assert authz["decoder_header_mutation_rules"].get("allow_envoy", False) is False
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def _unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_unreachable_authorizer_is_503_and_backend_not_reached() -> None:
    """failure_mode_allow false + status_on_error 503, observed with the real Envoy."""
    with EchoBackend() as echo, start_envoy(f"127.0.0.1:{_unused_port()}", echo.port) as envoy:
        response = send(envoy.base_url, "GET", "/orders", [("authorization", "Bearer x.y.z")])

        assert response.status == 503, response.describe()
        assert echo.requests == []
        assert envoy.stats("http.ingress_http.ext_authz.").get("http.ingress_http.ext_authz.error") == 1
