"""Unit-test helpers: the fixed clock, signing keys, claims, a hand-made
JWS and a config built around them (the fixtures in tests/unit/conftest.py build on these)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from ext_authz import jws
from ext_authz.config.model import Settings
from ext_authz.config.parse import parse
from tests.support.idp import SigningKey, generate_key

# The unit tests' fixed clock. Nothing here reads the machine's clock: every stage under test gets
# `clock` (tests/unit/test_fixed_clock.py runs the clock-dependent tests with the machine's clock
# years before and after NOW), so the tests pass on any date.
NOW = 1_800_000_000.0
ISSUER = "https://idp.example.com/"


class Keys:
    """One key per algorithm family, created once per session (RSA generation is slow)."""

    def __init__(self) -> None:
        self.rsa = SigningKey("rsa-1", "RS256", generate_key("RS256"))
        self.ec = SigningKey("ec-1", "ES256", generate_key("ES256"))
        self.ed = SigningKey("ed-1", "EdDSA", generate_key("EdDSA"))
        self.other_rsa = SigningKey("rsa-1", "RS256", generate_key("RS256"))  # same kid, not published

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.rsa.jwk(), self.ec.jwk(), self.ed.jwk()]}


def clock() -> float:
    return NOW


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": "api",
        "sub": "alice",
        "iat": int(NOW) - 10,
        "exp": int(NOW) + 300,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


Mint = Callable[..., str]


def minter(keys: Keys) -> Mint:
    """`mint(key=None, headers=None, **claim_overrides)`: a token signed by `key` (default RSA)."""

    def _mint(
        key: SigningKey | None = None, headers: Mapping[str, Any] | None = None, **claim_overrides: Any
    ) -> str:
        key = key or keys.rsa
        header = {"alg": key.alg, "typ": "JWT", "kid": key.kid, **(headers or {})}
        return sign_raw(header, claims(**claim_overrides), key)

    return _mint


def sign_raw(header: Mapping[str, Any], payload: Mapping[str, Any] | str, key: SigningKey) -> str:
    """A JWS over exactly these JSON texts (json.dumps of the header; the payload as given when it
    is a string), so a test controls every byte of the header and payload."""
    body = payload if isinstance(payload, str) else json.dumps(payload)
    return jws.sign(json.dumps(header).encode(), body.encode(), key.private_key, key.alg)


def make_settings(
    *, provider: Mapping[str, Any] | None = None, rules: list[Any] | None = None, **top: Any
) -> Settings:
    p: dict[str, Any] = {
        "name": "idp",
        "issuer": ISSUER,
        "audiences": ["api"],
        "jwks_uri": "https://idp.example.com/jwks",
    }
    p.update(provider or {})
    document: dict[str, Any] = {"providers": [p], **top}
    if rules is not None:
        document["rules"] = rules
    return parse(document)
