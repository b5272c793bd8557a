"""Verified tokens, so that a token seen again skips parsing, signature and claim checks.

Keyed by a digest of the token. An entry is used only while the token has not expired (with the
provider's skew), while the key that verified it is still the one the provider's current key set
gives for the token's kid and alg, and only within one config (a reload builds a new cache). Rules
still run on every request: they depend on the request. Bounded: least recently used entries go
first.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CachedToken:
    provider: str
    claims: Mapping[str, object]
    expires: float  # exp + the provider's clock skew: unusable at or after this time
    kid: str | None
    alg: str
    key_fingerprint: bytes


@dataclass(slots=True)
class CacheCounters:
    """Lookups by result; kept across config reloads (each reload starts an empty cache)."""

    hits: int = 0
    misses: int = 0


class TokenCache:
    def __init__(self, max_entries: int, counters: CacheCounters | None = None) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, CachedToken] = OrderedDict()
        self.counters = counters or CacheCounters()

    @staticmethod
    def digest(token: str) -> bytes:
        return hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    # Request threads share one cache: each step below is one operation on the OrderedDict (atomic
    # under the GIL), and a step that finds the entry gone meanwhile (another thread evicted or
    # discarded it) changes nothing about the answer.

    def get(self, digest: bytes, now: float) -> CachedToken | None:
        entry = self._entries.get(digest)
        if entry is None:
            self.counters.misses += 1
            return None
        if now >= entry.expires:
            self._entries.pop(digest, None)
            self.counters.misses += 1
            return None
        with contextlib.suppress(KeyError):
            self._entries.move_to_end(digest)
        self.counters.hits += 1
        return entry

    def put(self, digest: bytes, entry: CachedToken) -> None:
        if self.max_entries <= 0:
            return
        self._entries[digest] = entry
        with contextlib.suppress(KeyError):
            self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            try:
                self._entries.popitem(last=False)
            except KeyError:  # emptied by another thread meanwhile
                break

    def discard(self, digest: bytes) -> None:
        self._entries.pop(digest, None)

    def __len__(self) -> int:
        return len(self._entries)
