"""The memory backend's store: what aiocache's SimpleMemoryCache offered the shared key cache,
for one process, without importing aiocache (which imports the Redis client: ~10 MiB of every
process's resident memory, for nothing when the backend is memory).

The same calls and answers as the aiocache stores ``cache.SharedKeyCache`` uses: ``get`` (None when
absent or expired), ``set`` and ``add`` with a TTL in seconds (``add`` raises ValueError when the
key is there), ``delete``, ``close``. Holds a handful of entries per provider (a document, a lock,
a rate-limit marker); expired ones go when they are next looked at or written over.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class MemoryStore:
    """Keyword arguments the aiocache stores take (``timeout``) are accepted and have nothing to
    bound: every call returns at once."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._items: dict[str, tuple[str, float | None]] = {}  # key -> (value, expires at)

    def _live(self, key: str) -> str | None:
        item = self._items.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and self._clock() >= expires:
            del self._items[key]
            return None
        return value

    async def get(self, key: str, **_: object) -> str | None:
        return self._live(key)

    async def set(self, key: str, value: str, ttl: float | None = None, **_: object) -> bool:
        self._items[key] = (value, None if ttl is None else self._clock() + ttl)
        return True

    async def add(self, key: str, value: str, ttl: float | None = None, **_: object) -> bool:
        if self._live(key) is not None:
            raise ValueError(f"key {key!r} already exists")
        return await self.set(key, value, ttl)

    async def delete(self, key: str, **_: object) -> int:
        return 1 if self._items.pop(key, None) is not None else 0

    async def close(self) -> None:
        pass
