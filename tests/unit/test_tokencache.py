"""The verified-token cache: hits skip verification, and never outlive exp, the key or the config."""

from __future__ import annotations

import pytest

from ext_authz import errors
from ext_authz.compiled import compile
from ext_authz.identity import Verifier
from ext_authz.keys.jwks import parse_jwks
from ext_authz.keys.static import StaticKeys
from ext_authz.model import Credential
from ext_authz.sources import HeaderToken, ParamToken
from ext_authz.tokencache import CachedToken, TokenCache
from tests.support.idp import SigningKey
from tests.support.tokens import NOW, Keys, Mint, make_settings

AUTH = HeaderToken("authorization", "Bearer ")


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def verifier(resolver: StaticKeys, clock: Clock, cache: TokenCache) -> Verifier:
    s = make_settings()
    return Verifier(s.providers, resolver, max_token_bytes=s.max_token_bytes, clock=clock, cache=cache)


async def test_second_verification_is_a_hit(resolver: StaticKeys, mint: Mint) -> None:
    cache = TokenCache(10)
    v = verifier(resolver, Clock(), cache)
    token = mint(email="a@example.com")
    first = await v.verify(Credential(token, (AUTH,)))
    second = await v.verify(Credential(token, (AUTH,)))
    assert (cache.counters.hits, cache.counters.misses, len(cache)) == (1, 1, 1)
    assert second.claims == first.claims and second.payload_segment == first.payload_segment


async def test_hits_stop_at_exp_plus_skew(resolver: StaticKeys, mint: Mint) -> None:
    clock, cache = Clock(), TokenCache(10)
    v = verifier(resolver, clock, cache)
    token = mint(exp=int(NOW) + 10)
    await v.verify(Credential(token, (AUTH,)))
    clock.now = NOW + 10 + 59
    await v.verify(Credential(token, (AUTH,)))
    clock.now = NOW + 10 + 60
    with pytest.raises(errors.TokenExpired):
        await v.verify(Credential(token, (AUTH,)))
    assert len(cache) == 0


async def test_removed_or_replaced_key_ends_the_entry(keys: Keys, mint: Mint) -> None:
    resolver = StaticKeys({"idp": parse_jwks(keys.jwks())})
    cache = TokenCache(10)
    v = verifier(resolver, Clock(), cache)
    token = mint()
    await v.verify(Credential(token, (AUTH,)))
    # The IdP replaced the key behind kid "rsa-1": the cached verdict no longer stands.
    impostor = SigningKey("rsa-1", "RS256", keys.other_rsa.private_key)
    resolver.add("idp", parse_jwks({"keys": [impostor.jwk()]}))
    with pytest.raises(errors.BadSignature):
        await v.verify(Credential(token, (AUTH,)))
    # The key left the set entirely.
    resolver.add("idp", parse_jwks({"keys": [keys.rsa.jwk()]}))
    await v.verify(Credential(token, (AUTH,)))
    resolver.add("idp", parse_jwks({"keys": [keys.ec.jwk()]}))
    with pytest.raises(errors.UnknownKey):
        await v.verify(Credential(token, (AUTH,)))
    assert len(cache) == 0


async def test_location_still_checked_on_a_hit(resolver: StaticKeys, mint: Mint) -> None:
    cache = TokenCache(10)
    v = verifier(resolver, Clock(), cache)
    token = mint()
    await v.verify(Credential(token, (AUTH,)))
    with pytest.raises(errors.TokenLocationNotAccepted):
        await v.verify(Credential(token, (ParamToken("access_token"),)))


def test_least_recently_used_entries_go_first() -> None:
    cache = TokenCache(2)
    entry = CachedToken("idp", {}, NOW + 100, "k", "RS256", b"f")
    for name in (b"a", b"b"):
        cache.put(name, entry)
    assert cache.get(b"a", NOW) is entry  # "a" is now the most recently used
    cache.put(b"c", entry)
    assert cache.get(b"b", NOW) is None
    assert cache.get(b"a", NOW) is entry and cache.get(b"c", NOW) is entry
    disabled = TokenCache(0)
    disabled.put(b"a", entry)
    assert len(disabled) == 0


async def test_pipeline_builds_the_cache_from_config(resolver: StaticKeys) -> None:
    from ext_authz.pipeline import Pipeline

    assert Pipeline(compile(make_settings()), resolver).verifier.cache is not None
    off = make_settings(token_cache={"max_entries": 0})
    assert Pipeline(compile(off), resolver).verifier.cache is None
