"""Certificates for TLS tests: a CA made on the spot, server and client certificates it signs, the
files written as ext-authz reads them, and a Kubernetes-style Secret volume (``..data`` symlink).

Keys are P-256 (fast to make); every certificate names ``localhost`` and 127.0.0.1.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAME = "localhost"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True, slots=True)
class Issued:
    cert_pem: bytes  # the certificate, then the chain above it (none: the CA is the trust anchor)
    key_pem: bytes
    serial: int

    @property
    def der(self) -> bytes:
        """The certificate's DER (what RFC 8705 §3.1's ``x5t#S256`` hashes)."""
        return x509.load_pem_x509_certificate(self.cert_pem).public_bytes(serialization.Encoding.DER)


class CertificateAuthority:
    def __init__(self, name: str = "ext-authz test CA") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self._certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
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
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem = self._certificate.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str = SERVER_NAME, *, client: bool = False) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        serial = x509.random_serial_number()
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self._certificate.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return Issued(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key), serial)


def write_files(directory: Path, issued: Issued, ca: CertificateAuthority | None = None) -> dict[str, Path]:
    """tls.crt, tls.key (and ca.crt) in `directory`, each replaced atomically (rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {"tls.crt": issued.cert_pem, "tls.key": issued.key_pem}
    if ca is not None:
        files["ca.crt"] = ca.cert_pem
    for name, data in files.items():
        temporary = directory / f".{name}.tmp"
        temporary.write_bytes(data)
        os.replace(temporary, directory / name)
    return {name: directory / name for name in files}


class SecretVolume:
    """A directory laid out as the kubelet lays out a Secret volume: ``tls.crt -> ..data/tls.crt``,
    ``..data -> ..<timestamp>``; `update` writes a new timestamped directory and swaps ``..data``
    in one rename, the kubelet's atomic writer."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._version = 0
        directory.mkdir(parents=True, exist_ok=True)

    def update(self, files: dict[str, bytes]) -> None:
        self._version += 1
        payload = self.directory / f"..2026_12_03_00_00_{self._version:02d}.000000000"
        payload.mkdir()
        for name, data in files.items():
            (payload / name).write_bytes(data)
        temporary = self.directory / "..data_tmp"
        temporary.symlink_to(payload.name)
        os.replace(temporary, self.directory / "..data")
        for name in files:
            link = self.directory / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")

    def path(self, name: str) -> Path:
        return self.directory / name


def served_certificate(
    port: int, ca: CertificateAuthority, client: Issued | None = None, *, alpn: str = "h2"
) -> int:
    """Handshake with 127.0.0.1:`port`, verifying against `ca`; the serial of the certificate served.

    Raises ssl.SSLError (or OSError) when the handshake fails. Under mutual TLS a client without a
    certificate still sees the server's (TLS 1.3 refuses it after the handshake).
    """
    context = ssl.create_default_context(cadata=ca.cert_pem.decode())
    if client is not None:
        _load_pair(context, client)
    context.set_alpn_protocols([alpn])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=SERVER_NAME) as connection,
    ):
        der = connection.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number


def client_context(ca: CertificateAuthority, client: Issued | None = None) -> ssl.SSLContext:
    """A client TLS context trusting only `ca`, presenting `client`'s certificate (None: none)."""
    context = ssl.create_default_context(cadata=ca.cert_pem.decode())
    if client is not None:
        _load_pair(context, client)
    return context


def _load_pair(context: ssl.SSLContext, issued: Issued) -> None:
    """ssl loads certificate pairs from files only: a private temporary directory."""
    with tempfile.TemporaryDirectory() as directory:
        cert, key = Path(directory) / "c.pem", Path(directory) / "k.pem"
        cert.write_bytes(issued.cert_pem)
        key.write_bytes(issued.key_pem)
        context.load_cert_chain(cert, key)
