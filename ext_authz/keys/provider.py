"""One provider's keys, kept fresh in the background and never lost to an outage (``ProviderKeys``).

See ``store.py`` for the lifecycle: start-up, refresh, rotation, outages, the shared cache.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from ext_authz import deadlines
from ext_authz.config.model import ProviderSettings
from ext_authz.config.urls import url_problem
from ext_authz.errors import KeyPending, KeysUnavailable, UnknownKey
from ext_authz.handoff import on_loop
from ext_authz.keys.cache import CachedDocument, Rejected, SharedKeyCache, cache_key
from ext_authz.keys.fetch import Fetcher, FetchError
from ext_authz.keys.jwks import JWKSError, KeySet, VerificationKey, parse_jwks, select_key
from ext_authz.keys.refetch import IdpFetches

# The store's logger name: log lines keep the name they have always had.
log = logging.getLogger("ext_authz.keys.store")

BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0
PEER_POLL_SECONDS = 0.05

Result = Literal["installed", "unchanged", "failed"]


@dataclass(slots=True)
class KeyStats:
    """Counters for logs now and metrics later; label values are bounded."""

    fetches: Counter[str] = field(default_factory=Counter)  # by outcome
    kid_refetches: Counter[str] = field(default_factory=Counter)  # fetched | suppressed
    fetched_at: float | None = None  # when the keys in use were fetched from the IdP
    key_count: int = 0
    last_outcome: str | None = None  # of the last fetch (or shared-cache adoption), for status
    last_attempt_at: float | None = None
    max_stale_seconds: float = 86400.0  # the provider's (metrics: key age against it)
    static: bool = False  # inline keys: never stale

    def stale(self, now: float) -> bool:
        """The keys in use are past max_stale_seconds (inline keys never are)."""
        if self.static or self.fetched_at is None:
            return False
        return now - self.fetched_at > self.max_stale_seconds

    def ready(self, now: float) -> bool:
        """Usable keys in hand, not stale: what ProviderKeys.usable answers, and the metrics show."""
        return self.key_count > 0 and not self.stale(now)


class ProviderKeys:
    def __init__(
        self,
        provider: ProviderSettings,
        fetcher: Fetcher | None,
        cache: SharedKeyCache | None,
        *,
        clock: Callable[[], float],
        on_change: Callable[[], None],
        jitter: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.provider = provider
        self.policy = provider.keys
        self._fetcher = fetcher
        self._cache = cache
        self._clock = clock
        self._on_change = on_change
        self._jitter = jitter
        self._keys: KeySet | None = provider.static_keys
        self._static = provider.static_keys is not None
        self._fetched_at: float | None = None
        self._next_refresh_at = 0.0
        self._next_attempt_at = 0.0
        self._failures = 0
        self._idp = IdpFetches(
            self._fetch_from_idp,
            clock=clock,
            min_interval_seconds=self.policy.refetch_min_interval_seconds,
            on_kid_fetch=self._count_kid_fetch,
        )
        self._inflight: asyncio.Task[Result] | None = None
        self._inflight_from_idp = False
        self._ssl = None if self._static else ssl.create_default_context(cafile=self.policy.ca_file)
        self._cache_key = cache_key(provider.issuer, provider.jwks_uri)
        # A slow shared cache may take at most this much of a fetch's time budget per operation,
        # so that a frozen Redis cannot turn a refetch a request waits on into a 503.
        self._cache_budget = self.policy.fetch_timeout_seconds / 8
        self.stats = KeyStats(
            key_count=len(self._keys) if self._keys else 0,
            max_stale_seconds=self.policy.max_stale_seconds,
            static=self._static,
        )
        self._task: asyncio.Task[None] | None = None
        self.first_attempt = asyncio.Event()  # set once the first fetch has succeeded or failed
        if self._static:
            self.first_attempt.set()

    def same_source(self, provider: ProviderSettings) -> bool:
        """Whether a reloaded provider reads the same keys the same way (so these can be kept)."""
        mine = self.provider
        return (
            not self._static
            and provider.static_keys is None
            and (mine.issuer, mine.jwks_uri, mine.algorithms, mine.keys, mine.allow_insecure_http)
            == (
                provider.issuer,
                provider.jwks_uri,
                provider.algorithms,
                provider.keys,
                provider.allow_insecure_http,
            )
        )

    def rebind(self, provider: ProviderSettings, on_change: Callable[[], None]) -> None:
        """Serve a reloaded config's (same-source) provider, reporting to its key store."""
        self.provider = provider
        self._on_change = on_change

    # ---- the request path ----

    def usable(self) -> bool:
        return self.stats.ready(self._clock())

    def _stale(self, now: float) -> bool:
        return self.stats.stale(now)

    def _retry_after(self) -> int:
        wait = self._next_attempt_at - self._clock()
        return int(min(BACKOFF_MAX_SECONDS, max(1, math.ceil(wait))))

    @property
    def next_refresh_at(self) -> float:
        """When the next scheduled refresh is due (the store's clock); 0 before the first fetch."""
        return self._next_refresh_at

    def current(self) -> KeySet:
        """The key set in use; KeysUnavailable when there is none or it is past max_stale."""
        keys = self._keys
        if keys is None or self._stale(self._clock()):
            raise KeysUnavailable(retry_after_seconds=self._retry_after())
        return keys

    def key_now(self, kid: str | None, alg: str) -> VerificationKey | None:
        """The key, when the keys in use give exactly one at once; None: ask :meth:`key_for`,
        which gives the same key, or the wait or the error, in every other case."""
        keys = self._keys
        if keys is None or self._stale(self._clock()):
            return None
        candidates = keys.candidates(kid, alg)
        return candidates[0] if len(candidates) == 1 else None

    async def key_for(self, kid: str | None, alg: str) -> VerificationKey:
        """Runs in a request thread (see handoff.py): only what :func:`on_loop` wraps waits."""
        if self._keys is None and self._inflight is not None:
            # The first fetch is under way (start-up): worth a bounded wait rather than a 503.
            await on_loop(self._first_fetch(), busy=KeysUnavailable(retry_after_seconds=1))
        current = self.current()
        candidates = current.candidates(kid, alg)
        if candidates or kid is None or self._static or any(k.kid == kid for k in current.keys):
            # A kid the set has for another algorithm is the wrong key type, not a new key: 401.
            return select_key(candidates, kid)
        budget = deadlines.budget(self.policy.fetch_timeout_seconds)
        waited = await on_loop(self._idp.wait_for(kid, alg, budget), busy=KeyPending(retry_after_seconds=1))
        candidates = self.current().candidates(kid, alg)
        if candidates:
            return select_key(candidates, kid)
        if waited.verdict in ("fetched", "unknown"):
            raise UnknownKey()
        raise KeyPending(retry_after_seconds=waited.retry_after_seconds)

    def status(self) -> dict[str, object]:
        """What `GET /debug/providers` shows of this provider: key ids and algorithms (never
        material), where the keys come from, the last fetch, age, next refresh, stale, ready."""
        now = self._clock()
        provider, stats, keys = self.provider, self.stats, self._keys
        source = "inline" if self._static else "jwks_uri" if provider.jwks_uri else "discovery"
        age = now - stats.fetched_at if stats.fetched_at is not None else None
        return {
            "name": provider.name,
            "issuer": provider.issuer,
            "source": source,
            "ready": self.usable(),
            "stale": self._stale(now),
            "keys": [
                {"kid": key.kid, "algorithms": sorted(key.algorithms)} for key in (keys.keys if keys else ())
            ],
            "fetched_at": stats.fetched_at,
            "age_seconds": round(age, 1) if age is not None else None,
            "max_stale_seconds": self.policy.max_stale_seconds,
            "next_refresh_at": self._next_refresh_at or None,
            "last_fetch": {"outcome": stats.last_outcome, "at": stats.last_attempt_at},
            "fetches": dict(stats.fetches),
            "kid_refetches": dict(stats.kid_refetches),
        }

    def _count_kid_fetch(self, outcome: str) -> None:
        self.stats.kid_refetches[outcome] += 1

    async def _first_fetch(self) -> None:
        if self._keys is None and self._inflight is not None:
            await self._bounded(self.refresh(from_idp=self._inflight_from_idp))

    async def _bounded(self, refresh: asyncio.Future[Result]) -> Result:
        try:
            async with asyncio.timeout(deadlines.budget(self.policy.fetch_timeout_seconds)):
                return await refresh
        except TimeoutError:
            return "failed"

    # ---- fetching (single-flight) ----

    def refresh(self, *, from_idp: bool) -> asyncio.Future[Result]:
        """Join the fetch under way when it goes as far as asked, else start one. `from_idp`: fetch
        from the IdP unless the shared cache has a newer document; False: only adopt a shared one."""
        if self._inflight is None or (from_idp and not self._inflight_from_idp):
            task = asyncio.create_task(self._do_refresh(from_idp), name=f"keys-{self.provider.name}")
            task.add_done_callback(self._refresh_done)
            self._inflight, self._inflight_from_idp = task, from_idp
        # shield: a request that gives up must not cancel the fetch others are waiting on.
        return asyncio.shield(self._inflight)

    def _refresh_done(self, task: asyncio.Task[Result]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled() and task.exception() is not None:
            log.error("key refresh crashed", exc_info=task.exception())

    async def _do_refresh(self, from_idp: bool) -> Result:
        if self._cache is None:
            return await self._idp_fetch() if from_idp else "unchanged"
        shared = await self._adopt_shared()
        if shared == "installed":
            return "installed"
        if not from_idp:
            return "unchanged"
        lock_ttl = self.policy.fetch_timeout_seconds + 1
        lock = await self._cache.acquire("lock", self._cache_key, lock_ttl, budget=self._cache_budget)
        # A rejected (forged or broken) document: fetch at once rather than wait on a peer whose
        # result whoever wrote it could keep overwriting.
        if lock is False and shared != "rejected" and await self._wait_for_peer():
            return "installed"
        try:
            return await self._idp_fetch()
        finally:
            if lock:
                await self._cache.release("lock", self._cache_key, budget=self._cache_budget)

    async def _adopt_shared(self) -> Literal["installed", "no", "rejected"]:
        """Install the shared document if another process fetched it after we did."""
        assert self._cache is not None
        not_after = self._clock() + self.provider.clock_skew_seconds  # a peer's clock may be ahead
        entry = await self._cache.get(self._cache_key, budget=self._cache_budget, not_after=not_after)
        if isinstance(entry, Rejected):
            self._rejected_shared(entry.reason)
            return "rejected"
        if entry is None or (self._fetched_at is not None and entry.fetched_at <= self._fetched_at):
            return "no"
        if self._clock() - entry.fetched_at >= self._interval(entry.max_age):
            return "no"  # due for a refresh itself
        try:
            keys = self._usable_keys(entry.jwks)
        except (FetchError, JWKSError):
            return "no"
        self._install(keys, entry.fetched_at, entry.max_age, source="shared", started=time.monotonic())
        return "installed"

    def _rejected_shared(self, reason: str) -> None:
        self.stats.fetches["rejected_shared"] += 1
        log.warning(
            "ignoring a shared key document that failed verification: fetching from the IdP",
            extra={
                "fields": {
                    "provider": self.provider.name,
                    "outcome": "rejected_shared",
                    "reason": reason,
                    "backend": self._cache.backend if self._cache is not None else None,
                }
            },
        )

    async def _wait_for_peer(self) -> bool:
        """Another process holds the fetch lock: wait (bounded) for the document it stores."""
        polls = max(1, int(self.policy.fetch_timeout_seconds / PEER_POLL_SECONDS))
        for _ in range(polls):
            await asyncio.sleep(PEER_POLL_SECONDS)
            shared = await self._adopt_shared()
            if shared != "no":
                return shared == "installed"  # rejected: stop waiting, fetch ourselves
        return False

    def _usable_keys(self, document: object) -> KeySet:
        keys = parse_jwks(document, source=self.provider.name)
        usable = KeySet(tuple(k for k in keys.keys if k.algorithms & self.provider.algorithms))
        if not usable.keys:
            raise FetchError("invalid", "no usable signature keys")
        return usable

    async def _idp_fetch(self) -> Result:
        """Join the IdP fetch under way, or start one (single-flight with unknown-kid refetches)."""
        return "installed" if await self._idp.run() is not None else "failed"

    async def _discover_jwks_uri(self) -> str:
        assert self._fetcher is not None and self._ssl is not None
        provider = self.provider
        template = provider.issuer_template
        issuer, also_named = provider.issuer, tuple[str, ...]()
        if template is not None and template.discovery_issuer is not None:
            # Entra's `common` document names `.../{tenantid}/v2.0` as its issuer: the template,
            # in the IdP's spelling or ours.
            issuer = template.discovery_issuer
            also_named = (provider.issuer, provider.issuer.replace("{tenant}", "{tenantid}"))
        return await self._fetcher.discover_jwks_uri(
            issuer,
            ssl_context=self._ssl,
            allow_insecure_http=provider.allow_insecure_http,
            also_named=also_named,
        )

    async def _fetch_from_idp(self) -> KeySet | None:
        """Fetch from the IdP and install what it sent; None when the fetch failed."""
        assert self._fetcher is not None and self._ssl is not None
        provider = self.provider
        started = time.monotonic()
        # Stamped with when it started: what the IdP sent is at least that fresh, no fresher.
        fetched_at = self._clock()
        try:
            async with asyncio.timeout(self.policy.fetch_timeout_seconds):
                uri = provider.jwks_uri or await self._discover_jwks_uri()
                problem = url_problem(uri, allow_insecure_http=provider.allow_insecure_http)
                if problem:
                    raise FetchError("invalid", f"jwks_uri {problem}")
                document = await self._fetcher.get_json(
                    uri, ssl_context=self._ssl, allow_insecure_http=provider.allow_insecure_http
                )
            keys = self._usable_keys(document.body)
        except (FetchError, JWKSError, TimeoutError) as exc:
            outcome = (
                exc.outcome
                if isinstance(exc, FetchError)
                else "timeout"
                if isinstance(exc, TimeoutError)
                else "invalid"
            )
            self._failed(
                outcome, str(exc) or f"no answer within {self.policy.fetch_timeout_seconds:g} s", started
            )
            return None
        if self._fetched_at is not None and fetched_at < self._fetched_at:
            # A fresher set arrived meanwhile (adopted from a peer that fetched later): keep it,
            # so a key the IdP has removed since this fetch started is never brought back.
            log.info(
                "a fresher key set arrived during the fetch: keeping it",
                extra={"fields": {"provider": provider.name}},
            )
            return keys
        self._install(keys, fetched_at, document.max_age, source="idp", started=started)
        if self._cache is not None:
            entry = CachedDocument(document.body, fetched_at, document.max_age)
            await self._cache.put(
                self._cache_key, entry, ttl_seconds=self.policy.max_stale_seconds, budget=self._cache_budget
            )
        return keys

    def _interval(self, max_age: float | None) -> float:
        if max_age is None:
            return self.policy.refresh_interval_seconds
        return min(max(max_age, self.policy.cache_control_min_seconds), self.policy.cache_control_max_seconds)

    def _install(
        self, keys: KeySet, fetched_at: float, max_age: float | None, *, source: str, started: float
    ) -> None:
        previous = self._keys
        self._keys = keys
        self._fetched_at = fetched_at
        self._failures = 0
        # Up to 10% early, so that a fleet started together does not refresh in lockstep.
        self._next_refresh_at = fetched_at + self._interval(max_age) * self._jitter(0.9, 1.0)
        self.stats.fetches["ok" if source == "idp" else "shared"] += 1
        self.stats.last_outcome, self.stats.last_attempt_at = (
            ("ok" if source == "idp" else "shared"),
            self._clock(),
        )
        self.stats.fetched_at = fetched_at
        self.stats.key_count = len(keys)
        log.info(
            "keys fetched",
            extra={
                "fields": {
                    "provider": self.provider.name,
                    "outcome": "ok",
                    "source": source,
                    "keys": len(keys),
                    "kids": [k.kid for k in keys.keys],
                    "ms": _ms(started),
                    "changed": previous is None or previous.keys != keys.keys,
                }
            },
        )
        self._on_change()

    def _failed(self, outcome: str, error: str, started: float) -> None:
        self.stats.fetches[outcome] += 1
        self.stats.last_outcome, self.stats.last_attempt_at = outcome, self._clock()
        age = None if self._fetched_at is None else round(self._clock() - self._fetched_at)
        log.warning(
            "key fetch failed",
            extra={
                "fields": {
                    "provider": self.provider.name,
                    "outcome": outcome,
                    "error": error,
                    "ms": _ms(started),
                    "serving_last_good_keys": self.usable(),
                    "keys_age_seconds": age,
                }
            },
        )

    def start(self) -> None:
        """Begin the first fetch now (so that early requests can wait on it) and the refresh loop."""
        if self._static or self._task is not None:
            return
        self.refresh(from_idp=True)
        self._task = asyncio.create_task(self.run(), name=f"keys-loop-{self.provider.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.cancel_fetch()

    def cancel_fetch(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()
        self._idp.stop()

    # ---- the background loop ----

    async def run(self) -> None:
        """Fetch now, then keep the keys fresh until cancelled."""
        while True:
            if self._failures == 0 and self._keys is not None:
                delay = self._next_refresh_at - self._clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                    continue  # a rotation refetch may have moved the schedule meanwhile
            result = await self.refresh(from_idp=True)
            self.first_attempt.set()
            if result == "installed":
                continue
            self._failures += 1
            backoff = min(BACKOFF_FIRST_SECONDS * 2 ** (self._failures - 1), self._backoff_cap())
            delay = backoff * self._jitter(0.5, 1.0)
            self._next_attempt_at = self._clock() + delay
            self._on_change()  # readiness may have changed: keys may have gone stale
            await asyncio.sleep(delay)

    def _backoff_cap(self) -> float:
        return min(BACKOFF_MAX_SECONDS, self.policy.refresh_interval_seconds)


def _ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
