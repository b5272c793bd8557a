"""Run the real Envoy binary in front of ext-authz and an upstream backend, for tests.

The generated config mirrors the repository's envoy.yaml (ext_authz gRPC filter, then the
router) with test-friendly differences: every address is 127.0.0.1 with port 0, the authz
timeout is generous (2 s, so a slow CI machine does not turn into 503s), and an access log on
stdout shows each request's response code and flags in failure messages.

Ports are learned, never guessed: `--admin-address-path` gives the admin address, and the
admin `GET /listeners?format=json` gives the listener's bound port. `--use-dynamic-base-id`
keeps concurrently running Envoys from fighting over the hot-restart shared memory.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ext_authz.dev.plan import envoy_binary
from tests.support.echo import EchoBackend, EchoRequest
from tests.support.idp import TestIssuer
from tests.support.lifecycle import StopOnExit
from tests.support.processes import DEFAULT_READY_TIMEOUT, ExtAuthzProcess, ManagedProcess, ProcessError

LISTENER_NAME = "ingress"
AUTHZ_CLUSTER = "ext_authz"
BACKEND_CLUSTER = "backend"
TEST_AUTHZ_TIMEOUT = "2s"
# Marks each request so a test can find exactly what the backend received for it.
TRACE_HEADER = "x-test-trace"
AUTHZ_METADATA_HEADER = "x-test-authz-metadata"
_METADATA_VALUE = (
    "provider=%DYNAMIC_METADATA(envoy.filters.http.ext_authz:provider)% "
    "rule=%DYNAMIC_METADATA(envoy.filters.http.ext_authz:rule)%"
)

# The ext_authz filter's namespace in Envoy's dynamic metadata (what ext-authz's Check answer fills).
AUTHZ_METADATA_NAMESPACE = "envoy.filters.http.ext_authz"

# Same rules as envoy.yaml: the authorizer may set/overwrite ordinary headers (x-user-id, ...)
# but any attempt to change routing (host, :authority, :scheme, :method), a system header
# (":path" and other pseudo-headers) or x-envoy-* is ignored. See envoy.yaml for the reasoning.
DECODER_HEADER_MUTATION_RULES: dict[str, Any] = {"disallow_system": True}


def _split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _static_cluster(name: str, host: str, port: int, *, http2: bool) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                    ]
                }
            ],
        },
    }
    if http2:
        # gRPC needs HTTP/2 to the upstream; the per-cluster way to ask for it in the v3 API.
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def _route(
    prefix: str, headers_to_add: list[dict[str, Any]], context: Mapping[str, str] | None = None
) -> dict[str, Any]:
    route: dict[str, Any] = {
        "match": {"prefix": prefix},
        "route": {"cluster": BACKEND_CLUSTER},
        "request_headers_to_add": [dict(h) for h in headers_to_add],
    }
    if context is not None:
        # Sent to ext-authz as CheckRequest.attributes.context_extensions for this route only.
        route["typed_per_filter_config"] = {
            "envoy.filters.http.ext_authz": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                "check_settings": {"context_extensions": dict(context)},
            }
        }
    return route


# Envoy's HTTP mode forwards only the headers these lists name (README: Gateways): identity headers
# and the rewritten Cookie/Authorization upstream; the denial's and the sign-in's to the client.
HTTP_MODE_UPSTREAM = (
    {"prefix": "x-user-"}, {"exact": "x-jwt-payload"}, {"exact": "x-forwarded-access-token"},
    {"exact": "cookie"}, {"exact": "authorization"},
)  # fmt: skip
HTTP_MODE_CLIENT = (
    {"exact": "www-authenticate"}, {"exact": "location"}, {"exact": "set-cookie"}, {"exact": "retry-after"},
    {"exact": "dpop-nonce"},
    {"exact": "content-type"}, {"exact": "cache-control"}, {"exact": "content-security-policy"},
)  # fmt: skip


def _body_route(path: str, headers_to_add: list[dict[str, Any]]) -> dict[str, Any]:
    """A route for exactly ``path`` whose Checks carry the whole body (up to 16 KiB), as the
    README tells operators to set up back-channel logout: per route, no other request waits."""
    route = _route("/", headers_to_add)
    route["match"] = {"path": path}
    route["typed_per_filter_config"] = {
        "envoy.filters.http.ext_authz": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
            "check_settings": {
                "with_request_body": {"max_request_bytes": 16384, "allow_partial_message": False}
            },
        }
    }
    return route


@dataclass(frozen=True, slots=True)
class DownstreamTls:
    """The listener serves TLS with `cert_file`/`key_file` and verifies client certificates
    against `ca_file` (a client without one is refused when `require_client_certificate`); the
    ext_authz filter then sends the client's leaf certificate (`include_peer_certificate`).

    `forward_client_cert`: the connection manager's `forward_client_cert_details: SANITIZE_SET`
    with `set_current_client_cert_details: {cert: true} (Hash= is always set)`: a client's own
    x-forwarded-client-cert is dropped, and one element describing its certificate (Hash=, Cert=)
    is set when it presented one, as a TLS-terminating Envoy in front of ext-authz would do.
    """

    cert_file: Path
    key_file: Path
    ca_file: Path
    require_client_certificate: bool = True
    forward_client_cert: bool = False

    def transport_socket(self) -> dict[str, Any]:
        return {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": self.require_client_certificate,
                "common_tls_context": {
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": str(self.cert_file)},
                            "private_key": {"filename": str(self.key_file)},
                        }
                    ],
                    "validation_context": {"trusted_ca": {"filename": str(self.ca_file)}},
                },
            },
        }


def envoy_config(
    authz_address: str,
    backend_port: int,
    *,
    encode_raw_headers: bool = False,
    authz_timeout: str = TEST_AUTHZ_TIMEOUT,
    access_log: bool = True,
    route_context_extensions: Mapping[str, Mapping[str, str]] | None = None,
    metadata_headers: Mapping[str, str] | None = None,
    authz_transport_socket: Mapping[str, Any] | None = None,
    allowed_headers: Sequence[str] | None = None,
    headers_with_underscores_action: str = "DROP_HEADER",
    normalise_paths: bool = True,
    request_body_paths: Sequence[str] = (),
    http_service: bool = False,
    downstream_tls: DownstreamTls | None = None,
) -> dict[str, Any]:
    """The bootstrap config (as a dict) used by `start_envoy`.

    `authz_transport_socket` is the ext_authz cluster's `transport_socket` (e.g. TLS to ext-authz).
    `normalise_paths=False` turns Envoy's path normalisation off (`normalize_path`,
    `merge_slashes` false, `path_with_escaped_slashes_action: KEEP_UNCHANGED`), as a mesh that
    leaves `;` and `%2F` alone does: ext-authz then sees the path the client sent.

    Opt-in, for rule tests: `route_context_extensions` maps a path prefix to the
    `check_settings.context_extensions` of a route of its own (placed before the catch-all `/`
    route), and `metadata_headers` maps a request header name to a key of the ext_authz dynamic
    metadata that every route copies into that header for the backend (`-` when absent).

    `request_body_paths`: exact paths routed with the whole request body in the Check
    (per-route `check_settings.with_request_body`, as for back-channel logout).

    `http_service`: Envoy's HTTP ext_authz mode against ext-authz's HTTP listener at
    `authz_address` (dialect `envoy`, path prefix /envoy), with the header lists the README's
    Gateways section gives (HTTP_MODE_* below), instead of the gRPC Check.

    `downstream_tls`: the listener serves TLS (client certificates verified, see DownstreamTls)
    and the ext_authz filter sends the client's certificate; None (the default) is plain HTTP.

    For header-hygiene tests: `allowed_headers` (exact names) sets the ext_authz filter's
    `allowed_headers`, so only those request headers reach ext-authz (Envoy adds a few of its
    own); `headers_with_underscores_action` replaces envoy.yaml's DROP_HEADER (Envoy's own
    default is ALLOW).
    """
    authz_host, authz_port = _split_host_port(authz_address)
    ext_authz: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3",
        "grpc_service": {"envoy_grpc": {"cluster_name": AUTHZ_CLUSTER}, "timeout": authz_timeout},
        "failure_mode_allow": False,
        "status_on_error": {"code": "ServiceUnavailable"},
        "clear_route_cache": False,
        "encode_raw_headers": encode_raw_headers,
        "decoder_header_mutation_rules": dict(DECODER_HEADER_MUTATION_RULES),
    }
    if http_service:
        del ext_authz["grpc_service"], ext_authz["encode_raw_headers"], ext_authz["transport_api_version"]
        ext_authz["http_service"] = {
            "server_uri": {
                "uri": f"http://{authz_address}",
                "cluster": AUTHZ_CLUSTER,
                "timeout": authz_timeout,
            },
            "path_prefix": "/envoy",
            "authorization_response": {
                "allowed_upstream_headers": {"patterns": list(HTTP_MODE_UPSTREAM)},
                "allowed_client_headers": {"patterns": list(HTTP_MODE_CLIENT)},
                "allowed_client_headers_on_success": {"patterns": [{"exact": "set-cookie"}]},
            },
        }
        ext_authz["allowed_headers"] = {"patterns": [{"safe_regex": {"regex": ".*"}}]}
    if allowed_headers is not None:
        ext_authz["allowed_headers"] = {"patterns": [{"exact": name} for name in allowed_headers]}
    if downstream_tls is not None:
        # attributes.source.certificate: the URL-encoded PEM of the client's leaf (RFC 8705 §3).
        ext_authz["include_peer_certificate"] = True
    # Shows the backend what ext-authz put in dynamic_metadata.
    headers_to_add: list[dict[str, Any]] = [
        {
            "header": {"key": AUTHZ_METADATA_HEADER, "value": _METADATA_VALUE},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    ]
    for header, key in (metadata_headers or {}).items():
        headers_to_add.append(
            {
                "header": {"key": header, "value": f"%DYNAMIC_METADATA({AUTHZ_METADATA_NAMESPACE}:{key})%"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        )
    contexts = route_context_extensions or {}
    routes = [_body_route(path, headers_to_add) for path in request_body_paths]
    routes += [_route(prefix, headers_to_add, context) for prefix, context in contexts.items()]
    routes.append(_route("/", headers_to_add))
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "ingress_http",
        # As in envoy.yaml: ext-authz must see the path the backend will serve, and no
        # underscored lookalike of an identity header may reach the backend.
        "normalize_path": normalise_paths,
        "merge_slashes": normalise_paths,
        "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT" if normalise_paths else "KEEP_UNCHANGED",
        "common_http_protocol_options": {"headers_with_underscores_action": headers_with_underscores_action},
        "route_config": {
            "name": "local_route",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": routes,
                }
            ],
        },
        "http_filters": [
            {"name": "envoy.filters.http.ext_authz", "typed_config": ext_authz},
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    if downstream_tls is not None and downstream_tls.forward_client_cert:
        hcm["forward_client_cert_details"] = "SANITIZE_SET"
        hcm["set_current_client_cert_details"] = {"cert": True}  # Hash= is always set
    if access_log:
        hcm["access_log"] = [
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                    "log_format": {
                        "text_format_source": {
                            "inline_string": "[access] %REQ(:METHOD)% %REQ(:PATH)% -> %RESPONSE_CODE% "
                            "flags=%RESPONSE_FLAGS% details=%RESPONSE_CODE_DETAILS% "
                            "trace=%REQ(x-test-trace)% "
                            "authz_provider=%DYNAMIC_METADATA(envoy.filters.http.ext_authz:provider)% "
                            "authz_rule=%DYNAMIC_METADATA(envoy.filters.http.ext_authz:rule)%\n"
                        }
                    },
                },
            }
        ]
    authz_cluster = _static_cluster(AUTHZ_CLUSTER, authz_host, authz_port, http2=not http_service)
    if authz_transport_socket is not None:
        authz_cluster["transport_socket"] = dict(authz_transport_socket)
    filter_chain: dict[str, Any] = {
        "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
    }
    if downstream_tls is not None:
        filter_chain["transport_socket"] = downstream_tls.transport_socket()
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": LISTENER_NAME,
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [filter_chain],
                }
            ],
            "clusters": [
                authz_cluster,
                _static_cluster(BACKEND_CLUSTER, "127.0.0.1", backend_port, http2=False),
            ],
        },
    }


def write_envoy_config(path: Path, authz_address: str, backend_port: int, **options: Any) -> Path:
    path.write_text(yaml.safe_dump(envoy_config(authz_address, backend_port, **options), sort_keys=False))
    return path


def validate_config(path: Path, *, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """`envoy --mode validate -c PATH`: parses and checks the config without binding anything."""
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "-l", "warning", "--use-dynamic-base-id"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _admin_get(admin_address: str, path: str, *, timeout: float = 2.0) -> tuple[int, bytes]:
    host, port = _split_host_port(admin_address)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class EnvoyProcess(StopOnExit):
    """A running Envoy; `base_url` is its HTTP listener (https:// when it serves TLS),
    `admin_address` its admin endpoint."""

    def __init__(
        self, process: ManagedProcess, workdir: Path, admin_address: str, port: int, *, tls: bool = False
    ) -> None:
        self.process = process
        self.workdir = workdir
        self.admin_address = admin_address
        self.port = port
        self.tls = tls

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def admin_get(self, path: str) -> tuple[int, bytes]:
        return _admin_get(self.admin_address, path)

    def stats(self, prefix: str) -> dict[str, int]:
        """Counter and gauge values whose name starts with `prefix`."""
        query = urllib.parse.urlencode({"format": "json", "filter": f"^{re.escape(prefix)}"})
        status, body = self.admin_get(f"/stats?{query}")
        if status != 200:
            raise RuntimeError(f"envoy admin /stats answered {status}")
        values: dict[str, int] = {}
        for stat in json.loads(body).get("stats", []):
            if "name" in stat and isinstance(stat.get("value"), int):
                values[stat["name"]] = stat["value"]
        return values

    def stop(self) -> int:
        try:
            return self.process.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


def start_envoy(
    authz_address: str,
    backend_port: int,
    *,
    encode_raw_headers: bool = False,
    authz_timeout: str = TEST_AUTHZ_TIMEOUT,
    timeout: float = DEFAULT_READY_TIMEOUT,
    route_context_extensions: Mapping[str, Mapping[str, str]] | None = None,
    metadata_headers: Mapping[str, str] | None = None,
    authz_transport_socket: Mapping[str, Any] | None = None,
    allowed_headers: Sequence[str] | None = None,
    headers_with_underscores_action: str = "DROP_HEADER",
    normalise_paths: bool = True,
    request_body_paths: Sequence[str] = (),
    http_service: bool = False,
    downstream_tls: DownstreamTls | None = None,
) -> EnvoyProcess:
    """Start Envoy and return once its listener accepts connections and the server is LIVE.

    `route_context_extensions`, `metadata_headers`, `authz_transport_socket`, `allowed_headers`,
    `headers_with_underscores_action`, `normalise_paths`, `request_body_paths` and `downstream_tls`:
    see `envoy_config`.
    """
    workdir = Path(tempfile.mkdtemp(prefix="ext-authz-envoy-"))
    config = write_envoy_config(
        workdir / "envoy.yaml",
        authz_address,
        backend_port,
        encode_raw_headers=encode_raw_headers,
        authz_timeout=authz_timeout,
        route_context_extensions=route_context_extensions,
        metadata_headers=metadata_headers,
        authz_transport_socket=authz_transport_socket,
        allowed_headers=allowed_headers,
        headers_with_underscores_action=headers_with_underscores_action,
        normalise_paths=normalise_paths,
        request_body_paths=request_body_paths,
        http_service=http_service,
        downstream_tls=downstream_tls,
    )
    admin_path = workdir / "admin-address"
    argv = [
        envoy_binary(),
        "-c",
        str(config),
        "--admin-address-path",
        str(admin_path),
        "--use-dynamic-base-id",
        "--concurrency",
        "1",
        "-l",
        "warning",
    ]
    process = ManagedProcess("envoy", argv)
    try:
        deadline = time.monotonic() + timeout
        admin_address = _wait_for_admin_address(process, admin_path, deadline)
        port = _wait_for_listener_port(process, admin_address, deadline)
        _wait_until_live(process, admin_address, port, deadline)
    except BaseException:
        process.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return EnvoyProcess(process, workdir, admin_address, port, tls=downstream_tls is not None)


def _poll_pause(process: ManagedProcess, deadline: float, what: str) -> None:
    process.check_alive()
    if time.monotonic() >= deadline:
        raise ProcessError(process.describe_failure(f"not {what} in time"))
    time.sleep(0.05)


def _wait_for_admin_address(process: ManagedProcess, admin_path: Path, deadline: float) -> str:
    while True:
        if admin_path.exists():
            text = admin_path.read_text().strip()
            host, _, port = text.rpartition(":")
            if host and port.isdigit() and int(port) > 0:
                return text
        _poll_pause(process, deadline, "writing its admin address")


def _wait_for_listener_port(process: ManagedProcess, admin_address: str, deadline: float) -> int:
    while True:
        try:
            status, body = _admin_get(admin_address, "/listeners?format=json")
        except OSError:
            status, body = 0, b""
        if status == 200:
            for listener in json.loads(body).get("listener_statuses", []):
                if listener.get("name") != LISTENER_NAME:
                    continue
                port = listener.get("local_address", {}).get("socket_address", {}).get("port_value", 0)
                if isinstance(port, int) and port > 0:
                    return port
        _poll_pause(process, deadline, "reporting its listener port")


def _wait_until_live(process: ManagedProcess, admin_address: str, port: int, deadline: float) -> None:
    while True:
        try:
            status, body = _admin_get(admin_address, "/ready")
        except OSError:
            status, body = 0, b""
        if status == 200 and body.strip() == b"LIVE":
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    return
            except OSError:
                pass
        _poll_pause(process, deadline, "LIVE")


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: tuple[tuple[str, str], ...]  # names lower-cased, in wire order, duplicates kept
    body: bytes

    def header_values(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for key, value in self.headers if key == wanted]

    def header(self, name: str) -> str | None:
        """The only value of `name`, None if absent; fails if the header is repeated."""
        values = self.header_values(name)
        assert len(values) <= 1, f"{name} repeated: {values}"
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)

    def describe(self) -> str:
        lines = [
            f"HTTP {self.status}",
            *(f"{k}: {v}" for k, v in self.headers),
            "",
            self.body.decode("utf-8", "replace"),
        ]
        return "\n".join(lines)


def send(
    base_url: str,
    method: str,
    path: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    body: bytes | None = None,
    timeout: float = 10.0,
    host: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> HttpResponse:
    """One HTTP/1.1 request with exactly the given header lines (duplicates are sent as is).

    `host` replaces the Host header http.client would send (the address connected to).
    An https:// `base_url` is reached over TLS with `ssl_context` (which server it trusts, which
    client certificate it presents: tests.support.tls.client_context).
    """
    parts = urllib.parse.urlsplit(base_url)
    assert parts.hostname is not None
    assert parts.port is not None
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        assert ssl_context is not None, "an https:// URL needs the ssl_context to trust the server"
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout, context=ssl_context)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=host is not None, skip_accept_encoding=True)
        if host is not None:
            conn.putheader("Host", host)
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        data = response.read()
        return HttpResponse(
            status=response.status,
            headers=tuple((k.lower(), v) for k, v in response.getheaders()),
            body=data,
        )
    finally:
        conn.close()


@dataclass(frozen=True, slots=True)
class Exchange:
    """A response from Envoy and, if the request got through, what the backend received."""

    response: HttpResponse
    backend: EchoRequest | None

    def describe(self) -> str:
        seen = "backend not reached" if self.backend is None else f"backend saw {dict(self.backend)}"
        return f"{self.response.describe()}\n--- {seen}"


@dataclass(frozen=True, slots=True)
class Gateway:
    """Envoy (in one header-encoding mode) in front of ext-authz and the echo backend."""

    envoy: EnvoyProcess
    echo: EchoBackend
    issuer: TestIssuer
    authz: ExtAuthzProcess
    encode_raw_headers: bool
    # For a TLS listener (start_envoy's downstream_tls): the client's TLS context by default.
    ssl_context: ssl.SSLContext | None = None

    def request(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]] = (),
        *,
        token: str | None = None,
        host: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> Exchange:
        """`ssl_context` (tests.support.tls.client_context) replaces the gateway's for this request:
        which client certificate it presents, or none."""
        trace = uuid.uuid4().hex
        lines = [(TRACE_HEADER, trace)]
        if token is not None:
            lines.append(("Authorization", f"Bearer {token}"))
        lines.extend(headers)
        context = ssl_context or self.ssl_context
        response = send(self.envoy.base_url, method, path, lines, host=host, ssl_context=context)
        reached = [r for r in self.echo.requests if r.header_values(TRACE_HEADER) == [trace]]
        assert len(reached) <= 1, f"backend got the request {len(reached)} times"
        return Exchange(response, reached[0] if reached else None)

    def get(
        self,
        path: str,
        headers: Sequence[tuple[str, str]] = (),
        *,
        token: str | None = None,
        host: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> Exchange:
        return self.request("GET", path, headers, token=token, host=host, ssl_context=ssl_context)
