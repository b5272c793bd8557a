"""The memory backend's own store (keys/memorystore.py): aiocache's answers, no Redis client loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ext_authz.keys.memorystore import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_get_set_add_delete_and_expiry() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    assert await store.get("doc") is None
    await store.set("doc", "v1", ttl=10, timeout=0.5)
    assert await store.get("doc", timeout=0.5) == "v1"
    with pytest.raises(ValueError, match="already exists"):
        await store.add("doc", "v2", ttl=10)
    clock.now += 10  # at the TTL: gone
    assert await store.get("doc") is None
    assert await store.add("doc", "v2", ttl=5)  # an expired key can be added again
    assert await store.get("doc") == "v2"
    assert await store.delete("doc") == 1 and await store.delete("doc") == 0
    await store.set("forever", "x")
    clock.now += 10**9
    assert await store.get("forever") == "x"
    await store.close()


def test_the_server_loads_no_redis_client_unless_the_backend_is_redis() -> None:
    code = (
        "import sys, ext_authz.cli, ext_authz.server; "
        "print(sorted(m for m in ('redis', 'aiocache') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
