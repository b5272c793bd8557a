"""DPoP proofs for tests (RFC 9449 §4.2): a client key that signs proofs, and the malformed proofs
the refusal tests need (alg none, HMAC, the jwk of another key).

The thumbprint is computed here independently of ext_authz.dpop (RFC 7638 §3), so the two check
each other. Signing goes through PyJWT's algorithm objects directly, which sign whatever header
they are given: a test can make a proof whose header lies about its key or its algorithm.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import get_default_algorithms

PrivateKey = (
    rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
)

_ALGORITHMS = get_default_algorithms()
_CURVES: Mapping[str, Callable[[], ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}
_RSA = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
# RFC 7638 §3.2: the required members per key type.
_REQUIRED = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def ath(access_token: str) -> str:
    """RFC 9449 §4.2: base64url(SHA-256(ASCII(access token)))."""
    return b64url(hashlib.sha256(access_token.encode("ascii")).digest())


def thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint (an oracle for ext_authz.dpop.jwk_thumbprint)."""
    required = {name: jwk[name] for name in _REQUIRED[jwk["kty"]]}
    text = json.dumps(required, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(text.encode()).digest())


def compact(header: Mapping[str, Any], claims: Mapping[str, Any], signature: bytes = b"") -> str:
    """An unsigned (or given-signature) compact JWS of `header` and `claims`."""
    return f"{_segment(header)}.{_segment(claims)}.{b64url(signature)}"


def _segment(part: Mapping[str, Any]) -> str:
    return b64url(json.dumps(part, separators=(",", ":")).encode())


def sign(header: Mapping[str, Any], claims: Mapping[str, Any], key: object, alg: str) -> str:
    """`header.claims.signature` signed by `key` with PyJWT's `alg` (the header is taken as given)."""
    signing_input = f"{_segment(header)}.{_segment(claims)}"
    signature = _ALGORITHMS[alg].sign(signing_input.encode("ascii"), key)
    return f"{signing_input}.{b64url(signature)}"


def generate(alg: str, *, rsa_bits: int = 2048, curve: str = "Ed25519") -> PrivateKey:
    """A fresh private key for `alg`: the NIST curve of ES*, `curve` (Ed25519 or Ed448) for
    EdDSA, RSA of `rsa_bits` for RS*/PS*."""
    if alg in _CURVES:
        return ec.generate_private_key(_CURVES[alg]())
    if alg == "EdDSA":
        return ed448.Ed448PrivateKey.generate() if curve == "Ed448" else ed25519.Ed25519PrivateKey.generate()
    if alg in _RSA:
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    raise ValueError(f"no key type for algorithm {alg!r}")


class DPoPKey:
    """A DPoP client's key pair (EC P-256 and ES256 by default)."""

    def __init__(
        self, alg: str = "ES256", *, private_key: PrivateKey | None = None, rsa_bits: int = 2048
    ) -> None:
        self.alg = alg
        self.private_key = private_key if private_key is not None else generate(alg, rsa_bits=rsa_bits)
        full = json.loads(_ALGORITHMS[alg].to_jwk(self.private_key.public_key()))
        # The members of the public key only (PyJWT adds key_ops to RSA keys).
        self.public_jwk: dict[str, Any] = {
            name: full[name] for name in ("kty", "crv", "n", "e", "x", "y") if name in full
        }
        self.thumbprint = thumbprint(self.public_jwk)

    @property
    def private_jwk(self) -> dict[str, Any]:
        """The JWK with its private members (what a client must never send)."""
        full: dict[str, Any] = json.loads(_ALGORITHMS[self.alg].to_jwk(self.private_key))
        full.pop("key_ops", None)
        return full

    def header(self, *, typ: str = "dpop+jwt", alg: str | None = None) -> dict[str, Any]:
        return {"typ": typ, "alg": alg or self.alg, "jwk": dict(self.public_jwk)}

    def claims(
        self,
        method: str,
        url: str,
        access_token: str | None,
        *,
        iat: float | None = None,
        jti: str | None = None,
        nonce: str | None = None,
    ) -> dict[str, Any]:
        """The claims of a proof for this request (`access_token` None: no ath, as at a token
        endpoint); `iat` defaults to the machine's clock, `jti` to a random string."""
        claims: dict[str, Any] = {
            "jti": jti if jti is not None else secrets.token_urlsafe(16),
            "htm": method,
            "htu": url,
            "iat": iat if iat is not None else int(time.time()),
        }
        if access_token is not None:
            claims["ath"] = ath(access_token)
        if nonce is not None:
            claims["nonce"] = nonce
        return claims

    def proof(
        self,
        method: str,
        url: str,
        access_token: str | None,
        *,
        iat: float | None = None,
        jti: str | None = None,
        nonce: str | None = None,
        typ: str = "dpop+jwt",
        alg: str | None = None,
        extra_header: Mapping[str, Any] | None = None,
        extra_claims: Mapping[str, Any] | None = None,
        omit: Iterable[str] = (),
    ) -> str:
        """A proof signed with this key. `alg` names the header's algorithm and signs with it
        when PyJWT can sign with this key so (else with the key's own algorithm, the header
        lying); `extra_*` add or replace members; `omit` drops members of the header or claims."""
        header = {**self.header(typ=typ, alg=alg), **(extra_header or {})}
        claims = {
            **self.claims(method, url, access_token, iat=iat, jti=jti, nonce=nonce),
            **(extra_claims or {}),
        }
        dropped = set(omit)
        header = {k: v for k, v in header.items() if k not in dropped}
        claims = {k: v for k, v in claims.items() if k not in dropped}
        signing_alg = alg if alg is not None and _signs_with(alg, self.private_key) else self.alg
        return sign(header, claims, self.private_key, signing_alg)


def _signs_with(alg: str, key: PrivateKey) -> bool:
    if alg in _RSA:
        return isinstance(key, rsa.RSAPrivateKey)
    if alg in _CURVES:
        return isinstance(key, ec.EllipticCurvePrivateKey)
    return alg == "EdDSA" and isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)


def unsigned_proof(key: DPoPKey, method: str, url: str, access_token: str | None, **claims: Any) -> str:
    """`alg: none` with an empty signature, the header showing `key`'s jwk."""
    header = key.header(alg="none")
    return compact(header, {**key.claims(method, url, access_token), **claims})


def hmac_proof(
    method: str,
    url: str,
    access_token: str | None,
    *,
    secret: bytes = b"a-secret-the-client-picked-0123456789",
    jwk: Mapping[str, Any] | None = None,
) -> str:
    """HS256 with `secret`, the header's jwk a public key (a fresh EC one unless given): a MAC
    with a key the sender chose proves nothing."""
    shown = DPoPKey()
    header = {"typ": "dpop+jwt", "alg": "HS256", "jwk": dict(jwk) if jwk is not None else shown.public_jwk}
    return sign(header, shown.claims(method, url, access_token), secret, "HS256")


def foreign_jwk_proof(
    signer: DPoPKey, shown: DPoPKey, method: str, url: str, access_token: str | None
) -> str:
    """Signed by `signer`'s private key, its header showing `shown`'s public key."""
    return signer.proof(method, url, access_token, extra_header={"jwk": dict(shown.public_jwk)})
