"""Issue 11 item 13: a key published just after a fetch is never refused.

A ``kid`` is unknown (401) only when an IdP fetch that started after it was first seen did not
contain it; until then its tokens wait for such a fetch within their deadline or get 503 with
Retry-After. The IdP here publishes what ``document`` holds when a request reaches it, so a
rotation placed while a fetch is under way is invisible to that fetch, as over a real network.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time

import pytest

from ext_authz import deadlines, errors
from ext_authz.config.model import JwksCacheSettings
from ext_authz.keys.cache import CachedDocument, CacheKey, Rejected, SharedKeyCache, cache_key
from ext_authz.keys.fetch import FetchError
from tests.support.idp import SigningKey
from tests.support.keystore import JWKS_URI, Clock, ScriptedFetcher, jwks, make, memory_cache, started
from tests.support.tokens import ISSUER, Keys


class RunningClock(Clock):
    """Wall-clock seconds from the fixed test epoch: rate-limit timers really fire."""

    def __init__(self) -> None:
        super().__init__()
        self._origin = time.monotonic()

    def __call__(self) -> float:
        return self.now + (time.monotonic() - self._origin)


def rotated(keys: Keys) -> SigningKey:
    return SigningKey("rsa-2", "RS256", keys.other_rsa.private_key)


async def test_a_kid_seen_while_a_fetch_is_under_way_waits_for_the_next(keys: Keys) -> None:
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    store = await started(make(fetcher, Clock()))
    fetcher.delay = 0.05
    routine = asyncio.ensure_future(store.refresh(from_idp=True))  # the IdP answers with the old set
    await asyncio.sleep(0.01)
    fetcher.document = jwks(keys.rsa, rotated(keys))  # published just after that fetch began
    assert (await store.key_for("rsa-2", "RS256")).kid == "rsa-2"
    assert await routine == "installed"
    assert fetcher.jwks_fetches == 3  # start-up, the routine refresh, one refetch for rsa-2
    store.cancel_fetch()


class SlowCache(SharedKeyCache):
    """A shared cache whose reads take a while (a busy Redis)."""

    async def get(
        self, key: CacheKey, budget: float | None = None, *, not_after: float = math.inf
    ) -> CachedDocument | Rejected | None:
        await asyncio.sleep(0.05)
        return await super().get(key, budget, not_after=not_after)


async def test_adopting_a_shared_document_never_makes_a_kid_unknown(keys: Keys) -> None:
    # Worker A stored the set just before the rotation; worker B's refresh is adopting it when a
    # token signed with the new key arrives (the chaos run's 10 s of 401s).
    clock = Clock()
    cache = SlowCache(JwksCacheSettings())
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    worker_b = await started(make(fetcher, clock, cache))
    clock.now += 700  # B's refresh is due ...
    await cache.put(
        cache_key(ISSUER, JWKS_URI), CachedDocument(jwks(keys.rsa), clock.now - 0.5, None), ttl_seconds=60
    )  # ... and A stored the pre-rotation set half a second ago
    fetcher.document = jwks(keys.rsa, rotated(keys))
    fetcher.delay = 0.1  # the IdP is slower than Redis: the adoption lands first
    adopting = asyncio.ensure_future(worker_b.refresh(from_idp=True))
    await asyncio.sleep(0.01)
    assert (await worker_b.key_for("rsa-2", "RS256")).kid == "rsa-2"
    assert await adopting == "installed"
    assert worker_b.stats.fetches["shared"] == 1  # it did adopt A's set, and still fetched itself
    worker_b.cancel_fetch()


async def test_a_refetch_held_back_by_the_limit_runs_when_the_limit_allows(keys: Keys) -> None:
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    store = await started(make(fetcher, RunningClock(), refetch_min_interval_seconds=0.3))
    with pytest.raises(errors.UnknownKey):
        await store.key_for("junk", "RS256")  # spends the refetch of this interval
    fetcher.document = jwks(keys.rsa, rotated(keys))
    began = time.monotonic()
    # Within the request's wait: it waits for the held-back fetch and gets the key.
    assert (await store.key_for("rsa-2", "RS256")).kid == "rsa-2"
    assert 0.2 < time.monotonic() - began < 2
    assert fetcher.jwks_fetches == 3
    store.cancel_fetch()


async def test_a_held_back_refetch_runs_even_after_its_requests_gave_up(keys: Keys) -> None:
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    store = await started(
        make(fetcher, RunningClock(), refetch_min_interval_seconds=0.3, fetch_timeout_seconds=0.1)
    )
    with pytest.raises(errors.UnknownKey):
        await store.key_for("junk", "RS256")
    fetcher.document = jwks(keys.rsa, rotated(keys))
    with pytest.raises(errors.KeyPending) as caught:
        await store.key_for("rsa-2", "RS256")  # the next fetch is past this request's wait
    assert caught.value.retry_after_seconds >= 1 and caught.value.status == 503
    await asyncio.sleep(0.5)  # no request in the meantime
    assert fetcher.jwks_fetches == 3
    assert (await store.key_for("rsa-2", "RS256")).kid == "rsa-2"
    assert fetcher.jwks_fetches == 3
    store.cancel_fetch()


async def test_the_checks_deadline_bounds_the_wait(keys: Keys) -> None:
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    store = await started(make(fetcher, RunningClock(), refetch_min_interval_seconds=0.5))
    with pytest.raises(errors.UnknownKey):
        await store.key_for("junk", "RS256")

    async def check() -> float:
        deadlines.start(0.1)  # Envoy's timeout, as the servicer records it
        began = time.monotonic()
        with pytest.raises(errors.KeyPending):
            await store.key_for("rsa-2", "RS256")
        return time.monotonic() - began

    # Answered before Envoy gives up (at once: the next fetch is past the deadline).
    assert await asyncio.create_task(check()) < 0.1
    store.cancel_fetch()


async def test_an_unknown_verdict_stands_one_interval(keys: Keys) -> None:
    clock = Clock()
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    store = await started(make(fetcher, clock, refetch_min_interval_seconds=30))
    for _ in range(3):
        with pytest.raises(errors.UnknownKey):
            await store.key_for("rsa-2", "RS256")  # sent before the IdP publishes it
    assert fetcher.jwks_fetches == 2
    fetcher.document = jwks(keys.rsa, rotated(keys))
    clock.now += 31  # the verdict is one interval old: seen anew, fetched again
    assert (await store.key_for("rsa-2", "RS256")).kid == "rsa-2"
    assert fetcher.jwks_fetches == 3
    store.cancel_fetch()


async def test_a_failed_fetch_after_first_sighting_is_503_then_retried(keys: Keys) -> None:
    clock = Clock()
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    store = await started(make(fetcher, clock, refetch_min_interval_seconds=30))
    fetcher.document = FetchError("http_error", "HTTP 502")
    with pytest.raises(errors.KeyPending) as caught:
        await store.key_for("rsa-2", "RS256")
    assert 30 <= caught.value.retry_after_seconds <= 31
    fetcher.document = jwks(keys.rsa, rotated(keys))
    with pytest.raises(errors.KeyPending):
        await store.key_for("rsa-2", "RS256")  # within the interval: no new fetch
    assert fetcher.jwks_fetches == 2
    clock.now += 31
    assert (await store.key_for("rsa-2", "RS256")).kid == "rsa-2"
    store.cancel_fetch()


async def test_a_flood_of_random_kids_costs_one_fetch_per_interval_and_never_allows(keys: Keys) -> None:
    interval = 0.1
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    fetcher.delay = 0.005
    store = await started(
        make(fetcher, RunningClock(), refetch_min_interval_seconds=interval, fetch_timeout_seconds=0.05)
    )
    junk = itertools.count()
    began = time.monotonic()
    outcomes: list[object] = []
    while time.monotonic() - began < 1.0:
        batch = [store.key_for(f"junk-{next(junk)}", "RS256") for _ in range(20)]
        outcomes += await asyncio.gather(*batch, return_exceptions=True)
        await asyncio.sleep(0.005)
    elapsed = time.monotonic() - began
    assert all(isinstance(o, errors.UnknownKey | errors.KeyPending) for o in outcomes)
    assert any(isinstance(o, errors.UnknownKey) for o in outcomes)
    kid_fetches = fetcher.jwks_fetches - 1
    assert kid_fetches <= elapsed / interval + 2
    assert store.stats.kid_refetches["fetched"] == kid_fetches
    store.cancel_fetch()


@pytest.mark.parametrize("offset", [0.0, 0.002, 0.01, 0.03, 0.06])
async def test_rotations_placed_right_after_a_fetch_never_get_a_401(keys: Keys, offset: float) -> None:
    """The chaos run's timing, swept: the IdP rotates ``offset`` s into a fetch, a token signed
    with the new key arrives right after; the refetch budget is spent on junk beforehand."""
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    fetcher.delay = 0.02
    store = await started(make(fetcher, RunningClock(), refetch_min_interval_seconds=0.2))
    with pytest.raises(errors.UnknownKey):
        await store.key_for("junk", "RS256")
    routine = asyncio.ensure_future(store.refresh(from_idp=True))
    await asyncio.sleep(offset)
    fetcher.document = jwks(keys.rsa, rotated(keys))
    results = await asyncio.gather(
        *(store.key_for("rsa-2", "RS256") for _ in range(5)), return_exceptions=True
    )
    assert all(getattr(r, "kid", None) == "rsa-2" for r in results), results
    await routine
    store.cancel_fetch()


async def test_a_slow_fetch_never_replaces_a_fresher_adopted_set(keys: Keys) -> None:
    # Found by the attacker review: a refetch for a junk kid starts while the IdP still lists a
    # key; the IdP removes it; a routine refresh adopts a peer's later set without it; the slow
    # refetch then lands. It must not bring the removed key back (here or, via Redis, elsewhere).
    clock = Clock()
    cache = memory_cache()
    fetcher = ScriptedFetcher(jwks(keys.rsa, rotated(keys)))
    store = await started(make(fetcher, clock, cache))
    fetcher.delay = 0.1
    junk = asyncio.ensure_future(store.key_for("junk", "RS256"))  # the IdP answers with both keys
    await asyncio.sleep(0.02)
    clock.now += 1
    await cache.put(
        cache_key(ISSUER, JWKS_URI), CachedDocument(jwks(rotated(keys)), clock.now, None), ttl_seconds=60
    )  # a peer fetched after the removal of rsa-1
    assert await store.refresh(from_idp=False) == "installed"
    with pytest.raises(errors.UnknownKey):
        await junk
    with pytest.raises(errors.AuthError):
        await store.key_for("rsa-1", "RS256")
    stored = await cache.get(cache_key(ISSUER, JWKS_URI))
    assert isinstance(stored, CachedDocument) and stored.jwks == jwks(rotated(keys))
    store.cancel_fetch()


async def test_a_known_kid_under_another_algorithm_is_refused_at_once(keys: Keys) -> None:
    fetcher = ScriptedFetcher(jwks(keys.rsa))
    store = await started(make(fetcher, Clock()))
    for _ in range(3):
        with pytest.raises(errors.UnknownKey):
            await store.key_for("rsa-1", "ES256")  # an ES256 token naming the RSA key's kid
    assert fetcher.jwks_fetches == 1
