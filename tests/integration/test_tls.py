"""TLS on the Check listener (and the admin listener): real gRPC clients, a real Envoy whose
ext_authz cluster speaks TLS and mutual TLS, and certificates renewed in place while serving.

Every certificate is made here (tests/support/tls.py); everything listens on 127.0.0.1, port 0.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from ext_authz._proto.envoy.service.auth.v3 import (
    attribute_context_pb2,
    external_auth_pb2,
    external_auth_pb2_grpc,
)
from ext_authz.config.parse import load
from ext_authz.server import Server
from tests.support.echo import EchoBackend
from tests.support.envoy import send, start_envoy
from tests.support.idp import TestIssuer
from tests.support.processes import json_log_line, start_ext_authz
from tests.support.tls import (
    SERVER_NAME,
    CertificateAuthority,
    Issued,
    SecretVolume,
    served_certificate,
    write_files,
)

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture(scope="module")
def other_ca() -> CertificateAuthority:
    return CertificateAuthority("another CA")


def document(issuer: TestIssuer, tls: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "providers": [{"name": "test", "issuer": issuer.url, "audiences": ["api"], "jwks": issuer.jwks()}],
        "tls": tls,
        **top,
    }


def tls_section(mutual: bool, **extra: Any) -> dict[str, Any]:
    # Relative paths: resolved against the config file's directory.
    section: dict[str, Any] = {"cert_file": "tls/tls.crt", "key_file": "tls/tls.key", **extra}
    if mutual:
        section["client_ca_file"] = "tls/ca.crt"
    return section


def check_request(token: str | None) -> external_auth_pb2.CheckRequest:
    headers = {":method": "GET", ":path": "/orders"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    http = attribute_context_pb2.AttributeContext.HttpRequest(method="GET", path="/orders", headers=headers)
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )


def channel(address: str, ca: CertificateAuthority | None, client: Issued | None = None) -> grpc.aio.Channel:
    # A channel of its own per call site: a new connection, so a new handshake.
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.ssl_target_name_override", SERVER_NAME)]
    if ca is None:
        return grpc.aio.insecure_channel(address, options=options[:1])
    credentials = grpc.ssl_channel_credentials(
        ca.cert_pem, client.key_pem if client else None, client.cert_pem if client else None
    )
    return grpc.aio.secure_channel(address, credentials, options=options)


async def check(
    address: str, ca: CertificateAuthority | None, client: Issued | None = None, token: str | None = None
) -> int:
    """The CheckResponse's status code; raises AioRpcError when the call itself fails."""
    async with channel(address, ca, client) as open_channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(open_channel)  # type: ignore[no-untyped-call]
        response: external_auth_pb2.CheckResponse = await stub.Check(check_request(token), timeout=5)
        return int(response.status.code)


async def refused(address: str, ca: CertificateAuthority | None, client: Issued | None = None) -> bool:
    try:
        await check(address, ca, client)
    except grpc.aio.AioRpcError as exc:
        return exc.code() == UNAVAILABLE
    return False


class Served:
    def __init__(self, server: Server, address: str, directory: Path) -> None:
        self.server = server
        self.address = address
        self.port = int(address.rpartition(":")[2])
        self.directory = directory


async def serve(issuer: TestIssuer, tmp_path: Path, tls: dict[str, Any], **top: Any) -> Served:
    path = tmp_path / "ext-authz.yaml"
    path.write_text(yaml.safe_dump(document(issuer, tls, **top)))
    server = Server(load(path), config_path=path)
    return Served(server, await server.start(), tmp_path / "tls")


async def wait_for(condition: Callable[[], bool], seconds: float = 6.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await asyncio.to_thread(condition):
            return True
        await asyncio.sleep(0.1)
    return False


# ---- TLS and mutual TLS on the Check listener ----------------------------------------------------


async def test_check_over_tls_refuses_plaintext_and_untrusted_certificates(
    issuer: TestIssuer, ca: CertificateAuthority, other_ca: CertificateAuthority, tmp_path: Path
) -> None:
    write_files(tmp_path / "tls", ca.issue(), ca)
    served = await serve(issuer, tmp_path, tls_section(mutual=False))
    try:
        assert await check(served.address, ca, token=issuer.mint()) == 0
        assert await check(served.address, ca) == 16  # no token: a DENIED answer, over TLS
        assert await refused(served.address, None)  # plaintext: the handshake never happens
        assert await refused(served.address, other_ca)  # the client does not trust this server
    finally:
        await served.server.stop(0)


async def test_mutual_tls_requires_a_client_certificate_from_the_ca(
    issuer: TestIssuer, ca: CertificateAuthority, other_ca: CertificateAuthority, tmp_path: Path
) -> None:
    write_files(tmp_path / "tls", ca.issue(), ca)
    served = await serve(issuer, tmp_path, tls_section(mutual=True))
    client = ca.issue("envoy", client=True)
    try:
        assert await check(served.address, ca, client, token=issuer.mint()) == 0
        assert await refused(served.address, ca)  # no client certificate
        assert await refused(served.address, ca, other_ca.issue("intruder", client=True))
        # Signed by the CA but not for client authentication (a server certificate, e.g. one
        # lifted from another service): refused, BoringSSL checks the extended key usage.
        assert await refused(served.address, ca, ca.issue())
        assert await refused(served.address, None)
        # Refused at the handshake: no Check ever ran for them.
        assert await check(served.address, ca, client) == 16
    finally:
        await served.server.stop(0)


# ---- renewal without a restart -------------------------------------------------------------------


async def test_renewed_files_reach_new_connections_and_a_half_written_pair_keeps_the_old(
    issuer: TestIssuer, ca: CertificateAuthority, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = ca.issue()
    files = write_files(tmp_path / "tls", first, ca)
    served = await serve(issuer, tmp_path, tls_section(mutual=True))
    client = ca.issue("envoy", client=True)
    try:
        assert served_certificate(served.port, ca, client) == first.serial
        async with channel(served.address, ca, client) as before:
            stub = external_auth_pb2_grpc.AuthorizationStub(before)  # type: ignore[no-untyped-call]
            assert (await stub.Check(check_request(issuer.mint()), timeout=5)).status.code == 0

            second = ca.issue()
            write_files(tmp_path / "tls", second)
            assert await wait_for(lambda: served_certificate(served.port, ca, client) == second.serial)
            assert await check(served.address, ca, client, token=issuer.mint()) == 0
            # The connection made before the renewal goes on working.
            assert (await stub.Check(check_request(issuer.mint()), timeout=5)).status.code == 0

        # cert-manager writes one file, then the other: a new certificate with the old key.
        third = ca.issue()
        tls = served.server.tls
        assert tls is not None
        with caplog.at_level(logging.WARNING, logger="ext_authz.tls"):
            files["tls.crt"].write_bytes(third.cert_pem)
            assert await wait_for(lambda: tls.refusals == 1)
            await asyncio.sleep(2.2)  # two more polls of the same half-written pair
            assert served_certificate(served.port, ca, client) == second.serial
            assert await check(served.address, ca, client, token=issuer.mint()) == 0
        warnings = [r for r in caplog.records if r.name == "ext_authz.tls" and r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings  # logged once, not every second
        assert getattr(warnings[0], "fields", {})["key"] == "tls.key_file"
        files["tls.key"].write_bytes(third.key_pem)
        assert await wait_for(lambda: served_certificate(served.port, ca, client) == third.serial)
        assert tls.renewals == 2
        exposition = served.server.metrics.exposition().decode()
        assert 'ext_authz_tls_renewals_total{outcome="renewed"} 2.0' in exposition
        assert 'ext_authz_tls_renewals_total{outcome="refused"} 1.0' in exposition
        expiry = x509.load_pem_x509_certificate(third.cert_pem).not_valid_after_utc.timestamp()
        [family] = [
            f
            for f in text_string_to_metric_families(exposition)
            if f.name == "ext_authz_tls_certificate_expiry_timestamp_seconds"
        ]
        assert family.samples[0].value == expiry  # the certificate now served
    finally:
        await served.server.stop(0)


async def test_no_check_fails_while_certificates_renew_under_load(
    issuer: TestIssuer, ca: CertificateAuthority, tmp_path: Path
) -> None:
    """New connections (each a handshake, each a fetcher call in gRPC core) race renewals."""
    volume = SecretVolume(tmp_path / "tls")

    def renew() -> Issued:
        issued = ca.issue()
        volume.update({"tls.crt": issued.cert_pem, "tls.key": issued.key_pem, "ca.crt": ca.cert_pem})
        return issued

    renew()
    served = await serve(issuer, tmp_path, tls_section(mutual=True))
    client = ca.issue("envoy", client=True)
    token = issuer.mint()
    statuses: list[int] = []
    done = asyncio.Event()

    async def caller() -> None:
        for _ in range(300):  # bounded; runs until the renewals are through
            if done.is_set():
                return
            statuses.append(await check(served.address, ca, client, token=token))

    tls = served.server.tls
    assert tls is not None
    try:
        callers = [asyncio.ensure_future(caller()) for _ in range(3)]
        for renewals in range(1, 4):
            last = renew()
            assert await wait_for(lambda: tls.renewals == renewals)  # noqa: B023 - awaited at once
        done.set()
        await asyncio.gather(*callers)
        assert len(statuses) >= 20 and set(statuses) == {0}, statuses
        assert served_certificate(served.port, ca, client) == last.serial
    finally:
        done.set()
        await served.server.stop(0)


async def test_a_secret_volume_symlink_swap_is_a_renewal(
    issuer: TestIssuer, ca: CertificateAuthority, tmp_path: Path
) -> None:
    volume = SecretVolume(tmp_path / "tls")
    first, second = ca.issue(), ca.issue()
    volume.update({"tls.crt": first.cert_pem, "tls.key": first.key_pem, "ca.crt": ca.cert_pem})
    served = await serve(issuer, tmp_path, tls_section(mutual=False))
    try:
        assert served_certificate(served.port, ca) == first.serial
        volume.update({"tls.crt": second.cert_pem, "tls.key": second.key_pem, "ca.crt": ca.cert_pem})
        assert await wait_for(lambda: served_certificate(served.port, ca) == second.serial)
        assert await check(served.address, ca, token=issuer.mint()) == 0
    finally:
        await served.server.stop(0)


async def test_a_changed_tls_section_needs_a_restart(
    issuer: TestIssuer, ca: CertificateAuthority, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_files(tmp_path / "tls", ca.issue(), ca)
    served = await serve(issuer, tmp_path, tls_section(mutual=False))
    try:
        path = tmp_path / "ext-authz.yaml"
        path.write_text(yaml.safe_dump(document(issuer, tls_section(mutual=True))))
        with caplog.at_level(logging.WARNING, logger="ext_authz.server"):
            assert await served.server.reload("test")
        restarts = [getattr(r, "fields", {}).get("key") for r in caplog.records if "restart" in r.message]
        assert restarts == ["tls"]
        assert await check(served.address, ca, token=issuer.mint()) == 0  # still without mTLS
    finally:
        await served.server.stop(0)


# ---- the admin listener --------------------------------------------------------------------------


def https_get(port: int, path: str, ca: CertificateAuthority) -> int:
    context = ssl.create_default_context(cadata=ca.cert_pem.decode())
    request = urllib.request.Request(f"https://{SERVER_NAME}:{port}{path}")
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def served_without_sni(port: int) -> int:
    """What a kubelet HTTPS probe sees: no SNI (it dials the pod IP), no verification."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as connection,
    ):
        der = connection.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number


async def test_admin_listener_over_tls_renews_too(
    issuer: TestIssuer, ca: CertificateAuthority, tmp_path: Path
) -> None:
    first = ca.issue()
    write_files(tmp_path / "tls", first, ca)
    # mTLS on the Check listener; the admin listener asks for no client certificate (probes).
    served = await serve(issuer, tmp_path, tls_section(mutual=True, admin=True), admin="127.0.0.1:0")
    try:
        assert served.server.admin is not None and served.server.admin.bound is not None
        port = int(served.server.admin.bound.rpartition(":")[2])
        assert await asyncio.to_thread(https_get, port, "/healthz", ca) == 200
        assert await asyncio.to_thread(https_get, port, "/readyz", ca) == 200
        assert await asyncio.to_thread(served_without_sni, port) == first.serial
        with pytest.raises(ConnectionError):  # plain http to a TLS port gets no answer
            await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{port}/healthz", None, 5)
        second = ca.issue()
        write_files(tmp_path / "tls", second)
        assert await wait_for(lambda: served_without_sni(port) == second.serial)
        assert await asyncio.to_thread(served_certificate, port, ca, alpn="http/1.1") == second.serial
        assert await asyncio.to_thread(https_get, port, "/healthz", ca) == 200
    finally:
        await served.server.stop(0)


# ---- the real ext-authz behind a real Envoy ------------------------------------------------------


SHIPPED_TLS_CLUSTER = Path(__file__).resolve().parents[2] / "deploy" / "envoy" / "ext-authz-tls-cluster.yaml"


def upstream_tls(directory: Path, *, client_certificate: bool) -> dict[str, Any]:
    """The transport socket of deploy/envoy/ext-authz-tls-cluster.yaml, with this test's files and name."""
    text = SHIPPED_TLS_CLUSTER.read_text(encoding="utf-8")
    text = text.replace("/etc/envoy/ext-authz-client", str(directory))
    text = text.replace("ext-authz.ext-authz.svc.cluster.local", SERVER_NAME)
    transport: dict[str, Any] = yaml.safe_load(text)["transport_socket"]
    if not client_certificate:  # the snippet's "TLS only" variant
        del transport["typed_config"]["common_tls_context"]["tls_certificates"]
    return transport


@pytest.fixture(scope="module")
def envoy_certificates(ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("envoy-tls")
    envoy = ca.issue("envoy", client=True)
    write_files(directory, envoy, ca)  # tls.crt, tls.key, ca.crt: as the snippet names them
    return directory


@pytest.mark.parametrize(
    ("mutual", "client_certificate", "token_status", "anonymous_status"),
    [(False, False, 200, 401), (True, True, 200, 401), (True, False, 503, 503)],
    ids=["tls", "mtls", "mtls-envoy-without-certificate"],
)
def test_envoy_reaches_ext_authz_over_tls(
    mutual: bool,
    client_certificate: bool,
    token_status: int,
    anonymous_status: int,
    issuer: TestIssuer,
    echo: EchoBackend,
    ca: CertificateAuthority,
    envoy_certificates: Path,
    tmp_path: Path,
) -> None:
    write_files(tmp_path / "tls", ca.issue(), ca)
    path = tmp_path / "ext-authz.yaml"
    path.write_text(yaml.safe_dump(document(issuer, tls_section(mutual=mutual))))
    with start_ext_authz(path) as authz:
        line = authz.process.wait_for_line(lambda t: '"serving"' in t, timeout=5, what="serving")
        assert (json_log_line(line) or {}).get("tls") == ("mutual" if mutual else "on")
        transport = upstream_tls(envoy_certificates, client_certificate=client_certificate)
        with start_envoy(authz.address, echo.port, authz_transport_socket=transport) as envoy:
            token = [("Authorization", f"Bearer {issuer.mint()}")]
            allowed = send(envoy.base_url, "GET", "/orders", token)
            anonymous = send(envoy.base_url, "GET", "/orders")
            assert allowed.status == token_status, allowed.describe()
            assert anonymous.status == anonymous_status, anonymous.describe()
            stats = envoy.stats("cluster.ext_authz.ssl.")
            if token_status == 200:
                assert stats.get("cluster.ext_authz.ssl.handshake", 0) >= 1, stats
            else:
                # Envoy without a client certificate: refused at the handshake, so Envoy fails closed.
                assert stats.get("cluster.ext_authz.ssl.handshake", 0) == 0, stats
        authz.process.check_alive()


# ---- serve --workers -----------------------------------------------------------------------------


async def test_every_worker_serves_tls_and_the_fleet_admin_listener_too(
    issuer: TestIssuer, ca: CertificateAuthority, tmp_path: Path
) -> None:
    write_files(tmp_path / "tls", ca.issue(), ca)
    client = ca.issue("envoy", client=True)
    path = tmp_path / "ext-authz.yaml"
    tls = tls_section(mutual=True, admin=True)
    path.write_text(yaml.safe_dump(document(issuer, tls, admin="127.0.0.1:0")))
    with start_ext_authz(path, extra_args=["--workers", "2"]) as fleet:
        line = fleet.process.wait_for_line(lambda t: '"supervising"' in t, timeout=20, what="supervising")
        admin = (json_log_line(line) or {})["admin"]
        assert isinstance(admin, str)
        admin_port = int(admin.rpartition(":")[2])
        # Both workers up: each logs its own "serving" line, with TLS.
        fleet.process.wait_for_line(
            lambda _: sum('"serving"' in t and '"mutual"' in t for t in fleet.process.output_lines()) >= 2,
            timeout=20,
            what="serving from both workers",
        )
        # New connections, spread by the kernel over both workers: every one is mutual TLS.
        for _ in range(8):
            assert await check(fleet.address, ca, client, token=issuer.mint()) == 0
            assert await refused(fleet.address, ca)
        # The supervisor reads its workers' (loopback, plaintext) admin listeners and serves the
        # fleet's over TLS.
        assert await wait_for(lambda: https_get(admin_port, "/readyz", ca) == 200)
        assert "ext_authz_workers 2" in await asyncio.to_thread(https_text, admin_port, "/metrics", ca)


def https_text(port: int, path: str, ca: CertificateAuthority) -> str:
    context = ssl.create_default_context(cadata=ca.cert_pem.decode())
    with urllib.request.urlopen(
        f"https://{SERVER_NAME}:{port}{path}", timeout=5, context=context
    ) as response:
        return str(response.read().decode())


# ---- the HTTP authorization listener: the same TLS settings ------------------------------------


async def http_status(
    address: str,
    ca: CertificateAuthority,
    directory: Path,
    client: Issued | None = None,
    token: str | None = None,
) -> int:
    """The status of one nginx-dialect request over TLS (raises ssl.SSLError / OSError on refusal)."""
    context = ssl.create_default_context(cafile=str(write_pem(directory / "client-ca.pem", ca.cert_pem)))
    if client is not None:
        context.load_cert_chain(
            str(write_pem(directory / "client.crt", client.cert_pem)),
            str(write_pem(directory / "client.key", client.key_pem)),
        )
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port), ssl=context, server_hostname=SERVER_NAME)
    try:
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        writer.write(
            f"GET /nginx HTTP/1.1\r\nHost: app\r\nX-Original-URI: /orders\r\nX-Original-Method: GET\r\n{auth}"
            "Connection: close\r\n\r\n".encode()
        )
        raw = await asyncio.wait_for(reader.read(), 5)
        return int(raw.split(b" ", 2)[1])
    finally:
        writer.close()


def write_pem(path: Path, pem: bytes) -> Path:
    path.write_bytes(pem)
    return path


async def test_the_http_listener_serves_tls_and_mutual_tls(
    issuer: TestIssuer, ca: CertificateAuthority, other_ca: CertificateAuthority, tmp_path: Path
) -> None:
    write_files(tmp_path / "tls", ca.issue(), ca)
    served = await serve(issuer, tmp_path, tls_section(mutual=True), listen_http="127.0.0.1:0")
    try:
        assert served.server.http is not None and served.server.http.bound is not None
        address = served.server.http.bound
        client = ca.issue("a proxy", client=True)
        assert await http_status(address, ca, tmp_path, client, token=issuer.mint()) == 200
        assert await http_status(address, ca, tmp_path, client) == 401
        with pytest.raises((ssl.SSLError, OSError, IndexError)):
            await http_status(address, ca, tmp_path)  # no client certificate: no answer
        with pytest.raises((ssl.SSLError, OSError, IndexError)):
            await http_status(address, ca, tmp_path, other_ca.issue("stranger", client=True))
    finally:
        await served.server.stop(0)


async def test_a_non_loopback_http_listener_without_tls_is_a_config_error(
    issuer: TestIssuer, tmp_path: Path
) -> None:
    from ext_authz.config.values import ConfigError

    path = tmp_path / "ext-authz.yaml"
    doc = document(issuer, {}, listen_http="0.0.0.0:9003")
    del doc["tls"]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.key_path == "listen_http"
