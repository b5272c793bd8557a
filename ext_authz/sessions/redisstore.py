"""Sessions in Redis (``sessions.store: redis``): the cookie holds only a session id; the tokens,
refresh token included, never leave Redis (and ext-authz). Runs on the asyncio loop.

Records are sealed with the session secret before they are stored (``cookies.Sealer``, purpose
``session-record``, bound to the record's key): whoever can write to Redis can delete or keep a
session, never make one up or change whose it is. Keys (``PREFIX`` = ``ext-authz:session:``):

- ``PREFIX s:<sha256(id)>``: the sealed record; its TTL is the idle timeout, renewed on each use
  (``GETEX``), so an idle session ends by itself;
- ``PREFIX sid:<provider>:<sid>`` and ``PREFIX sub:<provider>:<sub>``: sets of record keys, for
  OIDC Back-Channel Logout (end every session of a ``sid`` or a ``sub``);
- ``PREFIX lock:<sha256(id)>``: held by the one replica refreshing a session (``SET NX PX``);
- ``PREFIX jti:<provider>:<jti>``: a logout token seen (replays are refused);
- ``PREFIX all``: a sorted set of record keys by expiry, for the active-sessions gauge.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ext_authz.sessions.oidc import LoginUnavailable
from ext_authz.sessions.session import PREFIX


class StoreUnavailable(LoginUnavailable):
    """Redis cannot be asked now: a session cannot be told valid, so none is (fail closed)."""

    def __init__(self, message: str) -> None:
        super().__init__("store_unavailable", message)


# Deletes every record in an index set (and the set): one round trip, atomic.
_END_SCRIPT = """
local keys = redis.call('SMEMBERS', KEYS[1])
local ended = 0
for _, key in ipairs(keys) do
  ended = ended + redis.call('DEL', key)
  redis.call('ZREM', KEYS[2], key)
end
redis.call('DEL', KEYS[1])
return ended
"""

# Stores a record (and its index entries), or, given the record expected there (ARGV[4]), only
# when that is still the one stored: a refresh must not bring back a session ended meanwhile.
_SAVE_SCRIPT = """
if ARGV[4] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[4] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], KEYS[1])
for i = 3, #KEYS do
  redis.call('SADD', KEYS[i], KEYS[1])
  redis.call('EXPIREAT', KEYS[i], ARGV[5])
end
return 1
"""

# Releases a lock only when it is still ours (its token).
_UNLOCK_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisSessionStore:
    def __init__(self, url: str, *, timeout_seconds: float = 0.5) -> None:
        parts = urlsplit(url)
        self._timeout = timeout_seconds
        self._client = aioredis.Redis(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=int(parts.path.strip("/") or 0),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            ssl=parts.scheme == "rediss",
            ssl_cert_reqs="required",
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            decode_responses=True,
        )
        self._end = self._client.register_script(_END_SCRIPT)
        self._save = self._client.register_script(_SAVE_SCRIPT)
        self._unlock = self._client.register_script(_UNLOCK_SCRIPT)

    async def close(self) -> None:
        await self._client.aclose()

    async def _call(self, what: str, coroutine: object) -> object:
        try:
            async with asyncio.timeout(self._timeout):
                return await coroutine  # type: ignore[misc]
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"redis {what}: {type(exc).__name__}") from None

    async def load(self, key: str, idle_seconds: int) -> str | None:
        """The sealed record, its idle timeout renewed; None when there is none (ended, expired)."""
        value = await self._call("load", self._client.getex(key, ex=max(1, idle_seconds)))
        return value if isinstance(value, str) else None

    async def save(
        self,
        key: str,
        record: str,
        *,
        idle_seconds: int,
        index: Sequence[str],
        expires_at: float,
        expected: str | None = None,
    ) -> bool:
        saved = await self._call(
            "save",
            self._save(
                keys=[key, f"{PREFIX}all", *index],
                args=[record, max(1, idle_seconds), expires_at, expected or "", int(expires_at) + 60],
            ),
        )
        return saved == 1

    async def delete(self, key: str) -> None:
        async def remove() -> None:
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(key)
            pipe.zrem(f"{PREFIX}all", key)
            await pipe.execute()

        await self._call("delete", remove())

    async def lock(self, key: str, token: str, ttl_seconds: float) -> bool:
        return bool(
            await self._call("lock", self._client.set(key, token, nx=True, px=int(ttl_seconds * 1000)))
        )

    async def unlock(self, key: str, token: str) -> None:
        await self._call("unlock", self._unlock(keys=[key], args=[token]))

    async def end(self, index: str) -> int:
        """End every session listed under ``index``; how many there were."""
        ended = await self._call("end", self._end(keys=[index, f"{PREFIX}all"]))
        return int(ended) if isinstance(ended, int) else 0

    async def first_use(self, marker: str, ttl_seconds: int) -> bool:
        """Whether ``marker`` (a logout token's jti) is seen for the first time."""
        return bool(await self._call("mark", self._client.set(marker, "1", nx=True, ex=max(1, ttl_seconds))))

    async def count(self) -> int:
        """Sessions not yet past their expiry (the active-sessions gauge; expired ones swept)."""

        async def count() -> int:
            now = time.time()
            await self._client.zremrangebyscore(f"{PREFIX}all", "-inf", now)
            return int(await self._client.zcard(f"{PREFIX}all"))

        counted = await self._call("count", count())
        assert isinstance(counted, int)
        return counted
