"""Adversarial review of key_now, KeySet memoization, the memory store and claim-name interning.

test_claim_names_of_an_unverified_token_are_not_interned failed before the fix (names were
interned at parse time, before any check); the others are attacks the code withstood, kept as
regression tests."""

from __future__ import annotations

import base64
import json
import secrets
import sys

import pytest

from ext_authz import errors
from ext_authz.identity import Verifier, parse_token
from ext_authz.keys.memorystore import MemoryStore
from ext_authz.keys.store import KeyStore
from ext_authz.model import Credential
from ext_authz.sources import HeaderToken
from ext_authz.tokencache import TokenCache
from tests.support.idp import SigningKey, generate_key
from tests.support.keystore import JWKS_URI, Clock, ScriptedFetcher, jwks
from tests.support.tokens import Keys, Mint, make_settings

AUTH = HeaderToken("authorization", "Bearer ")


def _seg(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def _setup(fetcher: ScriptedFetcher, clock: Clock, **policy: object) -> tuple[KeyStore, Verifier, TokenCache]:
    s = make_settings(provider={"jwks_uri": JWKS_URI, **policy})
    store = KeyStore(s.providers, fetcher=fetcher, cache=None, clock=clock)
    cache = TokenCache(100)
    v = Verifier(s.providers, store, max_token_bytes=s.max_token_bytes, clock=clock, cache=cache)
    return store, v, cache


async def _cached_then_installed(
    keys: Keys, mint: Mint, document: object
) -> tuple[Verifier, TokenCache, str]:
    """A token verified (and cached) under the RSA key, then ``document`` installed in its place."""
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    store, v, cache = _setup(fetcher, Clock())
    await store.provider("idp").refresh(from_idp=True)
    token = mint()
    await v.verify(Credential(token, (AUTH,)))
    assert len(cache) == 1
    fetcher.document = document
    assert await store.provider("idp").refresh(from_idp=True) == "installed"
    return v, cache, token


def test_claim_names_of_an_unverified_token_are_not_interned() -> None:
    """LATENT (low): _no_duplicates interns every member name of every token it parses, before
    the issuer or the signature is looked at. Where interned strings are immortal (CPython
    3.12.0-3.12.5, free-threaded builds), every anonymous request can pin up to max_token_bytes of
    names for the life of the process. Interning should wait until a token is verified/cached."""
    name = "x" + secrets.token_hex(16)
    token = f"{_seg({'alg': 'RS256'})}.{_seg({'iss': 'https://nobody/', name: 1})}.AAAA"
    parsed = parse_token(token, 8192)  # what Verifier._verify does first, for any caller
    (key,) = [k for k in parsed.claims if k.startswith("x")]
    assert sys.intern("".join(list(name))) is not key, "attacker-chosen name interned pre-verification"


async def test_rotated_out_kid_refused_on_a_cache_hit(keys: Keys, mint: Mint) -> None:
    v, cache, token = await _cached_then_installed(
        keys, mint, jwks(SigningKey("rsa-2", "RS256", generate_key("RS256")))
    )
    with pytest.raises(errors.UnknownKey):
        await v.verify(Credential(token, (AUTH,)))
    assert len(cache) == 0


async def test_same_kid_new_material_refused_on_a_cache_hit(keys: Keys, mint: Mint) -> None:
    """A memoized candidate must not survive a key set change: same kid, new key material."""
    v, _, token = await _cached_then_installed(keys, mint, jwks(keys.other_rsa))  # kid rsa-1, another key
    with pytest.raises(errors.BadSignature):
        await v.verify(Credential(token, (AUTH,)))


async def test_stale_set_refused_on_a_cache_hit_and_on_verification(keys: Keys, mint: Mint) -> None:
    clock = Clock()
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    store, v, _ = _setup(fetcher, clock, max_stale_seconds=100)
    await store.provider("idp").refresh(from_idp=True)
    token = mint(exp=int(clock.now) + 10_000)
    await v.verify(Credential(token, (AUTH,)))
    clock.now += 101
    with pytest.raises(errors.KeysUnavailable):
        await v.verify(Credential(token, (AUTH,)))  # cache hit path
    with pytest.raises(errors.KeysUnavailable):
        await v.verify(Credential(mint(sub="bob", exp=int(clock.now) + 300), (AUTH,)))


async def test_wrong_type_key_is_not_given_by_key_now(keys: Keys, mint: Mint) -> None:
    clock = Clock()
    fetcher = ScriptedFetcher({"keys": [keys.ec.jwk() | {"kid": "rsa-1"}]})  # EC key under the RSA kid
    store, v, _ = _setup(fetcher, clock)
    await store.provider("idp").refresh(from_idp=True)
    assert store.key_now("idp", "rsa-1", "RS256") is None
    with pytest.raises(errors.UnknownKey):
        await v.verify(Credential(mint(), (AUTH,)))


async def test_memory_store_lock_expires_and_is_bounded() -> None:
    now = [0.0]
    store = MemoryStore(clock=lambda: now[0])
    assert await store.add("lock:x", "1", ttl=1)
    with pytest.raises(ValueError, match="already exists"):
        await store.add("lock:x", "1", ttl=1)
    now[0] = 1.0
    assert await store.get("lock:x") is None
    assert await store.add("lock:x", "1", ttl=1)
    assert len(store._items) == 1


@pytest.mark.parametrize("cached", [False, True])
def test_duplicate_members_refused_in_header_and_payload(cached: bool) -> None:
    dup = base64.urlsafe_b64encode(b'{"alg":"RS256","alg":"none"}').rstrip(b"=").decode()
    header = dup if cached else dup + " " * 0
    body = base64.urlsafe_b64encode(b'{"iss":"a","iss":"b"}').rstrip(b"=").decode()
    for _ in range(2):  # second time: the lru_cache path
        with pytest.raises(errors.MalformedToken):
            parse_token(f"{header}.{_seg({'iss': 'a'})}.AAAA", 8192)
        with pytest.raises(errors.MalformedToken):
            parse_token(f"{_seg({'alg': 'RS256'})}.{body}.AAAA", 8192)


def test_key_now_under_concurrent_installs_never_gives_a_removed_key(keys: Keys) -> None:
    """Request threads calling key_now while installs swap the set: a key it gives is in the set
    that was installed at the time of the read (old or new), never a third."""
    import threading

    from ext_authz.keys.jwks import KeySet, parse_jwks

    clock = Clock()
    s = make_settings(provider={"jwks_uri": JWKS_URI})
    store = KeyStore(s.providers, fetcher=ScriptedFetcher(jwks(keys.rsa)), cache=None, clock=clock)
    p = store.provider("idp")
    a, b = parse_jwks(jwks(keys.rsa)), parse_jwks(jwks(keys.ec))
    p._install(a, clock(), None, source="idp", started=0.0)
    bad: list[object] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            k = p.key_now("rsa-1", "RS256")
            if k is not None and k.fingerprint != a.keys[0].fingerprint:
                bad.append(k)
            if p.key_now("ec-1", "RS256") is not None:
                bad.append("wrong type")

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(2000):
        p._keys = KeySet(a.keys) if i % 2 else KeySet(b.keys)
    stop.set()
    for t in threads:
        t.join()
    assert not bad
