"""The key cache: each provider's current KeySet, fetched once and shared by every request.

This is the seam the identity stage calls (``KeyStore.key_set``). Today it fetches at start-up and,
for a provider without keys, on demand (single-flight: concurrent requests share one fetch); a
failed fetch is not retried by requests for a short while, so an IdP outage cannot turn traffic
into a flood of fetches. Good keys are never replaced by a failed fetch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from ext_authz.errors import KeysUnavailable
from ext_authz.keys.fetch import FetchError, HttpFetcher
from ext_authz.keys.jwks import JWKSError, KeySet, parse_jwks
from ext_authz.settings import ProviderSettings, url_problem

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5


class ProviderKeys:
    def __init__(
        self, provider: ProviderSettings, fetcher: HttpFetcher | None, clock: Callable[[], float]
    ) -> None:
        self.provider = provider
        self._fetcher = fetcher
        self._clock = clock
        self._keys: KeySet | None = provider.static_keys
        self._inflight: asyncio.Task[KeySet] | None = None
        self._failed_at: float | None = None

    @property
    def keys(self) -> KeySet | None:
        return self._keys

    async def get(self) -> KeySet:
        if self._keys is not None:
            return self._keys
        if self._inflight is None and self._failed_at is not None:
            wait = self._failed_at + RETRY_AFTER_SECONDS - self._clock()
            if wait > 0:
                raise KeysUnavailable(retry_after_seconds=max(1, round(wait)))
        return await self.fetch()

    async def fetch(self) -> KeySet:
        """Fetch now, joining a fetch already under way. Raises KeysUnavailable on failure."""
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._fetch(), name=f"jwks-{self.provider.name}")
            self._inflight.add_done_callback(self._fetch_done)
        # shield: a request that gives up (deadline) must not cancel the fetch others wait on.
        return await asyncio.shield(self._inflight)

    def _fetch_done(self, task: asyncio.Task[KeySet]) -> None:
        self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved here so an unawaited failure is never reported as lost

    async def _fetch(self) -> KeySet:
        assert self._fetcher is not None, "providers without static keys have a fetcher"
        provider = self.provider
        started = time.monotonic()
        try:
            uri = provider.jwks_uri or await self._fetcher.discover_jwks_uri(provider.issuer)
            problem = url_problem(uri, allow_insecure_http=provider.allow_insecure_http)
            if problem:
                raise FetchError(f"jwks_uri {problem}")
            keys = parse_jwks(await self._fetcher.get_json(uri), source=provider.name)
            if not keys.keys:
                raise FetchError("no usable signature keys")
        except (FetchError, JWKSError) as exc:
            self._failed_at = self._clock()
            log.warning(
                "key fetch failed",
                extra={"fields": {"provider": provider.name, "error": str(exc), "ms": _ms(started)}},
            )
            if self._keys is not None:
                return self._keys  # the last good keys stay in force
            raise KeysUnavailable(retry_after_seconds=RETRY_AFTER_SECONDS) from None
        self._keys = keys
        self._failed_at = None
        log.info(
            "keys fetched",
            extra={"fields": {"provider": provider.name, "keys": len(keys), "ms": _ms(started)}},
        )
        return keys


def _ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


class KeyStore:
    """Every provider's keys, by provider name."""

    def __init__(
        self,
        providers: tuple[ProviderSettings, ...],
        fetcher: HttpFetcher | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._providers: Mapping[str, ProviderKeys] = {
            p.name: ProviderKeys(p, fetcher, clock) for p in providers
        }

    async def key_set(self, provider: str) -> KeySet:
        return await self._providers[provider].get()

    async def prefetch(self) -> None:
        """Fetch every remote provider's keys concurrently; failures are logged, not raised."""
        remote = [p for p in self._providers.values() if p.keys is None]
        await asyncio.gather(*(p.fetch() for p in remote), return_exceptions=True)

    def ready(self) -> bool:
        return all(p.keys is not None for p in self._providers.values())
