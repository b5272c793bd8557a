"""Turn a JWKS document into verification keys. Pure: no I/O.

Only public keys for signatures are kept. A key that cannot be used (symmetric, encryption-only,
unknown type or curve, too weak, malformed) is skipped with a log line; the rest of the set stays
usable, so one odd key published by an IdP never takes the whole provider down.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt import PyJWK
from jwt.exceptions import PyJWKError

from ext_authz.errors import UnknownKey

log = logging.getLogger(__name__)

MIN_RSA_BITS = 2048

RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
SUPPORTED_ALGORITHMS = frozenset({*RSA_ALGORITHMS, *EC_ALGORITHMS.values(), "EdDSA"})

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey


class JWKSError(ValueError):
    """The document is not a JWKS at all (as opposed to one unusable key inside it)."""


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str | None
    # The token `alg` values this key may verify: its type decides, narrowed by the JWK's own `alg`.
    algorithms: frozenset[str]
    key: PublicKey
    # Identifies the key material across refetches (a refreshed set gives new objects).
    fingerprint: bytes = b""


@dataclass(frozen=True, slots=True)
class KeySet:
    keys: tuple[VerificationKey, ...]

    def candidates(self, kid: str | None, alg: str) -> tuple[VerificationKey, ...]:
        """Keys that may verify a token with this ``kid`` (None: no kid) and ``alg``."""
        return tuple(k for k in self.keys if alg in k.algorithms and (kid is None or k.kid == kid))

    def __len__(self) -> int:
        return len(self.keys)


def select_key(candidates: tuple[VerificationKey, ...], kid: str | None) -> VerificationKey:
    """The one key that may verify the token; several that fit is ambiguous and refused."""
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise UnknownKey()
    if kid is None:
        raise UnknownKey("the token names no key and the issuer has several that fit")
    raise UnknownKey("the issuer publishes several keys under the token's key id")


def _algorithms_for(key: PublicKey) -> frozenset[str]:
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS if key.key_size >= MIN_RSA_BITS else frozenset()
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}.get(key.curve.name)
        return frozenset({alg}) if alg else frozenset()
    return frozenset({"EdDSA"})


def parse_key(jwk: Mapping[str, object]) -> VerificationKey:
    """One JWK → a verification key; raises ValueError saying why it cannot be used."""
    kty = jwk.get("kty")
    if kty not in ("RSA", "EC", "OKP"):
        raise ValueError(f"unsupported key type {kty!r}" if isinstance(kty, str) else "no key type")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise ValueError("not a signature key (use is not 'sig')")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid is not a string")
    jwk_alg = jwk.get("alg")
    if jwk_alg is not None and jwk_alg not in SUPPORTED_ALGORITHMS:
        raise ValueError(f"unsupported algorithm {jwk_alg!r}" if isinstance(jwk_alg, str) else "bad alg")
    try:
        parsed = PyJWK(dict(jwk), algorithm=jwk_alg if isinstance(jwk_alg, str) else None).key
    except (PyJWKError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"malformed key ({type(exc).__name__})") from None
    if hasattr(parsed, "public_key"):
        parsed = parsed.public_key()
    if not isinstance(
        parsed,
        rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey,
    ):
        raise ValueError("not an asymmetric public key")
    algorithms = _algorithms_for(parsed)
    if isinstance(parsed, rsa.RSAPublicKey) and not algorithms:
        raise ValueError(f"RSA key shorter than {MIN_RSA_BITS} bits")
    if isinstance(jwk_alg, str):
        algorithms &= {jwk_alg}
    if not algorithms:
        raise ValueError("key type and alg do not fit together")
    der = parsed.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    fingerprint = hashlib.sha256(der).digest()
    return VerificationKey(kid=kid, algorithms=algorithms, key=parsed, fingerprint=fingerprint)


def parse_jwks(document: object, *, source: str = "jwks") -> KeySet:
    """A JWKS document (already JSON-decoded) → the usable keys in it."""
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise JWKSError("not a JWKS document (an object with a 'keys' array)")
    keys: list[VerificationKey] = []
    for index, jwk in enumerate(document["keys"]):
        if not isinstance(jwk, Mapping):
            log.warning(
                "skipping key", extra={"fields": {"source": source, "index": index, "why": "not an object"}}
            )
            continue
        try:
            keys.append(parse_key(jwk))
        except ValueError as exc:
            kid = jwk.get("kid") if isinstance(jwk.get("kid"), str) else None
            log.warning(
                "skipping key",
                extra={"fields": {"source": source, "index": index, "kid": kid, "why": str(exc)}},
            )
    return KeySet(tuple(keys))
