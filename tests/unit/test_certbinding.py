"""ext_authz.certbinding: RFC 8705 thumbprints, the three certificate sources Envoy can hand us
(peer, x-forwarded-client-cert, RFC 9440 Client-Cert), and the binding verdicts."""

from __future__ import annotations

import base64
import hashlib
import urllib.parse
from collections.abc import Mapping

import pytest
from cryptography.hazmat.primitives import serialization

from ext_authz import errors
from ext_authz.certbinding import (
    MalformedClientCertificate,
    certificate_thumbprint,
    check_binding,
    der_from_client_cert,
    der_from_envoy,
    presented_thumbprint,
    thumbprint_from_xfcc,
)
from ext_authz.config.model import CertificateSource
from ext_authz.model import Request
from tests.support.tls import CertificateAuthority, Issued

# RFC 8705 §3.1's example confirmation value (the RFC does not give the certificate it hashes).
RFC8705_EXAMPLE = "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"
B64URL_ALPHABET = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture(scope="module")
def cert_a(ca: CertificateAuthority) -> Issued:
    return ca.issue("client-a", client=True)


@pytest.fixture(scope="module")
def cert_b(ca: CertificateAuthority) -> Issued:
    return ca.issue("client-b", client=True)


def envoy_encoded(pem: bytes) -> str:
    """As Envoy sends `source.certificate` and XFCC `Cert=`: everything but letters, digits and
    "-" percent-encoded ("-----BEGIN%20CERTIFICATE-----%0AMIIB...%2F...%3D%0A-----END...")."""
    return urllib.parse.quote(pem.decode(), safe="-")


def hex_sha256(issued: Issued) -> str:
    return hashlib.sha256(issued.der).hexdigest()


def sf_bytes(der: bytes) -> str:
    return f":{base64.b64encode(der).decode()}:"


# ---- certificate_thumbprint ---------------------------------------------------------------------


def test_thumbprint_is_base64url_of_sha256_without_padding(cert_a: Issued) -> None:
    # Independent: hex digest -> bytes -> standard base64 -> RFC 4648 §5 alphabet, no "=".
    digest = bytes.fromhex(hashlib.sha256(cert_a.der).hexdigest())
    expected = base64.b64encode(digest).decode().replace("+", "-").replace("/", "_").rstrip("=")
    assert certificate_thumbprint(cert_a.der) == expected


def test_thumbprint_known_vector_and_the_rfc_example_shape() -> None:
    # SHA-256 of the empty string, a well-known digest: 47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=
    # in standard base64; "+" and "/" exercise the URL-safe alphabet.
    assert certificate_thumbprint(b"") == "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU"
    # RFC 8705 §3.1's example has the same shape: 43 characters of the URL-safe alphabet, 32 bytes.
    for value in (RFC8705_EXAMPLE, certificate_thumbprint(b"x")):
        assert len(value) == 43
        assert set(value) <= B64URL_ALPHABET
        assert len(base64.urlsafe_b64decode(value + "=")) == 32


# ---- der_from_envoy ----------------------------------------------------------------------------


def test_envoy_url_encoded_pem(cert_a: Issued) -> None:
    encoded = envoy_encoded(cert_a.cert_pem)
    assert encoded.startswith("-----BEGIN%20CERTIFICATE-----%0A")
    assert der_from_envoy(encoded) == cert_a.der
    # An unencoded PEM is the same text after unquoting.
    assert der_from_envoy(cert_a.cert_pem.decode()) == cert_a.der
    # "+" in the base64 stays "+" (unquote, not unquote_plus).
    assert der_from_envoy(urllib.parse.quote(cert_a.cert_pem.decode(), safe="-+/=")) == cert_a.der


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        "%ff%fe",  # not UTF-8
        "-----BEGIN%20CERTIFICATE-----%0AAAAA%0A-----END%20CERTIFICATE-----%0A",  # not a certificate
        "-----BEGIN%20CERTIFICATE-----%0A!!!!%0A-----END%20CERTIFICATE-----%0A",
    ],
)
def test_envoy_value_that_is_not_a_certificate(value: str) -> None:
    assert der_from_envoy(value) is None


def test_envoy_value_with_anything_but_one_certificate_block(cert_a: Issued, cert_b: Issued) -> None:
    assert der_from_envoy(envoy_encoded(cert_a.cert_pem + cert_b.cert_pem)) is None
    assert der_from_envoy(envoy_encoded(b"junk\n" + cert_a.cert_pem)) is None
    assert der_from_envoy(envoy_encoded(cert_a.key_pem)) is None
    relabelled = cert_a.cert_pem.replace(b"CERTIFICATE", b"X509 CRL")
    assert der_from_envoy(envoy_encoded(relabelled)) is None


# ---- thumbprint_from_xfcc ----------------------------------------------------------------------


def test_xfcc_hash_only(cert_a: Issued) -> None:
    expected = certificate_thumbprint(cert_a.der)
    assert thumbprint_from_xfcc(f"Hash={hex_sha256(cert_a)}") == expected
    assert thumbprint_from_xfcc(f"By=spiffe://mesh/ns/a;Hash={hex_sha256(cert_a).upper()}") == expected
    assert thumbprint_from_xfcc(f"hash={hex_sha256(cert_a)};URI=spiffe://x;DNS=a;DNS=b;") == expected


def test_xfcc_hash_and_cert_as_envoy_sets_them(cert_a: Issued) -> None:
    # The shape Envoy 1.40 sends with SANITIZE_SET and set_current_client_cert_details {cert: true}.
    header = f'Hash={hex_sha256(cert_a)};Cert="{envoy_encoded(cert_a.cert_pem)}"'
    assert thumbprint_from_xfcc(header) == certificate_thumbprint(cert_a.der)
    assert thumbprint_from_xfcc(f'Cert="{envoy_encoded(cert_a.cert_pem)}"') == certificate_thumbprint(
        cert_a.der
    )


def test_xfcc_hash_and_cert_disagree(cert_a: Issued, cert_b: Issued) -> None:
    header = f'Hash={hex_sha256(cert_b)};Cert="{envoy_encoded(cert_a.cert_pem)}"'
    assert thumbprint_from_xfcc(header) is None
    assert thumbprint_from_xfcc(f'Hash={hex_sha256(cert_a)};Cert="garbage"') is None


def test_xfcc_quoted_values_may_hold_separators(cert_a: Issued) -> None:
    subject = 'Subject="/C=US/O=Example, Inc.;x=y/CN=a \\"quoted\\" name"'
    header = f"By=spiffe://a;{subject};Hash={hex_sha256(cert_a)};URI=spiffe://b"
    assert thumbprint_from_xfcc(header) == certificate_thumbprint(cert_a.der)


def test_xfcc_with_two_elements_is_not_trusted(cert_a: Issued, cert_b: Issued) -> None:
    # APPEND_FORWARD's chain: the first element was set by someone else.
    header = f"Hash={hex_sha256(cert_b)},Hash={hex_sha256(cert_a)}"
    assert thumbprint_from_xfcc(header) is None
    assert thumbprint_from_xfcc(f"Hash={hex_sha256(cert_a)},") is None


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        "By=spiffe://a",  # no Hash, no Cert
        "Hash=abc",  # not 64 hex digits
        "Hash=" + "g" * 64,
        "Hash=" + "a" * 64 + ";Hash=" + "b" * 64,  # twice
        "Hash=" + "a" * 64 + ';Subject="open',  # unterminated quote
        'Hash="' + "a" * 64 + '"x',  # text after the closing quote
        "Hash=" + "a" * 64 + ";=x",  # empty key
        "Hash=" + "a" * 64 + ";stray",  # a pair without "="
        'By=x"y";Hash=' + "a" * 64,  # a quote inside an unquoted value
        ";,;",
    ],
)
def test_xfcc_malformed(header: str) -> None:
    assert thumbprint_from_xfcc(header) is None


# ---- der_from_client_cert ----------------------------------------------------------------------


def test_client_cert_byte_sequence(cert_a: Issued) -> None:
    assert der_from_client_cert(sf_bytes(cert_a.der)) == cert_a.der
    assert der_from_client_cert(f" \t{sf_bytes(cert_a.der)} ") == cert_a.der
    unpadded = f":{base64.b64encode(cert_a.der).decode().rstrip('=')}:"
    assert der_from_client_cert(unpadded) == cert_a.der


def test_client_cert_malformed(cert_a: Issued, cert_b: Issued) -> None:
    b64 = base64.b64encode(cert_a.der).decode()
    for header in (
        "",
        "::",
        b64,  # no colons
        f":{b64}",
        f":{b64};a=1:",
        f":{b64}:;a=1",  # parameters
        f"{sf_bytes(cert_a.der)}, {sf_bytes(cert_b.der)}",  # two values joined by Envoy
        f":{base64.urlsafe_b64encode(cert_a.der).decode()}:".replace("/", "_") + "_",
        ":!!!!:",
        sf_bytes(b"not a certificate"),
        sf_bytes(cert_a.der + b"\x00"),  # trailing bytes
        f":{base64.b64encode(cert_a.cert_pem).decode()}:",  # PEM, not DER
    ):
        assert der_from_client_cert(header) is None, header


def test_client_cert_refuses_a_non_canonical_encoding(cert_a: Issued) -> None:
    key = serialization.load_pem_private_key(cert_a.key_pem, None)
    key_der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert der_from_client_cert(sf_bytes(key_der)) is None


# ---- presented_thumbprint ----------------------------------------------------------------------


def request(peer: Issued | None = None, **headers: str) -> Request:
    return Request(
        method="GET",
        path="/",
        headers={name.replace("_", "-"): value for name, value in headers.items()},
        peer_certificate=envoy_encoded(peer.cert_pem) if peer is not None else "",
    )


def test_first_configured_source_with_a_certificate_wins(cert_a: Issued, cert_b: Issued) -> None:
    both = request(cert_a, x_forwarded_client_cert=f"Hash={hex_sha256(cert_b)}")
    assert presented_thumbprint(both, ("peer", "xfcc")) == certificate_thumbprint(cert_a.der)
    assert presented_thumbprint(both, ("xfcc", "peer")) == certificate_thumbprint(cert_b.der)
    # An absent source is skipped.
    only_xfcc = request(x_forwarded_client_cert=f"Hash={hex_sha256(cert_b)}")
    assert presented_thumbprint(only_xfcc, ("peer", "xfcc")) == certificate_thumbprint(cert_b.der)
    only_client_cert = request(client_cert=sf_bytes(cert_b.der))
    assert presented_thumbprint(only_client_cert, ("peer", "client-cert")) == certificate_thumbprint(
        cert_b.der
    )


def test_no_source_carries_a_certificate() -> None:
    assert presented_thumbprint(request(), ("peer", "xfcc", "client-cert")) is None


def test_sources_not_configured_are_never_read(cert_a: Issued, cert_b: Issued) -> None:
    # A client-sent header is ignored unless the operator named its source (a proxy sanitises it).
    forged = request(x_forwarded_client_cert=f"Hash={hex_sha256(cert_b)}", client_cert=sf_bytes(cert_b.der))
    assert presented_thumbprint(forged, ("peer",)) is None
    garbage = request(cert_a, x_forwarded_client_cert="garbage", client_cert="garbage")
    assert presented_thumbprint(garbage, ("peer",)) == certificate_thumbprint(cert_a.der)


def test_a_malformed_configured_source_fails_closed(cert_a: Issued) -> None:
    # The later source holds a good certificate; the malformed earlier one must not be skipped.
    cases: tuple[tuple[dict[str, str], tuple[CertificateSource, ...]], ...] = (
        ({"x_forwarded_client_cert": "garbage"}, ("xfcc", "peer")),
        ({"x_forwarded_client_cert": f"Hash={'a' * 64},Hash={'b' * 64}"}, ("xfcc", "peer")),
        ({"client_cert": "garbage"}, ("client-cert", "peer")),
        ({"client_cert": ""}, ("client-cert", "peer")),
    )
    for headers, sources in cases:
        with pytest.raises(MalformedClientCertificate) as raised:
            presented_thumbprint(request(cert_a, **headers), sources)
        assert raised.value.detail == "the client certificate header is malformed"
    with pytest.raises(MalformedClientCertificate) as peer:
        presented_thumbprint(Request(method="GET", path="/", peer_certificate="garbage"), ("peer", "xfcc"))
    assert peer.value.detail == "the client certificate is malformed"


def test_malformed_client_certificate_is_a_400_invalid_request() -> None:
    error = MalformedClientCertificate()
    assert isinstance(error, errors.InvalidRequest)
    assert (error.status, error.rfc6750_error, error.code) == (
        400,
        "invalid_request",
        "malformed_client_certificate",
    )


# ---- check_binding -----------------------------------------------------------------------------

THUMB = certificate_thumbprint(b"certificate A")
OTHER = certificate_thumbprint(b"certificate B")
BOUND = {"sub": "alice", "cnf": {"x5t#S256": THUMB}}


def mismatch(claims: Mapping[str, object], presented: str | None, mode: str) -> str:
    with pytest.raises(errors.CertificateBindingMismatch) as raised:
        check_binding(claims, presented, mode)
    assert (raised.value.status, raised.value.rfc6750_error) == (401, "invalid_token")
    return raised.value.detail


@pytest.mark.parametrize("mode", ["required", "allowed"])
def test_bound_token_with_its_certificate(mode: str) -> None:
    assert check_binding(BOUND, THUMB, mode) == "certificate matches cnf x5t#S256"


@pytest.mark.parametrize("mode", ["required", "allowed"])
def test_bound_token_without_or_with_another_certificate(mode: str) -> None:
    assert mismatch(BOUND, None, mode) == "the certificate-bound token needs its client certificate"
    assert mismatch(BOUND, OTHER, mode) == "the token is bound to another client certificate"


def test_unbound_token_by_mode() -> None:
    dpop_only = {"cnf": {"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}}
    unbound: tuple[Mapping[str, object], ...] = ({"sub": "alice"}, dpop_only)
    for claims in unbound:
        assert mismatch(claims, THUMB, "required") == "the token is not certificate-bound"
        assert mismatch(claims, None, "required") == "the token is not certificate-bound"
        assert check_binding(claims, THUMB, "allowed") == "token not certificate-bound (allowed)"
        assert check_binding(claims, None, "allowed") == "token not certificate-bound (allowed)"


@pytest.mark.parametrize("mode", ["required", "allowed"])
@pytest.mark.parametrize(
    "cnf",
    ["x5t", ["x5t#S256", THUMB], None, {"x5t#S256": 1}, {"x5t#S256": [THUMB]}, {"x5t#S256": ""}],
)
def test_malformed_binding_is_a_mismatch_in_either_mode(cnf: object, mode: str) -> None:
    assert mismatch({"cnf": cnf}, THUMB, mode) == "the token certificate binding is malformed"


def test_a_non_ascii_thumbprint_claim_is_a_mismatch_not_a_crash() -> None:
    claims = {"cnf": {"x5t#S256": "é" * 43}}
    assert mismatch(claims, THUMB, "allowed") == "the token is bound to another client certificate"


def test_unknown_mode_is_a_bug() -> None:
    with pytest.raises(ValueError, match="unknown mtls_bound mode"):
        check_binding(BOUND, THUMB, "optional")
