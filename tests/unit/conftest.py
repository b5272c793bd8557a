"""Shared unit-test fixtures: signing keys, their key set and resolver, and a token minter.

The helpers they build on live in tests/support/tokens.py; test modules import them from there.
"""

from __future__ import annotations

import pytest

from ext_authz.keys.jwks import KeySet, parse_jwks
from tests.support.tokens import ISSUER, NOW, Keys, Mint, StaticResolver, clock, make_settings, minter

# Re-exported only for tests/unit/test_explain.py (owned by another branch), until it imports
# them from tests.support.tokens like every other test module; then this list goes.
__all__ = ["ISSUER", "NOW", "Keys", "Mint", "clock", "make_settings"]


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys()


@pytest.fixture
def key_set(keys: Keys) -> KeySet:
    return parse_jwks(keys.jwks())


@pytest.fixture
def resolver(key_set: KeySet) -> StaticResolver:
    return StaticResolver({"idp": key_set})


@pytest.fixture
def mint(keys: Keys) -> Mint:
    return minter(keys)
