"""Turn a JWKS document into verification keys. Pure: no I/O.

Only public keys for signatures are kept. A key that cannot be used (symmetric, encryption-only,
unknown type or curve, too weak, malformed) is skipped with a log line; the rest of the set stays
usable, so one odd key published by an IdP never takes the whole provider down.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt import PyJWK
from jwt.exceptions import PyJWTError

from ext_authz.errors import UnknownKey

log = logging.getLogger(__name__)

MIN_RSA_BITS = 2048
# OpenSSL's own bounds (OPENSSL_RSA_MAX_MODULUS_BITS, OPENSSL_RSA_MAX_PUBEXP_BITS): a larger key
# is refused before any big-number work, so a JWKS cannot make a fetch burn CPU.
MAX_RSA_BITS = 16384
MAX_RSA_EXPONENT_BITS = 64

RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
SUPPORTED_ALGORITHMS = frozenset({*RSA_ALGORITHMS, *EC_ALGORITHMS.values(), "EdDSA"})

# The public members each key type needs (RFC 7518 §6.2.1, §6.3.1; RFC 8037 §2), with the most
# base64url characters each may have: RSA n up to MAX_RSA_BITS (one leading zero byte tolerated),
# EC coordinates up to P-521's 66 bytes, OKP x up to Ed448's 57 bytes.
_PUBLIC_MEMBERS: Mapping[str, Mapping[str, int]] = {
    "RSA": {"n": -(-(MAX_RSA_BITS // 8 + 1) * 4 // 3), "e": -(-(MAX_RSA_EXPONENT_BITS // 8 + 1) * 4 // 3)},
    "EC": {"x": 88, "y": 88},
    "OKP": {"x": 76},
}
# Private members (RFC 7518 §6.2.2, §6.3.2, §6.4.1; RFC 8037 §2): a published private key is
# compromised, so it verifies nothing.
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
_CURVES = {"EC": {"P-256", "P-384", "P-521"}, "OKP": {"Ed25519", "Ed448"}}
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")

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
    # (kid, alg) -> candidates, for the pairs this set has keys for (a kid it lacks is not kept).
    _found: dict[tuple[str | None, str], tuple[VerificationKey, ...]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def candidates(self, kid: str | None, alg: str) -> tuple[VerificationKey, ...]:
        """Keys that may verify a token with this ``kid`` (None: no kid) and ``alg``."""
        found = self._found.get((kid, alg))
        if found is None:
            found = tuple(k for k in self.keys if alg in k.algorithms and (kid is None or k.kid == kid))
            if found:
                self._found[(kid, alg)] = found
        return found

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
    """One JWK → a verification key; raises ValueError saying why it cannot be used.

    Every member is checked for its JSON type and size before any decoding, so that a malformed
    key (wrong types, bad base64url, absurd sizes, unknown curve) is a ValueError for this key
    alone, and no key costs more than a normal one to parse.
    """
    kty = jwk.get("kty")
    if not isinstance(kty, str) or kty not in _PUBLIC_MEMBERS:
        raise ValueError(f"unsupported key type {kty!r}" if isinstance(kty, str) else "no key type")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise ValueError("not a signature key (use is not 'sig')")
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        raise ValueError("not a verification key (key_ops without 'verify')")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid is not a string")
    jwk_alg = jwk.get("alg")
    if jwk_alg is not None and (not isinstance(jwk_alg, str) or jwk_alg not in SUPPORTED_ALGORITHMS):
        raise ValueError(f"unsupported algorithm {jwk_alg!r}" if isinstance(jwk_alg, str) else "bad alg")
    if any(member in jwk for member in _PRIVATE_MEMBERS):
        raise ValueError("the key publishes private key material")
    public = _public_members(kty, jwk)
    try:
        # Only the public members, and the algorithm family fixed by kty and crv: PyJWK never
        # sees private members or the JWK's own alg (which narrows the algorithms below).
        parsed = PyJWK(public, algorithm=_family(kty)).key
    except (PyJWTError, ValueError, TypeError, KeyError, UnsupportedAlgorithm) as exc:
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


def _family(kty: str) -> str:
    return {"RSA": "RS256", "EC": "ES256", "OKP": "EdDSA"}[kty]


def _public_members(kty: str, jwk: Mapping[str, object]) -> dict[str, object]:
    """The JWK's public members, each a base64url string of a plausible size (else ValueError)."""
    public: dict[str, object] = {"kty": kty}
    if kty in _CURVES:
        crv = jwk.get("crv")
        if not isinstance(crv, str) or crv not in _CURVES[kty]:
            raise ValueError(f"unsupported curve {crv!r}" if isinstance(crv, str) else "no curve")
        public["crv"] = crv
    for name, max_chars in _PUBLIC_MEMBERS[kty].items():
        value = jwk.get(name)
        if not isinstance(value, str) or not value:
            raise ValueError(f"member {name!r} missing or not a string")
        if len(value) > max_chars:
            raise ValueError(f"member {name!r} too long for a {kty} key")
        if not _BASE64URL.fullmatch(value):
            raise ValueError(f"member {name!r} is not base64url")
        public[name] = value
    if kty == "RSA":
        _check_rsa_numbers(str(public["n"]), str(public["e"]))
    return public


def _check_rsa_numbers(n: str, e: str) -> None:
    modulus, exponent = _uint(n), _uint(e)
    if modulus.bit_length() > MAX_RSA_BITS:
        raise ValueError(f"RSA modulus longer than {MAX_RSA_BITS} bits")
    if exponent < 3 or exponent % 2 == 0 or exponent.bit_length() > MAX_RSA_EXPONENT_BITS:
        raise ValueError("RSA exponent is not an odd number from 3 to 2^64")


def _uint(value: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(value.rstrip("=") + "=" * (-len(value.rstrip("=")) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("bad base64url") from None
    return int.from_bytes(raw, "big")


def parse_jwks(document: object, *, source: str = "jwks") -> KeySet:
    """A JWKS document (already JSON-decoded) → the usable keys in it.

    Raises JWKSError only when the document is not a JWKS at all; a key that cannot be used is
    skipped (and logged), so one odd key never rejects the set. The same key listed twice under
    the same kid is kept once (with the algorithms of both entries): two copies of one key are
    not an ambiguous choice.
    """
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise JWKSError("not a JWKS document (an object with a 'keys' array)")
    keys: list[VerificationKey] = []
    seen: dict[tuple[str | None, bytes], int] = {}  # (kid, fingerprint) -> index in keys
    for index, jwk in enumerate(document["keys"]):
        if not isinstance(jwk, Mapping):
            # A JWK whose JSON repeats a member name is decoded as a list (fetch.decode_json).
            log.warning(
                "skipping key", extra={"fields": {"source": source, "index": index, "why": "not an object"}}
            )
            continue
        try:
            key = parse_key(jwk)
        except ValueError as exc:
            kid = jwk.get("kid") if isinstance(jwk.get("kid"), str) else None
            log.warning(
                "skipping key",
                extra={"fields": {"source": source, "index": index, "kid": kid, "why": str(exc)}},
            )
            continue
        same = seen.get((key.kid, key.fingerprint))
        if same is None:
            seen[(key.kid, key.fingerprint)] = len(keys)
            keys.append(key)
        else:
            keys[same] = replace(keys[same], algorithms=keys[same].algorithms | key.algorithms)
    return KeySet(tuple(keys))
