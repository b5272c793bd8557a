"""Shared state touched from many request threads (adversarial review of the sync-server change)."""

from __future__ import annotations

import sys
import threading
import tracemalloc

from ext_authz.metrics import CheckCollector
from ext_authz.tokencache import CacheCounters, TokenCache


def test_check_counters_of_exited_threads_are_freed_without_a_scrape() -> None:
    """Request threads come and go (one per key wait); each leaves (Thread, _Counts) in
    CheckCollector._live until collect() runs. Without a /metrics scrape that list only grows."""
    collector = CheckCollector()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(2000):
        t = threading.Thread(target=collector.record, args=(("deny", "401", "unknown_key", "p", "r"), 0.001))
        t.start()
        t.join()
        del t
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    pinned = len(collector._live)
    assert pinned < 100, f"{pinned} exited threads pinned, {grown / 2000:.0f} B each"


def test_token_cache_counters_lose_no_increments_across_threads() -> None:
    """CacheCounters.hits += 1 is a read-modify-write: threads that switch between the read and
    the write lose counts (the ext_authz_token_cache hit/miss metrics under-count)."""
    counters = CacheCounters()
    cache = TokenCache(10, counters)
    per_thread, n_threads = 100_000, 4
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:

        def work() -> None:
            for _ in range(per_thread):
                cache.get(b"absent-digest-16", 0.0)

        threads = [threading.Thread(target=work) for _ in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert counters.misses == per_thread * n_threads, f"lost {per_thread * n_threads - counters.misses}"
