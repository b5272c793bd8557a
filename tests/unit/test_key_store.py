"""The key cache with an injected clock and a scripted fetcher: rotation, rate limits, outages,
staleness, Cache-Control and the shared cache's lock and adoption."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from ext_authz import errors
from ext_authz.config.model import JwksCacheSettings
from ext_authz.keys.cache import CachedDocument, SharedKeyCache, cache_key
from ext_authz.keys.fetch import FetchError
from ext_authz.keys.provider import ProviderKeys
from tests.support.idp import SigningKey, generate_key
from tests.support.keystore import (
    JWKS_URI,
    Clock,
    ScriptedFetcher,
    jwks,
    make,
    memory_cache,
    provider,
    started,
)
from tests.support.tokens import ISSUER, NOW, Keys


async def test_first_fetch_and_lookup(keys: Keys) -> None:
    fetcher = ScriptedFetcher(jwks(keys.rsa, keys.ec))
    store = await started(make(fetcher, Clock()))
    assert (await store.key_for("rsa-1", "RS256")).kid == "rsa-1"
    assert (await store.key_for("ec-1", "ES256")).kid == "ec-1"
    assert store.stats.fetches["ok"] == 1 and store.stats.key_count == 2


async def test_requests_wait_for_the_first_fetch(keys: Keys) -> None:
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    fetcher.delay = 0.05
    store = make(fetcher, Clock())
    store.refresh(from_idp=True)  # as start() does
    assert (await store.key_for("rsa-1", "RS256")).kid == "rsa-1"
    assert fetcher.jwks_fetches == 1


async def test_no_keys_is_503_with_retry_after(keys: Keys) -> None:
    fetcher = ScriptedFetcher(FetchError("http_error", "HTTP 500"))
    store = await started(make(fetcher, Clock()))
    with pytest.raises(errors.KeysUnavailable) as caught:
        await store.key_for("rsa-1", "RS256")
    assert caught.value.retry_after_seconds >= 1
    assert store.stats.fetches["http_error"] == 1
    assert not store.usable()


async def test_rotation_refetch_single_flight_and_rate_limited(keys: Keys) -> None:
    clock = Clock()
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    store = await started(make(fetcher, clock, refetch_min_interval_seconds=30))
    new = SigningKey("rsa-2", "RS256", keys.other_rsa.private_key)
    fetcher.document = jwks(keys.rsa, new)
    fetcher.delay = 0.01
    # Many concurrent requests for unknown kids share one refetch.
    results = await asyncio.gather(
        *(store.key_for(kid, "RS256") for kid in ["rsa-2"] * 5 + [f"random-{i}" for i in range(100)]),
        return_exceptions=True,
    )
    assert fetcher.jwks_fetches == 2  # start-up + one refetch
    assert all(getattr(r, "kid", None) == "rsa-2" for r in results[:5])
    assert all(isinstance(r, errors.UnknownKey) for r in results[5:])
    assert store.stats.kid_refetches["fetched"] == 1
    # Kids a fetch after their first sighting lacked are unknown: 401 at once, no fetch.
    for kid in ("random-1", "random-2"):
        with pytest.raises(errors.UnknownKey):
            await store.key_for(kid, "RS256")
    assert fetcher.jwks_fetches == 2
    # A kid first seen now needs a fetch the rate limit holds back (past this request's wait):
    # 503 with Retry-After until then, never a 401 that might be wrong.
    for _ in range(2):
        with pytest.raises(errors.KeyPending) as caught:
            await store.key_for("another", "RS256")
        assert 30 <= caught.value.retry_after_seconds <= 31
    assert fetcher.jwks_fetches == 2
    assert store.stats.kid_refetches["suppressed"] == 2
    # After the interval, one more refetch is allowed: it lacks "another", which is now unknown.
    clock.now += 31
    with pytest.raises(errors.UnknownKey):
        await store.key_for("another", "RS256")
    assert fetcher.jwks_fetches == 3
    store.cancel_fetch()


async def test_kid_without_refetch_when_no_kid_or_static(keys: Keys) -> None:
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    store = await started(make(fetcher, Clock()))
    with pytest.raises(errors.UnknownKey):
        await store.key_for(None, "ES256")
    assert fetcher.jwks_fetches == 1


async def test_failed_refresh_keeps_good_keys_until_max_stale(keys: Keys) -> None:
    clock = Clock()
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    store = await started(make(fetcher, clock, max_stale_seconds=100))
    failures: list[object] = [
        FetchError("http_error", "HTTP 500"),
        FetchError("invalid", "response is not JSON"),
        {"keys": []},
        {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]},
        ["not", "a", "jwks"],
    ]
    for failure in failures:
        fetcher.document = failure
        clock.now += 10
        assert await store.refresh(from_idp=True) == "failed"
        assert (await store.key_for("rsa-1", "RS256")).kid == "rsa-1"
    clock.now += 51  # 101 s after the last good fetch
    assert not store.usable()
    with pytest.raises(errors.KeysUnavailable):
        await store.key_for("rsa-1", "RS256")
    fetcher.document = jwks(keys.rsa)
    assert await store.refresh(from_idp=True) == "installed"
    assert store.usable()


async def test_failed_refetch_of_unknown_kid_is_503(keys: Keys) -> None:
    clock = Clock()
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    store = await started(make(fetcher, clock))
    fetcher.document = FetchError("timeout", "slow")
    with pytest.raises(errors.KeysUnavailable):
        await store.key_for("rsa-2", "RS256")
    # Rate-limited afterwards, but the token may be fine: still 503, not 401.
    with pytest.raises(errors.KeysUnavailable):
        await store.key_for("rsa-3", "RS256")
    assert fetcher.jwks_fetches == 2


async def test_slow_fetch_is_bounded(keys: Keys) -> None:
    clock = Clock()
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    store = await started(make(fetcher, clock, fetch_timeout_seconds=0.1))
    fetcher.delay = 10
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(errors.KeysUnavailable):
        await store.key_for("rsa-2", "RS256")
    assert loop.time() - began < 1
    assert (await store.key_for("rsa-1", "RS256")).kid == "rsa-1"
    store.cancel_fetch()


async def test_removed_key_stops_at_next_refresh(keys: Keys) -> None:
    fetcher = ScriptedFetcher(jwks(keys.rsa, keys.ec))
    store = await started(make(fetcher, Clock(), refetch_min_interval_seconds=3600))
    fetcher.document = jwks(keys.ec)
    assert await store.refresh(from_idp=True) == "installed"
    with pytest.raises(errors.UnknownKey):
        await store.key_for("rsa-1", "RS256")


@pytest.mark.parametrize(
    ("max_age", "expected"),
    [(None, 600), (1, 60), (300, 300), (100_000, 3600), (0, 60)],
)
async def test_refresh_schedule_honours_cache_control(
    keys: Keys, max_age: float | None, expected: float
) -> None:
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    fetcher.max_age = max_age
    store = await started(make(fetcher, Clock()))
    assert store.next_refresh_at - NOW == expected


async def test_discovery_runs_on_every_fetch(keys: Keys) -> None:
    p = dataclasses.replace(provider(), jwks_uri=None)  # no jwks_uri: discovery
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    store = ProviderKeys(p, fetcher, None, clock=Clock(), on_change=lambda: None)
    await started(store)
    await store.refresh(from_idp=True)
    assert fetcher.discoveries == 2 and fetcher.jwks_fetches == 2


async def test_on_change_is_called(keys: Keys) -> None:
    calls: list[bool] = []
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    store = make(fetcher, Clock(), on_change=lambda: calls.append(True))
    await started(store)
    assert calls


# ---- the shared cache ----


async def test_second_process_adopts_the_shared_document(keys: Keys) -> None:
    cache = memory_cache()
    first_fetcher, second_fetcher = ScriptedFetcher(jwks(keys.rsa)), ScriptedFetcher(jwks(keys.rsa))
    await started(make(first_fetcher, Clock(), cache))
    second = await started(make(second_fetcher, Clock(), cache))
    assert (first_fetcher.jwks_fetches, second_fetcher.jwks_fetches) == (1, 0)
    assert second.stats.fetches["shared"] == 1
    assert (await second.key_for("rsa-1", "RS256")).kid == "rsa-1"


async def test_waits_for_the_lock_holder_then_adopts(keys: Keys) -> None:
    cache = memory_cache()
    clock = Clock()
    key = cache_key(ISSUER, JWKS_URI)
    assert await cache.acquire("lock", key, 5) is True  # another process is fetching
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    store = make(fetcher, clock, cache, fetch_timeout_seconds=2)
    refresh = asyncio.ensure_future(store.refresh(from_idp=True))
    await asyncio.sleep(0.12)
    await cache.put(key, CachedDocument(jwks(keys.rsa), clock() + 1, None), ttl_seconds=60)
    assert await refresh == "installed"
    assert fetcher.jwks_fetches == 0


async def test_fetches_itself_when_the_lock_holder_never_delivers(keys: Keys) -> None:
    cache = memory_cache()
    assert await cache.acquire("lock", cache_key(ISSUER, JWKS_URI), 5) is True
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    store = await started(make(fetcher, Clock(), cache, fetch_timeout_seconds=0.2))
    assert fetcher.jwks_fetches == 1 and store.usable()


async def test_redis_down_falls_back_to_direct_fetch(keys: Keys) -> None:
    # Nothing listens on port 1: every cache operation fails at once.
    cache = SharedKeyCache(JwksCacheSettings("redis", "redis://127.0.0.1:1/0", 0.2))
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    store = await started(make(fetcher, Clock(), cache))
    assert fetcher.jwks_fetches == 1
    assert (await store.key_for("rsa-1", "RS256")).kid == "rsa-1"
    await cache.close()


async def test_stale_shared_document_is_not_adopted(keys: Keys) -> None:
    cache = memory_cache()
    clock = Clock()
    old = SigningKey("old", "RS256", generate_key("RS256"))
    entry = CachedDocument(jwks(old), clock() - 700, None)  # older than the 600 s interval
    await cache.put(cache_key(ISSUER, JWKS_URI), entry, ttl_seconds=60)
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    store = await started(make(fetcher, clock, cache))
    assert fetcher.jwks_fetches == 1
    assert (await store.key_for("rsa-1", "RS256")).kid == "rsa-1"


# ---- odd keys and the URL policy ----


async def test_an_odd_key_beside_a_good_one_leaves_the_provider_ready(keys: Keys) -> None:
    odd = {"kty": "EC", "crv": "P-999", "kid": "odd", "x": "AA", "y": "AA"}
    fetcher = ScriptedFetcher({"keys": [odd, keys.rsa.jwk(), {"kty": "RSA", "kid": 7, "n": None}]})
    store = await started(make(fetcher, Clock()))
    assert store.usable()
    assert (await store.key_for("rsa-1", "RS256")).kid == "rsa-1"
    assert store.stats.fetches["ok"] == 1 and store.stats.key_count == 1


@pytest.mark.parametrize("allow_insecure_http", [False, True])
async def test_the_providers_http_policy_reaches_every_fetch(keys: Keys, allow_insecure_http: bool) -> None:
    p = dataclasses.replace(provider(allow_insecure_http=allow_insecure_http), jwks_uri=None)
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    await started(ProviderKeys(p, fetcher, None, clock=Clock(), on_change=lambda: None))
    assert fetcher.allow_insecure_http == [allow_insecure_http, allow_insecure_http]  # discovery, JWKS


async def test_key_now_gives_key_fors_key_or_leaves_the_case_to_it(keys: Keys) -> None:
    """The request path's shortcut: a key only where key_for gives that very key at once; None
    before the first fetch, for an unknown kid, a wrong algorithm, and past max_stale."""
    clock = Clock()
    fetcher = ScriptedFetcher(jwks(keys.rsa, keys.ec))
    store = make(fetcher, clock, max_stale_seconds=100)
    assert store.key_now("rsa-1", "RS256") is None  # no keys yet
    await started(store)
    for kid, alg in (("rsa-1", "RS256"), ("ec-1", "ES256")):
        now = store.key_now(kid, alg)
        assert now is not None and now is await store.key_for(kid, alg)
    assert store.key_now("ec-1", "RS256") is None  # the wrong type: key_for refuses it
    with pytest.raises(errors.UnknownKey):
        await store.key_for("ec-1", "RS256")
    assert store.key_now("new-kid", "RS256") is None  # unknown: key_for decides (refetch)
    assert store.key_now(None, "RS256") is not None  # one RSA key fits
    clock.now += 101
    assert store.key_now("rsa-1", "RS256") is None  # past max_stale: key_for's 503
    with pytest.raises(errors.KeysUnavailable):
        await store.key_for("rsa-1", "RS256")
