"""Certificate-bound access tokens (RFC 8705 §3): the client certificate a request presents, and
whether a token's ``cnf`` binds it to that certificate. Pure: no I/O.

The certificate reaches us by one of three routes, each a ``CertificateSource``:

- ``peer``: the TLS peer Envoy itself saw (``attributes.source.certificate`` with the ext_authz
  filter's ``include_peer_certificate: true``): the URL-encoded PEM of the leaf certificate.
- ``xfcc``: Envoy's ``x-forwarded-client-cert``, set by a TLS-terminating Envoy in front with
  ``forward_client_cert_details: SANITIZE_SET`` (``Hash=``, optionally ``Cert=``).
- ``client-cert``: RFC 9440's ``Client-Cert`` header, set by another TLS-terminating proxy.

A header is only as trustworthy as the proxy that sanitises it; which sources are read is the
operator's choice (``mtls_bound.client_certificate_from``), in the order given.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import urllib.parse
from collections.abc import Callable, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ext_authz import errors
from ext_authz.config.model import CertificateSource
from ext_authz.model import Request

XFCC_HEADER = "x-forwarded-client-cert"
CLIENT_CERT_HEADER = "client-cert"

# RFC 8705 §3.1: the confirmation member carrying the certificate's SHA-256 thumbprint.
CNF_X5T_S256 = "x5t#S256"

# One PEM block and nothing else but whitespace (RFC 7468 §2: the label is CERTIFICATE). A second
# block (a chain) is refused: which of two certificates is "the client's" is not ours to guess.
_PEM_CERTIFICATE = re.compile(
    r"\s*-----BEGIN CERTIFICATE-----[\r\n]+([A-Za-z0-9+/=\r\n]+)-----END CERTIFICATE-----\s*"
)
# RFC 8941 §3.3.5: a Byte Sequence is base64 (RFC 4648 §4, standard alphabet) between colons.
_BYTE_SEQUENCE = re.compile(r":([A-Za-z0-9+/]*={0,2}):")
_XFCC_SINGLE = frozenset({"hash", "cert"})
_SHA256_HEX = re.compile(r"[0-9A-Fa-f]{64}")
# Outer whitespace a field value may carry (RFC 9110 §5.5: OWS is SP / HTAB).
_OWS = " \t"


class MalformedClientCertificate(errors.InvalidRequest):
    """A configured certificate source is present but cannot be read (or, for XFCC, was not set by
    one sanitising proxy). Refused rather than skipped: skipping it would let a later source, or
    "no certificate", decide for a request that claims a certificate."""

    code = "malformed_client_certificate"
    description = "the client certificate header is malformed"


def certificate_thumbprint(der: bytes) -> str:
    """RFC 8705 §3.1 ``x5t#S256``: base64url (RFC 4648 §5, no padding) of SHA-256 over the DER."""
    return _b64url(hashlib.sha256(der).digest())


def der_from_envoy(value: str) -> bytes | None:
    """The DER of the certificate in Envoy's URL-encoded PEM (``source.certificate``, XFCC
    ``Cert=``); None unless it is exactly one PEM CERTIFICATE block holding a certificate."""
    try:
        pem = urllib.parse.unquote(value, errors="strict")
    except UnicodeDecodeError:
        return None
    if _PEM_CERTIFICATE.fullmatch(pem) is None:
        return None
    try:
        certificate = x509.load_pem_x509_certificate(pem.encode("ascii"))
        return certificate.public_bytes(serialization.Encoding.DER)
    except Exception:  # ValueError, and x509.InvalidVersion (no ValueError): malformed all the same
        return None


def thumbprint_from_xfcc(header: str) -> str | None:
    """The ``x5t#S256`` of the client certificate in an ``x-forwarded-client-cert`` value, or None.

    Only a value of exactly one element is read: Envoy's ``SANITIZE_SET`` replaces whatever the
    client sent with one element describing the connection it terminated; several elements are
    a chain of proxies (``APPEND_FORWARD``) whose first was set by someone we do not know.
    ``Hash=`` is the hex SHA-256 of the DER; ``Cert=`` (URL-encoded PEM), when present, must
    describe the same certificate. Anything malformed or inconsistent gives None.
    """
    elements = _split_xfcc(header)
    if elements is None or len(elements) != 1:
        return None
    fields = elements[0]
    hash_hex, cert = fields.get("hash"), fields.get("cert")
    from_hash: str | None = None
    if hash_hex is not None:
        if _SHA256_HEX.fullmatch(hash_hex) is None:
            return None
        from_hash = _b64url(bytes.fromhex(hash_hex))
    if cert is None:
        return from_hash
    der = der_from_envoy(cert)
    if der is None:
        return None
    from_cert = certificate_thumbprint(der)
    if from_hash is not None and not hmac.compare_digest(from_hash.encode(), from_cert.encode()):
        return None
    return from_cert


def der_from_client_cert(header: str) -> bytes | None:
    """The DER in an RFC 9440 ``Client-Cert`` value (§2.1: a Structured Field Byte Sequence of
    the DER certificate), or None when malformed. Item parameters, several values (joined with
    "," by Envoy) and anything that is not one certificate are refused."""
    match = _BYTE_SEQUENCE.fullmatch(header.strip(_OWS))
    if match is None:
        return None
    encoded = match.group(1)
    # RFC 8941 §4.2.7: parsers SHOULD NOT fail when "=" padding is missing.
    encoded += "=" * (-len(encoded) % 4)
    try:
        der = base64.b64decode(encoded, validate=True)
        certificate = x509.load_der_x509_certificate(der)
        # Re-encoded to refuse BER or trailing bytes: the thumbprint is over the certificate's DER.
        canonical = certificate.public_bytes(serialization.Encoding.DER)
    except Exception:  # binascii.Error, ValueError, x509.InvalidVersion: malformed all the same
        return None
    return canonical if canonical == der else None


def _client_cert_thumbprint(header: str) -> str | None:
    der = der_from_client_cert(header)
    return certificate_thumbprint(der) if der is not None else None


# The certificate sources that are request headers: the header, and its value's thumbprint.
_HEADER_SOURCES: Mapping[str, tuple[str, Callable[[str], str | None]]] = {
    "xfcc": (XFCC_HEADER, thumbprint_from_xfcc),
    "client-cert": (CLIENT_CERT_HEADER, _client_cert_thumbprint),
}


def presented_thumbprint(request: Request, sources: tuple[CertificateSource, ...]) -> str | None:
    """The ``x5t#S256`` of the client certificate from the first of ``sources`` (in order) that
    carries one; None when none does.

    A source that is present but malformed raises ``MalformedClientCertificate`` (400) instead of
    being skipped: fail closed, so that a broken or forged header neither hands the decision to a
    later source nor turns into "no certificate" (which an ``allowed`` provider would accept).
    """
    for source in sources:
        if source == "peer":
            if not request.peer_certificate:
                continue
            der = der_from_envoy(request.peer_certificate)
            if der is None:
                raise MalformedClientCertificate("the client certificate is malformed")
            return certificate_thumbprint(der)
        header, read = _HEADER_SOURCES[source]  # a KeyError is a bug: the config validates it
        value = request.headers.get(header)
        if value is None:
            continue
        thumbprint = read(value)
        if thumbprint is None:
            raise MalformedClientCertificate()
        return thumbprint
    return None


def check_binding(claims: Mapping[str, object], presented: str | None, mode: str) -> str | None:
    """RFC 8705 §3: the verdict of the token's certificate binding, for explain; raises
    ``CertificateBindingMismatch`` (401 invalid_token, §3 last paragraph) when it does not hold.

    ``mode`` is the provider's ``mtls_bound.mode``: ``required`` refuses a token without
    ``cnf["x5t#S256"]``; ``allowed`` lets it through and checks only the tokens that are bound.
    A ``cnf`` with other members only (DPoP's ``jkt``, RFC 9449 §6) is not certificate-bound.
    """
    if mode not in ("required", "allowed"):
        raise ValueError(f"unknown mtls_bound mode {mode!r}")  # a bug: config validates it
    bound = _bound_thumbprint(claims)
    if bound is None:
        if mode == "required":
            raise errors.CertificateBindingMismatch("the token is not certificate-bound")
        return "token not certificate-bound (allowed)"
    if presented is None:
        raise errors.CertificateBindingMismatch("the certificate-bound token needs its client certificate")
    # Constant time (a thumbprint is no secret, but nothing is lost); bytes, since compare_digest
    # refuses non-ASCII str and the claim is the token's to choose.
    if not hmac.compare_digest(bound.encode(), presented.encode()):
        raise errors.CertificateBindingMismatch("the token is bound to another client certificate")
    return "certificate matches cnf x5t#S256"


def _bound_thumbprint(claims: Mapping[str, object]) -> str | None:
    """``cnf["x5t#S256"]``, None when the token carries no certificate binding; raises on a
    malformed binding (RFC 7800 §3.1: ``cnf`` is a JSON object), which must never read as none."""
    if "cnf" not in claims:
        return None
    cnf = claims["cnf"]
    if not isinstance(cnf, Mapping):
        raise errors.CertificateBindingMismatch("the token certificate binding is malformed")
    if CNF_X5T_S256 not in cnf:
        return None
    thumbprint = cnf[CNF_X5T_S256]
    if not isinstance(thumbprint, str) or not thumbprint:
        raise errors.CertificateBindingMismatch("the token certificate binding is malformed")
    return thumbprint


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _split_xfcc(header: str) -> list[dict[str, str]] | None:
    """Envoy's XFCC syntax: elements separated by ",", key=value pairs by ";", values optionally
    double-quoted (a quoted value may hold "," ";" "=", and backslash escapes). Keys are compared
    case-insensitively. None when malformed: an open quote, a pair without "=", an empty element,
    or Hash= or Cert= given twice."""
    elements: list[dict[str, str]] = []
    pairs: dict[str, str] = {}
    key: str | None = None
    token: list[str] = []
    quoted = was_quoted = False
    i, n = 0, len(header)
    while i < n:
        char = header[i]
        if quoted:
            if char == "\\" and i + 1 < n:
                token.append(header[i + 1])
                i += 2
                continue
            if char == '"':
                quoted = False
            else:
                token.append(char)
        elif char == '"':
            # A quote opens a value only at its start (after "="): key="..." and nothing after it.
            if key is None or token or was_quoted:
                return None
            quoted = was_quoted = True
        elif char == "=" and key is None:
            key = "".join(token).strip(_OWS).lower()
            token = []
            if not key:
                return None
        elif char in ";,":
            if not _end_pair(pairs, key, token, was_quoted):
                return None
            key, token, was_quoted = None, [], False
            if char == ",":
                elements.append(pairs)
                pairs = {}
        elif was_quoted:
            # After a closing quote only whitespace may come before the next ";" or ",".
            if char not in _OWS:
                return None
        else:
            token.append(char)
        i += 1
    if quoted or not _end_pair(pairs, key, token, was_quoted):
        return None
    elements.append(pairs)
    return elements if all(elements) else None


def _end_pair(pairs: dict[str, str], key: str | None, token: list[str], was_quoted: bool) -> bool:
    """Stores one finished key=value pair; False when it is malformed."""
    if key is None:
        # Only an empty stretch may stand without "=" (e.g. a trailing ";"); an empty element is
        # caught by the caller.
        return not "".join(token).strip(_OWS)
    if key in pairs:
        # Envoy repeats URI= and DNS= (one per SAN); two of what we read cannot both be the
        # connection's.
        return key not in _XFCC_SINGLE
    value = "".join(token)
    pairs[key] = value if was_quoted else value.strip(_OWS)
    return True
