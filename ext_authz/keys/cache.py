"""The JWKS cache shared by worker processes and replicas (in-process memory, or Redis through
aiocache, imported only then).

What is shared is the JWKS document an IdP served, with the time it was fetched and its
Cache-Control max-age, plus two short-lived markers: a fetch lock (one process fetches while the
others wait for its result) and the unknown-``kid`` refetch rate limit. Every operation is bounded
by a short timeout, and any failure of the cache reads as "not cached" / "go ahead": Redis being
down or slow must never fail a request, only cost an extra fetch from the IdP.

Whoever can write to Redis must not be able to choose our keys. Every document is stored with an
HMAC-SHA256 (``jwks_cache.secret_file`` / ``secret_env``) over a version tag, the issuer, the key
URL, ``fetched_at``, ``max_age`` and the key set, in one canonical JSON array (sorted keys, no
white space, ASCII: the same JSON value always gives the same bytes, and different values never
do). A document without a valid MAC, for another issuer or key URL, with a non-finite or
non-numeric time, or fetched in the future beyond the provider's clock skew is ``Rejected``: the
caller counts it, ignores it and fetches from the IdP itself. The markers (lock, rate limit) are
not authenticated: forging one only delays a fetch (by at most the fetch timeout), never changes
which keys are trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard
from urllib.parse import unquote, urlsplit

from ext_authz.config.model import JwksCacheSettings
from ext_authz.keys.memorystore import MemoryStore

log = logging.getLogger(__name__)

NAMESPACE = "ext-authz:jwks"
# After an error, the cache is not asked again for this long: a dead Redis costs one timeout,
# not one per fetch.
ERROR_BACKOFF_SECONDS = 5.0


MAC_VERSION = "ext-authz/jwks-cache/v1"
# Twice the fetcher's 512 KiB cap on a JWKS: anything larger was not stored by ext-authz.
MAX_DOCUMENT_BYTES = 1 << 20
_PROCESS_SECRET = os.urandom(32)


@dataclass(frozen=True, slots=True)
class CachedDocument:
    """A key set another replica (or this one) fetched, authenticated and within its lifetime."""

    jwks: object
    fetched_at: float
    max_age: float | None


@dataclass(frozen=True, slots=True)
class Rejected:
    """A shared document that is not trusted; ``reason`` is a bounded code for logs."""

    reason: Literal["unauthenticated", "malformed", "wrong_source", "bad_time", "future"]


@dataclass(frozen=True, slots=True)
class CacheKey:
    """Which keys an entry holds: providers share one only with the same issuer and key URL."""

    issuer: str
    jwks_uri: str  # "" when the provider discovers it
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha256(f"{self.issuer}\n{self.jwks_uri}".encode()).hexdigest()[:32]
        object.__setattr__(self, "digest", digest)

    def __str__(self) -> str:
        return self.digest


def cache_key(issuer: str, jwks_uri: str | None) -> CacheKey:
    return CacheKey(issuer, jwks_uri or "")


def _canonical(value: object) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def document_mac(secret: bytes, key: CacheKey, document: CachedDocument) -> str:
    """HMAC-SHA256 over one canonical JSON array of everything that decides which keys are used."""
    message = _canonical(
        [MAC_VERSION, key.issuer, key.jwks_uri, document.fetched_at, document.max_age, document.jwks]
    )
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def seal(secret: bytes, key: CacheKey, document: CachedDocument) -> str:
    """The stored form: the document's fields beside their MAC."""
    return json.dumps(
        {
            "v": 1,
            "issuer": key.issuer,
            "jwks_uri": key.jwks_uri,
            "fetched_at": document.fetched_at,
            "max_age": document.max_age,
            "jwks": document.jwks,
            "mac": document_mac(secret, key, document),
        },
        allow_nan=False,
    )


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def unseal(secret: bytes, key: CacheKey, raw: str, *, not_after: float) -> CachedDocument | Rejected:
    """The document if ``raw`` is authentic, for ``key``, and sane in time; else why not.

    ``not_after`` is the latest acceptable ``fetched_at`` (now plus the allowed clock skew).
    The MAC is checked before any field is believed; the time checks after, since a process that
    holds the secret can still have a wrong clock.
    """
    if len(raw) > MAX_DOCUMENT_BYTES:
        return Rejected("malformed")
    try:
        entry = json.loads(raw)
        if not isinstance(entry, dict) or not isinstance(entry.get("mac"), str):
            return Rejected("unauthenticated")
        fetched_at: object = entry.get("fetched_at")
        max_age: object = entry.get("max_age")
        if not _is_number(fetched_at) or not (max_age is None or _is_number(max_age)):
            return Rejected("malformed")
        if entry.get("v") != 1 or "jwks" not in entry:
            return Rejected("malformed")
        document = CachedDocument(entry["jwks"], fetched_at, max_age)
        expected = document_mac(secret, key, document).encode("ascii")
    except (ValueError, TypeError, RecursionError):  # not JSON, NaN/Infinity, nested too deep
        return Rejected("malformed")
    if not hmac.compare_digest(expected, entry["mac"].encode("ascii", "replace")):
        return Rejected("unauthenticated")
    if (entry.get("issuer"), entry.get("jwks_uri")) != (key.issuer, key.jwks_uri):
        return Rejected("wrong_source")  # the MAC binds them anyway; this names the mistake
    try:
        when, age = float(fetched_at), None if max_age is None else float(max_age)
    except OverflowError:  # an integer beyond any float
        return Rejected("bad_time")
    if not math.isfinite(when) or not (age is None or (math.isfinite(age) and age >= 0)):
        return Rejected("bad_time")
    if when > not_after:
        return Rejected("future")
    return CachedDocument(document.jwks, when, age)


class SharedKeyCache:
    def __init__(self, settings: JwksCacheSettings, storage: Any = None) -> None:
        """`storage`: an aiocache store to share instead of a new one for `settings` (a test's two
        processes over one storage)."""
        self.backend = settings.backend
        # No secret (the memory backend, or redis built in code: the config requires one for it):
        # this process's random key, so that nothing another process stored is ever trusted.
        self._secret = settings.secret or _PROCESS_SECRET
        self._cache: Any
        if storage is not None:
            self._cache = storage
        elif settings.backend == "redis":
            assert settings.url is not None
            from aiocache import RedisCache
            from aiocache.serializers import StringSerializer

            self._cache = RedisCache(
                namespace=NAMESPACE,
                serializer=StringSerializer(),
                timeout=settings.timeout_seconds,
                create_connection_timeout=settings.timeout_seconds,
                **redis_options(settings),
            )
        else:
            self._cache = MemoryStore()
        self._broken_until = 0.0
        self.timeout_seconds = settings.timeout_seconds

    @property
    def storage(self) -> Any:
        """The aiocache store the sealed documents are kept in."""
        return self._cache

    def redis_client(self) -> Any:
        """The redis.asyncio client under a redis backend (None otherwise), for what else the
        replicas share through the same Redis (DPoP proofs seen)."""
        return getattr(self._cache, "client", None) if self.backend == "redis" else None

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

    def usable(self) -> bool:
        """False while the cache backs off after an error (then every call is a miss or a no-op)."""
        return time.monotonic() >= self._broken_until

    async def get(
        self, key: CacheKey, budget: float | None = None, *, not_after: float = math.inf
    ) -> CachedDocument | Rejected | None:
        """The shared document for ``key``: None if there is none (or the cache is down),
        ``Rejected`` if there is one that must not be trusted (see ``unseal``)."""
        if not self.usable():
            return None
        try:
            raw = await self._cache.get(f"doc:{key.digest}", timeout=self._timeout(budget))
        except UnicodeDecodeError:  # Redis answered, with bytes ext-authz never writes
            return Rejected("malformed")
        except Exception as exc:
            self._failed("get", exc)
            return None
        if not raw:
            return None
        if not isinstance(raw, str):
            return Rejected("malformed")
        return unseal(self._secret, key, raw, not_after=not_after)

    async def put(
        self, key: CacheKey, document: CachedDocument, ttl_seconds: float, budget: float | None = None
    ) -> None:
        if not self.usable():
            return
        try:
            raw = seal(self._secret, key, document)
        except (ValueError, TypeError, RecursionError):  # e.g. a NaN in the IdP's JSON: not shared
            return
        try:
            await self._cache.set(
                f"doc:{key.digest}", raw, ttl=max(1, int(ttl_seconds)), timeout=self._timeout(budget)
            )
        except Exception as exc:
            self._failed("set", exc)

    async def acquire(
        self, marker: str, key: CacheKey, ttl_seconds: float, budget: float | None = None
    ) -> bool | None:
        """Set a short-lived marker if absent: True = ours, False = someone else's, None = cache down."""
        if not self.usable():
            return None
        try:
            await self._cache.add(
                f"{marker}:{key.digest}", "1", ttl=max(1, round(ttl_seconds)), timeout=self._timeout(budget)
            )
        except ValueError:  # aiocache: the key exists
            return False
        except Exception as exc:
            self._failed("add", exc)
            return None
        return True

    async def release(self, marker: str, key: CacheKey, budget: float | None = None) -> None:
        if not self.usable():
            return
        try:
            await self._cache.delete(f"{marker}:{key.digest}", timeout=self._timeout(budget))
        except Exception as exc:
            self._failed("delete", exc)


def redis_options(settings: JwksCacheSettings) -> dict[str, Any]:
    """aiocache RedisCache arguments for the configured URL: host, port, db, ACL user and
    password, and TLS (rediss://: the server certificate and host name are verified, against
    ``ca_file`` or the system's CAs)."""
    assert settings.url is not None
    parts = urlsplit(settings.url)
    pool: dict[str, Any] = {}
    if parts.username:
        pool["username"] = unquote(parts.username)
    tls = parts.scheme == "rediss"
    if tls:
        pool.update(ssl_cert_reqs="required", ssl_check_hostname=True, ssl_ca_certs=settings.ca_file)
    return {
        "endpoint": parts.hostname,
        "port": parts.port or 6379,
        "db": int(parts.path.strip("/") or 0),
        "password": settings.password
        if settings.password is not None
        else (unquote(parts.password) if parts.password is not None else None),
        "ssl": tls,
        "connection_pool_kwargs": pool,
    }
