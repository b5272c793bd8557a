"""Compact JWS signing (RFC 7515 §7.1) with a private key: the one token signer of the project.

The product never signs a token to *accept* it; this exists for stand-ins of an issuer:
``ext-authz test`` signs each case's token with a throwaway key (policytest), the development
issuer signs what ``dev-issuer mint`` asks for (ext_authz.dev.tokens), and the test suite signs its
fixtures. It sits outside ``ext_authz.dev`` because policytest is product code and the product
never imports the development tools. It imports nothing of the package.

A header or payload given as a mapping is serialized as compact JSON (no white space, keys in the
given order, non-ASCII escaped, the bytes PyJWT's encoder writes); given as bytes it is taken as
it is, so a test can control every byte of the signing input.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import get_default_algorithms

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
Segment = Mapping[str, object] | bytes

_CURVES: Mapping[str, Callable[[], ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}
_RSA = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")


def b64url(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _segment(part: Segment) -> str:
    raw = part if isinstance(part, bytes) else json.dumps(part, separators=(",", ":")).encode()
    return b64url(raw)


def sign(header: Segment, payload: Segment, private_key: PrivateKey, alg: str) -> str:
    """`header.payload.signature`, signed by `private_key` with `alg` (PyJWT's implementation).

    The header is signed as given: `alg` picks the signature algorithm and is not put into it, so
    a test can sign a header that names another algorithm, or none.
    """
    signing_input = f"{_segment(header)}.{_segment(payload)}"
    signature = get_default_algorithms()[alg].sign(signing_input.encode("ascii"), private_key)
    return f"{signing_input}.{b64url(signature)}"


def generate_key(alg: str) -> PrivateKey:
    """A fresh private key for `alg`: a NIST curve for ES*, Ed25519 for EdDSA, 2048-bit RSA else."""
    if alg in _CURVES:
        return ec.generate_private_key(_CURVES[alg]())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if alg in _RSA:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"no key type for algorithm {alg!r}")
