"""The listeners' TLS files (``tls:`` in the config): read and checked, never trusted half-written.

A certificate file holds the server certificate first, then its intermediates (PEM); the key file
an unencrypted PEM private key that matches that first certificate; the optional client CA file
one or more PEM CA certificates. Checked at config load (errors name ``tls.<field>``) and again on
every renewal: cert-manager and hand-run scripts write the files one after the other, and a new
certificate with the old key must never reach a listener.

This module knows nothing of gRPC or of the ssl module's contexts (see tls.py); it only parses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

# Certificate files are a few KB; a bound keeps a wrong path (a device, a huge file) harmless.
MAX_FILE_BYTES = 1 << 20


class TlsFileError(Exception):
    """A problem with one of the files; ``field`` is its key in the ``tls:`` section."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Contents:
    """The bytes of the files, as read in one go (compared to notice a renewal)."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None


@dataclass(frozen=True, slots=True)
class Material:
    """A checked certificate chain and its matching key, and the CA for client certificates."""

    contents: Contents
    serial: int
    not_after: float  # POSIX seconds


def read_contents(cert_file: str, key_file: str, client_ca_file: str | None) -> Contents:
    return Contents(
        cert_chain=_read(cert_file, "cert_file"),
        private_key=_read(key_file, "key_file"),
        client_ca=_read(client_ca_file, "client_ca_file") if client_ca_file is not None else None,
    )


def read_material(cert_file: str, key_file: str, client_ca_file: str | None) -> Material:
    """Read and check the files; raises TlsFileError naming the field at fault."""
    return check(read_contents(cert_file, key_file, client_ca_file), cert_file, key_file, client_ca_file)


def check(contents: Contents, cert_file: str, key_file: str, client_ca_file: str | None) -> Material:
    try:
        chain = x509.load_pem_x509_certificates(contents.cert_chain)
    except ValueError:
        raise TlsFileError("cert_file", f"{cert_file} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(contents.private_key, password=None)
    except TypeError:
        raise TlsFileError("key_file", f"{key_file} is encrypted; give an unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsFileError("key_file", f"{key_file} holds no usable PEM private key") from None
    leaf = chain[0]
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise TlsFileError(
            "key_file", f"{key_file} does not match the certificate in {cert_file} (the first one)"
        )
    if contents.client_ca is not None:
        try:
            authorities = x509.load_pem_x509_certificates(contents.client_ca)
        except ValueError:
            raise TlsFileError("client_ca_file", f"{client_ca_file} holds no PEM certificate") from None
        for authority in authorities:
            try:
                constraints = authority.extensions.get_extension_for_class(x509.BasicConstraints).value
            except x509.ExtensionNotFound:
                continue  # a v1 root: OpenSSL accepts it as a trust anchor
            if not constraints.ca:
                raise TlsFileError(
                    "client_ca_file", f"{client_ca_file}: a certificate in it is not a CA (basicConstraints)"
                )
    return Material(contents, leaf.serial_number, leaf.not_valid_after_utc.timestamp())


def _spki(public_key: object) -> bytes:
    encoded: bytes = public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return encoded


def _read(path: str, field: str) -> bytes:
    try:
        with Path(path).open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise TlsFileError(field, f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise TlsFileError(field, f"{path} is larger than {MAX_FILE_BYTES} bytes")
    return data
