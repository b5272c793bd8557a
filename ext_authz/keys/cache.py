"""The JWKS cache shared by worker processes and replicas (aiocache: in-process memory or Redis).

What is shared is the JWKS document an IdP served, with the time it was fetched and its
Cache-Control max-age, plus two short-lived markers: a fetch lock (one process fetches while the
others wait for its result) and the unknown-``kid`` refetch rate limit. Every operation is bounded
by a short timeout, and any failure of the cache reads as "not cached" / "go ahead": Redis being
down or slow must never fail a request, only cost an extra fetch from the IdP.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiocache import RedisCache, SimpleMemoryCache
from aiocache.serializers import StringSerializer

from ext_authz.settings import JwksCacheSettings

log = logging.getLogger(__name__)

NAMESPACE = "ext-authz:jwks"
# After an error, the cache is not asked again for this long: a dead Redis costs one timeout,
# not one per fetch.
ERROR_BACKOFF_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class CachedDocument:
    jwks: object
    fetched_at: float
    max_age: float | None


def cache_key(issuer: str, jwks_uri: str | None) -> str:
    """Providers share an entry only when they read the same keys (same issuer and source)."""
    return hashlib.sha256(f"{issuer}\n{jwks_uri or ''}".encode()).hexdigest()[:32]


class SharedKeyCache:
    def __init__(self, settings: JwksCacheSettings) -> None:
        self.backend = settings.backend
        self._cache: Any
        if settings.backend == "redis":
            assert settings.url is not None
            parts = urlsplit(settings.url)
            self._cache = RedisCache(
                endpoint=parts.hostname,
                port=parts.port or 6379,
                db=int(parts.path.strip("/") or 0),
                password=parts.password,
                ssl=parts.scheme == "rediss",
                namespace=NAMESPACE,
                serializer=StringSerializer(),
                timeout=settings.timeout_seconds,
                create_connection_timeout=settings.timeout_seconds,
            )
        else:
            self._cache = SimpleMemoryCache(namespace=NAMESPACE, serializer=StringSerializer())
        self._broken_until = 0.0
        self.timeout_seconds = settings.timeout_seconds

    def _timeout(self, budget: float | None) -> float:
        return self.timeout_seconds if budget is None else min(self.timeout_seconds, budget)

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a dead connection is not worth a log line
            await self._cache.close()

    def _failed(self, operation: str, exc: BaseException) -> None:
        if time.monotonic() >= self._broken_until:
            log.warning(
                "shared key cache unavailable: fetching directly and keeping keys in memory",
                extra={
                    "fields": {"backend": self.backend, "operation": operation, "error": type(exc).__name__}
                },
            )
        self._broken_until = time.monotonic() + ERROR_BACKOFF_SECONDS

    def _usable(self) -> bool:
        return time.monotonic() >= self._broken_until

    async def get(self, key: str, budget: float | None = None) -> CachedDocument | None:
        if not self._usable():
            return None
        try:
            raw = await self._cache.get(f"doc:{key}", timeout=self._timeout(budget))
        except Exception as exc:
            self._failed("get", exc)
            return None
        if not raw:
            return None
        try:
            entry = json.loads(raw)
            max_age = entry.get("max_age")
            return CachedDocument(
                entry["jwks"], float(entry["fetched_at"]), None if max_age is None else float(max_age)
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning(
                "ignoring a malformed shared cache entry", extra={"fields": {"backend": self.backend}}
            )
            return None

    async def put(
        self, key: str, document: CachedDocument, ttl_seconds: float, budget: float | None = None
    ) -> None:
        if not self._usable():
            return
        raw = json.dumps(
            {"jwks": document.jwks, "fetched_at": document.fetched_at, "max_age": document.max_age}
        )
        try:
            await self._cache.set(
                f"doc:{key}", raw, ttl=max(1, int(ttl_seconds)), timeout=self._timeout(budget)
            )
        except Exception as exc:
            self._failed("set", exc)

    async def acquire(
        self, marker: str, key: str, ttl_seconds: float, budget: float | None = None
    ) -> bool | None:
        """Set a short-lived marker if absent: True = ours, False = someone else's, None = cache down."""
        if not self._usable():
            return None
        try:
            await self._cache.add(
                f"{marker}:{key}", "1", ttl=max(1, round(ttl_seconds)), timeout=self._timeout(budget)
            )
        except ValueError:  # aiocache: the key exists
            return False
        except Exception as exc:
            self._failed("add", exc)
            return None
        return True

    async def release(self, marker: str, key: str, budget: float | None = None) -> None:
        if not self._usable():
            return
        try:
            await self._cache.delete(f"{marker}:{key}", timeout=self._timeout(budget))
        except Exception as exc:
            self._failed("delete", exc)
