"""The development issuer's key directory: its signing keys and the issuer URL/audience it serves.

A key's ``kid`` is its RFC 7638 JWK thumbprint, so it is derived from the key and needs no
bookkeeping; the highest-numbered key file signs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from ext_authz import jws
from ext_authz.dev.errors import DevIssuerError

DEFAULT_KEY_DIR = Path(".ext-authz-dev")
DEFAULT_AUDIENCE = "api"
DEFAULT_ALG = "ES256"
ALGORITHMS = ("ES256", "RS256")
SETTINGS_FILE = "issuer.json"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def generate_key(alg: str) -> PrivateKey:
    if alg not in ALGORITHMS:
        raise DevIssuerError(f"--alg: {alg!r} is not one of {', '.join(ALGORITHMS)}")
    private_key = jws.generate_key(alg)
    assert isinstance(private_key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    return private_key


def _alg_of(key: object, source: Path) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048:
        return "RS256"
    raise DevIssuerError(f"{source}: not a P-256 EC or 2048+ bit RSA private key")


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638: SHA-256 over the required members, sorted, without white space."""
    required = ("crv", "kty", "x", "y") if jwk["kty"] == "EC" else ("e", "kty", "n")
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return jws.b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    alg: str
    private_key: PrivateKey

    @classmethod
    def of(cls, private_key: PrivateKey, alg: str) -> SigningKey:
        return cls(jwk_thumbprint(_public_jwk(private_key)), alg, private_key)

    def public_jwk(self) -> dict[str, Any]:
        """The public JWK (RFC 7517) with kid, use=sig and alg; never any private member."""
        jwk = _public_jwk(self.private_key)
        jwk.update({"kid": self.kid, "use": "sig", "alg": self.alg})
        return jwk


def _public_jwk(private_key: PrivateKey) -> dict[str, Any]:
    public = private_key.public_key()
    jwk: dict[str, Any] = (
        RSAAlgorithm.to_jwk(public, as_dict=True)
        if isinstance(public, rsa.RSAPublicKey)
        else ECAlgorithm.to_jwk(public, as_dict=True)
    )
    jwk.pop("key_ops", None)  # RFC 7517 §4.3: "use" and "key_ops" should not both be present
    return jwk


@dataclass(frozen=True, slots=True)
class IssuerSettings:
    issuer: str
    audience: str


class KeyDir:
    """The issuer's state on disk: signing keys and the issuer URL/audience that `mint` uses.

    Key files are written once and never changed (a new key is linked into place under the next
    free number), so readers never see a partial key and concurrent `rotate`s cannot collide.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._loaded: dict[str, SigningKey] = {}

    def all_keys(self) -> tuple[SigningKey, ...]:
        """Every key, oldest first."""
        if not self.path.is_dir():
            return ()
        found = []
        for file in sorted(self.path.glob("key-[0-9][0-9][0-9][0-9].pem")):
            key = self._loaded.get(file.name)
            if key is None:
                key = self._load(file)
                self._loaded[file.name] = key
            found.append(key)
        return tuple(found)

    def _load(self, file: Path) -> SigningKey:
        try:
            private_key = serialization.load_pem_private_key(file.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise DevIssuerError(f"{file}: cannot load the private key ({exc})") from None
        alg = _alg_of(private_key, file)
        assert isinstance(private_key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
        return SigningKey.of(private_key, alg)

    def signing_key(self) -> SigningKey:
        keys = self.all_keys()
        if not keys:
            raise DevIssuerError(
                f"{self.path}: no signing key; run `ext-authz dev-issuer serve` (or `rotate`) first"
            )
        return keys[-1]

    def add_key(self, alg: str) -> SigningKey:
        """Generate a key and make it the signing key."""
        private_key = generate_key(alg)
        pem = private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=".key-", dir=self.path)  # created with mode 0600
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
            number = len(self.all_keys()) + 1
            while True:
                try:
                    os.link(temporary, self.path / f"key-{number:04d}.pem")
                    break
                except FileExistsError:
                    number += 1
        finally:
            os.unlink(temporary)
        return SigningKey.of(private_key, alg)

    def ensure_key(self, alg: str) -> SigningKey:
        keys = self.all_keys()
        return keys[-1] if keys else self.add_key(alg)

    def settings(self) -> IssuerSettings:
        file = self.path / SETTINGS_FILE
        try:
            document = json.loads(file.read_text(encoding="utf-8"))
            return IssuerSettings(str(document["issuer"]), str(document["audience"]))
        except FileNotFoundError:
            raise DevIssuerError(
                f"{file} does not exist: run `ext-authz dev-issuer serve` once (it records its URL), "
                "or pass --issuer"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DevIssuerError(f"{file}: unreadable ({exc})") from None

    def saved_audience(self) -> str | None:
        try:
            return self.settings().audience
        except DevIssuerError:
            return None

    def write_settings(self, settings: IssuerSettings) -> None:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        document = {
            "issuer": settings.issuer,
            "audience": settings.audience,
            "warning": "ext-authz dev-issuer: development only; never trust this issuer in production",
        }
        fd, temporary = tempfile.mkstemp(prefix=".issuer-", dir=self.path)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=2)
            out.write("\n")
        os.replace(temporary, self.path / SETTINGS_FILE)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.public_jwk() for key in self.all_keys()]}
