"""End to end through a real Envoy terminating mutual TLS: certificate-bound access tokens
(RFC 8705 §3) read from the TLS peer Envoy saw, and from x-forwarded-client-cert behind
`forward_client_cert_details: SANITIZE_SET`.

The first tests check the Envoy side alone (what a Check carries), against a recording
Authorization server; the rest run the real ext-authz with `mtls_bound` providers.
"""

from __future__ import annotations

import hashlib
import ssl
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from ext_authz._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from ext_authz.certbinding import certificate_thumbprint, der_from_envoy, thumbprint_from_xfcc
from tests.support import tls
from tests.support.echo import EchoBackend
from tests.support.envoy import DownstreamTls, Exchange, Gateway, send, start_envoy
from tests.support.idp import TestIssuer
from tests.support.processes import ExtAuthzProcess, start_ext_authz

XFCC = "x-forwarded-client-cert"


@dataclass(frozen=True, slots=True)
class Pki:
    ca: tls.CertificateAuthority
    files: dict[str, Path]  # the listener's tls.crt, tls.key and the client CA's ca.crt
    client_a: tls.Issued
    client_b: tls.Issued  # signed by the same CA: the listener accepts it as well

    def listener(self, *, require_client_certificate: bool = True, forward: bool = False) -> DownstreamTls:
        return DownstreamTls(
            self.files["tls.crt"],
            self.files["tls.key"],
            self.files["ca.crt"],
            require_client_certificate=require_client_certificate,
            forward_client_cert=forward,
        )

    def context(self, client: tls.Issued | None) -> ssl.SSLContext:
        return tls.client_context(self.ca, client)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = tls.CertificateAuthority()
    files = tls.write_files(tmp_path_factory.mktemp("mtls"), ca.issue(), ca)
    return Pki(ca, files, ca.issue("client-a", client=True), ca.issue("client-b", client=True))


# ---- Envoy alone: what a Check carries under mutual TLS ---------------------------------------


class RecordingAuthorization(external_auth_pb2_grpc.AuthorizationServicer):
    """Allows every request and keeps the CheckRequests Envoy sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[external_auth_pb2.CheckRequest] = []

    def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        with self._lock:
            self._requests.append(request)
        answer = external_auth_pb2.CheckResponse()
        answer.status.code = 0
        return answer

    def last(self) -> external_auth_pb2.CheckRequest:
        with self._lock:
            return self._requests[-1]


@pytest.fixture(scope="module")
def recorder() -> Iterator[tuple[RecordingAuthorization, str]]:
    servicer = RecordingAuthorization()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def test_envoy_sends_the_peer_certificate_and_a_sanitised_xfcc(
    pki: Pki, recorder: tuple[RecordingAuthorization, str]
) -> None:
    servicer, address = recorder
    with (
        EchoBackend() as echo,
        start_envoy(address, echo.port, downstream_tls=pki.listener(forward=True)) as envoy,
    ):
        forged = f"Hash={hashlib.sha256(pki.client_b.der).hexdigest()}"
        response = send(envoy.base_url, "GET", "/x", [(XFCC, forged)], ssl_context=pki.context(pki.client_a))
        assert response.status == 200, response.describe()
        check = servicer.last().attributes
        # include_peer_certificate: the URL-encoded PEM of the client's leaf certificate.
        assert check.source.certificate.startswith("-----BEGIN%20CERTIFICATE-----%0A")
        assert der_from_envoy(check.source.certificate) == pki.client_a.der
        # SANITIZE_SET dropped the client's header and set one element: Hash= and Cert= of A.
        xfcc = check.request.http.headers[XFCC]
        assert xfcc.startswith(f"Hash={hashlib.sha256(pki.client_a.der).hexdigest()};Cert=")
        assert "," not in xfcc
        assert thumbprint_from_xfcc(xfcc) == certificate_thumbprint(pki.client_a.der)
        # A listener that requires client certificates refuses a client without one.
        # TLS 1.3: the handshake completes on the client's side, the alert comes with the answer.
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            send(envoy.base_url, "GET", "/x", ssl_context=pki.context(None))


def test_envoy_optional_client_certificate(pki: Pki, recorder: tuple[RecordingAuthorization, str]) -> None:
    servicer, address = recorder
    listener = pki.listener(require_client_certificate=False, forward=True)
    with EchoBackend() as echo, start_envoy(address, echo.port, downstream_tls=listener) as envoy:
        forged = f"Hash={hashlib.sha256(pki.client_b.der).hexdigest()}"
        response = send(envoy.base_url, "GET", "/x", [(XFCC, forged)], ssl_context=pki.context(None))
        assert response.status == 200, response.describe()
        check = servicer.last().attributes
        assert check.source.certificate == ""
        # No certificate: SANITIZE_SET removes the client's header and sets none.
        assert XFCC not in check.request.http.headers
        response = send(envoy.base_url, "GET", "/x", ssl_context=pki.context(pki.client_b))
        assert response.status == 200, response.describe()
        assert der_from_envoy(servicer.last().attributes.source.certificate) == pki.client_b.der


def test_plain_http_listener_is_unchanged(recorder: tuple[RecordingAuthorization, str]) -> None:
    servicer, address = recorder
    with EchoBackend() as echo, start_envoy(address, echo.port) as envoy:
        assert envoy.base_url.startswith("http://")
        assert send(envoy.base_url, "GET", "/x").status == 200
        assert servicer.last().attributes.source.certificate == ""


# ---- the real ext-authz -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def issuer() -> Iterator[TestIssuer]:
    with TestIssuer(audience="api") as running:
        yield running


def serve(
    issuer: TestIssuer, directory: Path, rules: list[dict[str, Any]], **binding: Any
) -> ExtAuthzProcess:
    provider: dict[str, Any] = {
        "name": "bank",
        "issuer": issuer.url,
        "audiences": ["api"],
        "jwks_uri": issuer.jwks_uri,
        **binding,
    }
    config = {"listen": "127.0.0.1:0", "providers": [provider], "rules": rules}
    file = directory / "ext-authz.yaml"
    file.write_text(yaml.safe_dump(config))
    return start_ext_authz(file)


TOKEN_RULES: list[dict[str, Any]] = [{"match": {"paths": ["/*"]}, "require": {}}]


def test_anonymous_route_over_mutual_tls(
    pki: Pki, issuer: TestIssuer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    rules = [{"match": {"paths": ["/*"]}, "allow": "anonymous"}]
    with (
        serve(issuer, tmp_path_factory.mktemp("anonymous"), rules) as authz,
        EchoBackend() as echo,
        start_envoy(authz.address, echo.port, downstream_tls=pki.listener(forward=True)) as envoy,
    ):
        gateway = Gateway(envoy, echo, issuer, authz, False, pki.context(pki.client_a))
        exchange = gateway.get("/anything")
        assert exchange.response.status == 200, exchange.describe()
        assert exchange.backend is not None
        # What the backend saw: the XFCC Envoy set for this connection.
        xfcc = exchange.backend.header_values(XFCC)
        assert thumbprint_from_xfcc(",".join(xfcc)) == certificate_thumbprint(pki.client_a.der)


def bound_to(issued: tls.Issued) -> dict[str, Any]:
    return {"cnf": {"x5t#S256": certificate_thumbprint(issued.der)}}


def challenge_error(exchange: Exchange) -> str | None:
    value = exchange.response.header("www-authenticate") or ""
    for part in value.split(", "):
        if part.startswith('error="'):
            return part[len('error="') : -1]
    return None


def assert_invalid_token(exchange: Exchange) -> None:
    assert exchange.response.status == 401, exchange.describe()
    assert challenge_error(exchange) == "invalid_token", exchange.describe()
    assert exchange.backend is None


@pytest.fixture(scope="module")
def required(
    pki: Pki, issuer: TestIssuer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, Gateway]]:
    """`mtls_bound: required` (certificates from the peer, the default): behind a listener that
    requires client certificates, and behind one where they are optional."""
    with (
        serve(issuer, tmp_path_factory.mktemp("required"), TOKEN_RULES, mtls_bound="required") as authz,
        EchoBackend() as echo,
        start_envoy(authz.address, echo.port, downstream_tls=pki.listener()) as strict,
        start_envoy(
            authz.address, echo.port, downstream_tls=pki.listener(require_client_certificate=False)
        ) as optional,
    ):
        yield (
            Gateway(strict, echo, issuer, authz, False, pki.context(pki.client_a)),
            Gateway(optional, echo, issuer, authz, False, pki.context(None)),
        )


def test_bound_token_with_its_certificate(pki: Pki, required: tuple[Gateway, Gateway]) -> None:
    gateway, _ = required
    token = gateway.issuer.mint(bound_to(pki.client_a))
    exchange = gateway.get("/accounts", token=token, ssl_context=pki.context(pki.client_a))
    assert exchange.response.status == 200, exchange.describe()
    assert exchange.backend is not None
    assert exchange.backend["path"] == "/accounts"


def test_bound_token_with_another_valid_certificate(pki: Pki, required: tuple[Gateway, Gateway]) -> None:
    gateway, _ = required
    token = gateway.issuer.mint(bound_to(pki.client_a))
    assert_invalid_token(gateway.get("/accounts", token=token, ssl_context=pki.context(pki.client_b)))


def test_bound_token_without_a_certificate(pki: Pki, required: tuple[Gateway, Gateway]) -> None:
    _, optional = required
    token = optional.issuer.mint(bound_to(pki.client_a))
    assert_invalid_token(optional.get("/accounts", token=token))
    # The same listener with certificate A: the binding holds.
    exchange = optional.get("/accounts", token=token, ssl_context=pki.context(pki.client_a))
    assert exchange.response.status == 200, exchange.describe()


def test_unbound_token_is_refused_when_binding_is_required(required: tuple[Gateway, Gateway]) -> None:
    gateway, _ = required
    assert_invalid_token(gateway.get("/accounts", token=gateway.issuer.mint()))


def test_allowed_mode(pki: Pki, issuer: TestIssuer, tmp_path_factory: pytest.TempPathFactory) -> None:
    with (
        serve(issuer, tmp_path_factory.mktemp("allowed"), TOKEN_RULES, mtls_bound="allowed") as authz,
        EchoBackend() as echo,
        start_envoy(authz.address, echo.port, downstream_tls=pki.listener()) as envoy,
    ):
        gateway = Gateway(envoy, echo, issuer, authz, False, pki.context(pki.client_a))
        exchange = gateway.get("/accounts", token=issuer.mint())
        assert exchange.response.status == 200, exchange.describe()
        assert exchange.backend is not None
        # A bound token is still checked.
        bound = issuer.mint(bound_to(pki.client_a))
        assert gateway.get("/accounts", token=bound).response.status == 200
        assert_invalid_token(gateway.get("/accounts", token=bound, ssl_context=pki.context(pki.client_b)))


def test_certificate_from_xfcc_behind_sanitize_set(
    pki: Pki, issuer: TestIssuer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with (
        serve(
            issuer,
            tmp_path_factory.mktemp("xfcc"),
            TOKEN_RULES,
            mtls_bound="required",
            client_certificate_from=["xfcc"],
        ) as authz,
        EchoBackend() as echo,
        start_envoy(
            authz.address,
            echo.port,
            downstream_tls=pki.listener(require_client_certificate=False, forward=True),
        ) as envoy,
    ):
        gateway = Gateway(envoy, echo, issuer, authz, False, pki.context(pki.client_a))
        token = issuer.mint(bound_to(pki.client_a))
        exchange = gateway.get("/accounts", token=token)
        assert exchange.response.status == 200, exchange.describe()
        assert_invalid_token(gateway.get("/accounts", token=token, ssl_context=pki.context(pki.client_b)))
        # Without a certificate, a client's own XFCC naming A is dropped by SANITIZE_SET.
        forged = [(XFCC, f"Hash={hashlib.sha256(pki.client_a.der).hexdigest()}")]
        assert_invalid_token(gateway.get("/accounts", forged, token=token, ssl_context=pki.context(None)))
