"""ext_authz.dpop.RedisReplayCache against a real redis-server: one SET NX PX per proof, shared by
replicas (two clients), its expiry Redis's own, and a Redis that is down or frozen failing closed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from ext_authz.dpop import REDIS_PREFIX, Proof, RedisReplayCache, ReplayCacheUnavailable, replay_key
from tests.support.redis import RedisServer, inline_command

NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


def client_for(server: RedisServer) -> aioredis.Redis:
    return aioredis.Redis(
        host="127.0.0.1",
        port=server.port,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        decode_responses=True,
    )


@pytest.fixture
async def client(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    connection = client_for(server)
    await connection.flushdb()
    yield connection
    await connection.aclose()


def key_of(jti: str) -> str:
    return replay_key(Proof(jkt="jkt-1", jti=jti, iat=NOW, nonce=None))


async def test_first_use_then_replay(client: aioredis.Redis) -> None:
    cache = RedisReplayCache(client)
    assert await cache.first_use(key_of("a"), NOW, 60)
    assert not await cache.first_use(key_of("a"), NOW, 60)
    assert await cache.first_use(key_of("b"), NOW, 60)


async def test_one_set_with_the_ttl_in_milliseconds(client: aioredis.Redis, server: RedisServer) -> None:
    key = key_of("ttl")
    assert await RedisReplayCache(client).first_use(key, NOW, 2.5)
    ttl_ms = await client.pttl(f"{REDIS_PREFIX}{key}")
    assert 2000 < ttl_ms <= 2500
    assert await client.get(f"{REDIS_PREFIX}{key}") == "1"
    assert server.dbsize() == 1


async def test_replicas_see_each_others_proofs(client: aioredis.Redis, server: RedisServer) -> None:
    other = client_for(server)
    try:
        assert await RedisReplayCache(client).first_use(key_of("shared"), NOW, 60)
        assert not await RedisReplayCache(other).first_use(key_of("shared"), NOW, 60)
    finally:
        await other.aclose()


async def test_concurrent_first_use_admits_a_key_once(client: aioredis.Redis) -> None:
    cache = RedisReplayCache(client)
    results = await asyncio.gather(*(cache.first_use(key_of("race"), NOW, 60) for _ in range(20)))
    assert results.count(True) == 1


async def test_an_entry_expires_with_its_ttl(client: aioredis.Redis) -> None:
    cache = RedisReplayCache(client)
    assert await cache.first_use(key_of("short"), NOW, 0.2)
    assert not await cache.first_use(key_of("short"), NOW, 0.2)
    await asyncio.sleep(0.4)
    assert await cache.first_use(key_of("short"), NOW, 0.2)


async def test_a_stopped_redis_is_unavailable() -> None:
    with RedisServer() as doomed:
        connection = client_for(doomed)
        cache = RedisReplayCache(connection)
        assert await cache.first_use(key_of("x"), NOW, 60)
        doomed.stop()
        try:
            with pytest.raises(ReplayCacheUnavailable):
                await cache.first_use(key_of("y"), NOW, 60)
        finally:
            await connection.aclose()


async def test_a_frozen_redis_is_unavailable_within_the_timeout() -> None:
    with RedisServer() as frozen:
        connection = client_for(frozen)
        cache = RedisReplayCache(connection, timeout_seconds=0.3)
        try:
            assert await cache.first_use(key_of("x"), NOW, 60)
            frozen.pause()
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(ReplayCacheUnavailable):
                await cache.first_use(key_of("y"), NOW, 60)
            assert loop.time() - started < 2.0
        finally:
            frozen.resume()
            await connection.aclose()
        assert inline_command(frozen.port, "PING") == b"+PONG\r\n"
