"""Envoy bootstrap configs for the benchmark scenarios, and a running Envoy (``--concurrency 1``).

Every scenario answers with a ``direct_response`` route, so no backend is involved: what is
measured is Envoy plus whatever checks the request before the router (nothing, jwt_authn, or the
ext_authz filter calling a gRPC authorizer). The HTTP connection manager is set as envoy.yaml sets
it (path normalisation, underscore headers dropped); no access log.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from ext_authz.dev.plan import envoy_binary
from tests.bench.procs import BenchError, BenchProcess

LISTENER = "bench"
AUTHZ_CLUSTER = "ext_authz"
READY_TIMEOUT = 30.0

_ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}


def _hcm(filters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "bench",
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
        "common_http_protocol_options": {"headers_with_underscores_action": "DROP_HEADER"},
        "route_config": {
            "name": "bench",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
                        }
                    ],
                }
            ],
        },
        "http_filters": [*filters, _ROUTER],
    }


def _bootstrap(filters: list[dict[str, Any]], clusters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": LISTENER,
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": _hcm(filters),
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }


def direct_response() -> dict[str, Any]:
    """E0: Envoy answers by itself; the ceiling of this machine."""
    return _bootstrap([], [])


def jwt_authn(issuer: str, audience: str, jwks: dict[str, Any]) -> dict[str, Any]:
    """E1: Envoy's own JWT filter with inline keys and its verified-token cache."""
    config = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {
            "idp": {
                "issuer": issuer,
                "audiences": [audience],
                "local_jwks": {"inline_string": json.dumps(jwks)},
                "forward": True,
                "jwt_cache_config": {"jwt_cache_size": 100},
                "claim_to_headers": [{"header_name": "x-user-id", "claim_name": "sub"}],
            }
        },
        "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "idp"}}],
    }
    return _bootstrap([{"name": "envoy.filters.http.jwt_authn", "typed_config": config}], [])


def _authz_cluster(host: str, port: int) -> dict[str, Any]:
    """The authorizer's cluster: one static endpoint."""
    address = {"socket_address": {"address": host.strip("[]"), "port_value": port}}
    return {
        "name": AUTHZ_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": AUTHZ_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }


def ext_authz(authz_address: str, *, max_concurrent_streams: int | None = None) -> dict[str, Any]:
    """E2 and X*: the ext_authz gRPC filter as envoy.yaml sets it, calling ``authz_address``.

    ``max_concurrent_streams`` caps the Check calls in flight on one HTTP/2 connection to the
    authorizer, so that Envoy opens several connections (which SO_REUSEPORT spreads over workers).
    """
    host, _, port = authz_address.rpartition(":")
    filter_config = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3",
        "grpc_service": {"envoy_grpc": {"cluster_name": AUTHZ_CLUSTER}, "timeout": "1s"},
        "failure_mode_allow": False,
        "status_on_error": {"code": "ServiceUnavailable"},
        "clear_route_cache": False,
        "decoder_header_mutation_rules": {"disallow_system": True},
    }
    http2: dict[str, Any] = {}
    if max_concurrent_streams is not None:
        http2["max_concurrent_streams"] = max_concurrent_streams
    cluster = _authz_cluster(host, int(port))
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": http2},
        }
    }
    return _bootstrap([{"name": "envoy.filters.http.ext_authz", "typed_config": filter_config}], [cluster])


def ext_authz_http(authz_http: str) -> dict[str, Any]:
    """H1: the ext_authz filter in HTTP mode (``http_service``) calling ext-authz's HTTP listener,
    with the header lists of the README's Gateways section."""
    host, _, port = authz_http.rpartition(":")
    filter_config = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "http_service": {
            "server_uri": {"uri": f"http://{authz_http}", "cluster": AUTHZ_CLUSTER, "timeout": "1s"},
            "path_prefix": "/envoy",
            "authorization_response": {
                "allowed_upstream_headers": {"patterns": [{"prefix": "x-user-"}, {"exact": "x-jwt-payload"}]},
                "allowed_client_headers": {
                    "patterns": [{"exact": "www-authenticate"}, {"exact": "content-type"}]
                },
            },
        },
        "failure_mode_allow": False,
        "status_on_error": {"code": "ServiceUnavailable"},
        "clear_route_cache": False,
        "decoder_header_mutation_rules": {"disallow_system": True},
    }
    cluster = _authz_cluster(host, int(port))  # HTTP/1.1
    return _bootstrap([{"name": "envoy.filters.http.ext_authz", "typed_config": filter_config}], [cluster])


class BenchEnvoy:
    """A running Envoy with one worker thread; ``url`` is its listener."""

    def __init__(self, process: BenchProcess, admin: str, port: int) -> None:
        self.process = process
        self.admin = admin
        self.port = port

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self, prefix: str) -> dict[str, int]:
        body = _get(f"http://{self.admin}/stats?format=json&filter=^{prefix}")
        values: dict[str, int] = {}
        for stat in json.loads(body).get("stats", []):
            if "name" in stat and isinstance(stat.get("value"), int):
                values[stat["name"]] = stat["value"]
        return values

    def stop(self) -> None:
        self.process.stop()


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=2.0) as response:
        body: bytes = response.read()
        return body


def start(config: dict[str, Any], workdir: Path, name: str) -> BenchEnvoy:
    """Start Envoy on ``config``; return once its listener is bound and the server is LIVE."""
    config_path = workdir / f"{name}-envoy.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    admin_path = workdir / f"{name}-envoy.admin"
    argv = [
        envoy_binary(),
        "-c",
        str(config_path),
        "--admin-address-path",
        str(admin_path),
        "--use-dynamic-base-id",
        "--concurrency",
        "1",
        "-l",
        "warning",
    ]
    process = BenchProcess(f"envoy ({name})", argv, workdir / f"{name}-envoy.log")
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            process.check_alive()
            text = admin_path.read_text().strip() if admin_path.exists() else ""
            if text.rpartition(":")[2].isdigit() and not text.endswith(":0"):
                admin = text
                break
            _pause(process, deadline, "writing its admin address")
        while True:
            port = _listener_port(admin)
            if port and _is_live(admin):
                return BenchEnvoy(process, admin, port)
            _pause(process, deadline, "LIVE")
    except BaseException:
        process.stop()
        raise


def _is_live(admin: str) -> bool:
    try:
        return _get(f"http://{admin}/ready").strip() == b"LIVE"
    except OSError:  # includes HTTPError: 503 until the server is initialised
        return False


def _listener_port(admin: str) -> int:
    try:
        body = _get(f"http://{admin}/listeners?format=json")
    except OSError:
        return 0
    for listener in json.loads(body).get("listener_statuses", []):
        if listener.get("name") == LISTENER:
            port = listener.get("local_address", {}).get("socket_address", {}).get("port_value", 0)
            return port if isinstance(port, int) else 0
    return 0


def _pause(process: BenchProcess, deadline: float, what: str) -> None:
    process.check_alive()
    if time.monotonic() >= deadline:
        raise BenchError(f"{process.fail(f'not {what} in time')}")
    time.sleep(0.05)
