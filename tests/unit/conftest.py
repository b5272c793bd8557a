"""Shared unit-test fixtures: signing keys, their key set and resolver, and a token minter.

The helpers they build on live in tests/support/tokens.py; test modules import them from there.
"""

from __future__ import annotations

import pytest

from ext_authz.keys.jwks import KeySet, parse_jwks
from ext_authz.keys.static import StaticKeys
from tests.support.tokens import Keys, Mint, minter


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys()


@pytest.fixture
def key_set(keys: Keys) -> KeySet:
    return parse_jwks(keys.jwks())


@pytest.fixture
def resolver(key_set: KeySet) -> StaticKeys:
    return StaticKeys({"idp": key_set})


@pytest.fixture
def mint(keys: Keys) -> Mint:
    return minter(keys)
