"""The key cache: each provider's keys, kept fresh in the background and never lost to an outage.

Per provider (``ProviderKeys``):
- Start-up: the first fetch starts at once; failures are retried with exponential backoff and
  jitter. Until keys are in, the provider's tokens get 503 with Retry-After (the token may be fine).
- Refresh: in the background every ``refresh_interval_seconds`` (or the IdP's Cache-Control
  max-age, clamped to the configured bounds), re-running OIDC discovery each time. The request
  path never waits on a routine refresh.
- Rotation: a ``kid`` missing from the cached set is unknown (401) only once an IdP fetch that
  started after it was first seen has come back without it; until then its tokens wait for such
  a fetch (within the Check's deadline and ``fetch_timeout_seconds``) or get 503 with
  Retry-After. Such fetches are single-flight and at most one per
  ``refetch_min_interval_seconds``; one the limit holds back runs as soon as it allows. A flood of
  random kids costs the IdP at most one fetch per interval (``refetch.IdpFetches``).
- Outages: a failed, slow or invalid fetch never replaces good keys; they are served until
  ``max_stale_seconds`` after the last successful fetch, then the provider fails closed (503).

Fetches go through the shared cache (``cache.SharedKeyCache``): a process first adopts a fresher
document another process stored, otherwise takes a short lock so that only one process of a
fleet fetches from the IdP while the others wait for its result. A shared document that fails
authentication (see ``cache.unseal``) is counted as ``rejected_shared`` and never waited for: the
process fetches from the IdP itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Literal

from ext_authz.config.model import ProviderSettings
from ext_authz.keys.cache import SharedKeyCache
from ext_authz.keys.fetch import Fetcher
from ext_authz.keys.jwks import VerificationKey
from ext_authz.keys.provider import KeyStats, ProviderKeys

__all__ = ["KeyStore"]


class KeyStore:
    """Every provider's keys, by provider name: the seam the identity stage calls."""

    def __init__(
        self,
        providers: tuple[ProviderSettings, ...],
        *,
        fetcher: Fetcher | None,
        cache: SharedKeyCache | None,
        readiness: Literal["all", "any"] = "all",
        clock: Callable[[], float] = time.time,
        on_change: Callable[[], None] = lambda: None,
        reuse: KeyStore | None = None,
    ) -> None:
        self._readiness = readiness
        self._on_change = on_change
        providers_keys: dict[str, ProviderKeys] = {}
        for p in providers:
            kept = reuse.hand_over(p, self._changed) if reuse is not None else None
            if kept is None:
                kept = ProviderKeys(p, fetcher, cache, clock=clock, on_change=self._changed)
            providers_keys[p.name] = kept
        self._providers: Mapping[str, ProviderKeys] = providers_keys

    def _changed(self) -> None:
        self._on_change()

    def key_now(self, provider: str, kid: str | None, alg: str) -> VerificationKey | None:
        return self._providers[provider].key_now(kid, alg)

    async def key_for(self, provider: str, kid: str | None, alg: str) -> VerificationKey:
        return await self._providers[provider].key_for(kid, alg)

    def start(self) -> None:
        """Start every remote provider's fetch-and-refresh loop (the start-up fetches run concurrently)."""
        for keys in self._providers.values():
            keys.start()

    async def first_fetches(self) -> None:
        """Wait until every provider has made its first fetch attempt (at most its fetch timeout)."""
        pending = [p for p in self._providers.values() if not p.first_attempt.is_set()]
        if pending:
            bound = max(p.policy.fetch_timeout_seconds for p in pending) + 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(bound):
                    await asyncio.gather(*(p.first_attempt.wait() for p in pending))

    def hand_over(self, provider: ProviderSettings, on_change: Callable[[], None]) -> ProviderKeys | None:
        """On a reload, the new store (``KeyStore(..., reuse=old)``) asks the old one for each
        provider's keys: when the provider's key source is unchanged, its keys, refresh loop and
        counters move to the new store (rebound to the new settings, reporting to ``on_change``).
        None: the new store fetches afresh. Which store stops them is decided only once a reload
        has put one in force (:meth:`stop`'s ``keep``): a reload abandoned halfway leaves this
        store owning all of its loops."""
        keys = self._providers.get(provider.name)
        if keys is None or not keys.same_source(provider):
            return None
        keys.rebind(provider, on_change)
        return keys

    async def stop(self, keep: KeyStore | None = None) -> None:
        """Stop every provider's loop, except those ``keep`` (the store now in force) took over."""
        kept = {id(p) for p in keep._providers.values()} if keep is not None else set()
        await asyncio.gather(*(p.stop() for p in self._providers.values() if id(p) not in kept))

    def ready(self) -> bool:
        usable = [p.usable() for p in self._providers.values()]
        return all(usable) if self._readiness == "all" else any(usable)

    def status(self) -> list[dict[str, object]]:
        """Every provider's status (`GET /debug/providers`), in config order."""
        return [p.status() for p in self._providers.values()]

    def stats(self) -> Mapping[str, KeyStats]:
        return {name: p.stats for name, p in self._providers.items()}

    def provider(self, name: str) -> ProviderKeys:
        return self._providers[name]
