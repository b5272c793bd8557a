"""Where a session lives: sealed in the cookie itself (``store: cookie``), or in Redis with only a
sealed session id in the cookie (``store: redis``). The flow asks the same five things of both.

Redis is reached through ``handoff.on_loop`` from a request thread (``open``, ``keep``, ``end``)
or directly on the loop (``refreshed``, which the flow already runs there).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ext_authz.browser.pages import busy
from ext_authz.config.model import SessionSettings
from ext_authz.handoff import on_loop
from ext_authz.sessions import cookies
from ext_authz.sessions.oidc import LoginUnavailable
from ext_authz.sessions.session import (
    PURPOSE,
    Session,
    SessionStore,
    from_data,
    lock_key,
    record_key,
    to_data,
)

log = logging.getLogger("ext_authz.browser.flow")

ID_PURPOSE = "session-id"
RECORD_PURPOSE = "session-record"
PEER_POLL_SECONDS = 0.05  # a replica waiting for another's refresh of the same session


def log_store_down(exc: LoginUnavailable) -> None:
    """The one log line of a session store that cannot be asked (the caller answers 503)."""
    log.warning("session store unavailable", extra={"fields": {"outcome": exc.outcome}})


class SessionTooLarge(ValueError):
    """The session does not fit the cookies a browser keeps (store: cookie)."""


@dataclass(frozen=True, slots=True)
class Refreshed:
    session: Session | None  # None: the IdP refused (the session is over)
    at: float


class Backing(Protocol):
    # Whether an opened session may be remembered by its cookie value (a cookie is its session;
    # a Redis session can end elsewhere, so it is read every time).
    remembers: bool

    async def open(self, value: str, now: float) -> Session | None: ...

    async def keep(
        self, session: Session, jar: Mapping[str, str], now: float, *, index: Sequence[str], new: bool
    ) -> tuple[str, ...]: ...

    def reseal_due(self, session: Session, now: float) -> bool: ...

    async def end(self, value: str) -> None: ...

    async def refreshed(
        self, session: Session, value: str, refresh: Callable[[], Awaitable[Refreshed]], budget: float
    ) -> Refreshed: ...


class _Sealed:
    cookie_purpose: str  # what the session cookie's sealed value is (the session, or its id)

    def __init__(self, settings: SessionSettings, sealer: cookies.Sealer) -> None:
        self.settings = settings
        self.sealer = sealer
        self.cookie = settings.cookie

    def lifetime(self, session: Session, now: float, *, idle: bool) -> float:
        until_max_age = session.started_at + self.settings.max_age_seconds - now
        return min(self.settings.idle_timeout_seconds, until_max_age) if idle else until_max_age

    def cookies_for(
        self, data: object, jar: Mapping[str, str], now: float, lifetime: float
    ) -> tuple[str, ...]:
        sealed = self.sealer.seal(self.cookie_purpose, self.cookie, data, now=now, lifetime_seconds=lifetime)
        max_age = max(1, math.floor(lifetime))
        try:
            return tuple(cookies.set_cookies(self.cookie, sealed, max_age_seconds=max_age, present=jar))
        except ValueError:  # more than cookies.MAX_CHUNKS cookies' worth
            raise SessionTooLarge(f"a session of {len(sealed)} characters") from None


class CookieSessions(_Sealed):
    """The whole session sealed in the cookie: nothing to ask, nothing shared between replicas.
    Activity re-seals it now and then, so the idle timeout slides."""

    remembers = True
    cookie_purpose = PURPOSE

    async def open(self, value: str, now: float) -> Session | None:
        return from_data(self.sealer.open(PURPOSE, self.cookie, value, now=now))

    async def keep(
        self, session: Session, jar: Mapping[str, str], now: float, *, index: Sequence[str], new: bool
    ) -> tuple[str, ...]:
        return self.cookies_for(to_data(session), jar, now, self.lifetime(session, now, idle=True))

    def reseal_due(self, session: Session, now: float) -> bool:
        return now - session.sealed_at >= self.settings.idle_timeout_seconds / 4

    async def end(self, value: str) -> None:
        return None

    async def refreshed(
        self, session: Session, value: str, refresh: Callable[[], Awaitable[Refreshed]], budget: float
    ) -> Refreshed:
        return await refresh()


class RedisSessions(_Sealed):
    """The session in Redis under the hash of a random id; the cookie carries the id, sealed.
    Redis renews the idle timeout on each read; a refresh is done by one replica at a time (a
    lock per session) and stored in one write, so replicas never both present a refresh token."""

    remembers = False
    cookie_purpose = ID_PURPOSE

    def __init__(
        self,
        settings: SessionSettings,
        sealer: cookies.Sealer,
        store: SessionStore,
        *,
        clock: Callable[[], float],
        index_of: Callable[[Session], Sequence[str]],
    ) -> None:
        super().__init__(settings, sealer)
        self.store = store
        self.clock = clock
        self._index_of = index_of  # the sid and sub sets a session is listed in
        self._idle = max(1, math.ceil(settings.idle_timeout_seconds))

    @staticmethod
    def key_of(session_id: str) -> str:
        return record_key(hashlib.sha256(session_id.encode("ascii")).hexdigest())

    def _key_for(self, value: str, now: float) -> str | None:
        ref = self.sealer.open(ID_PURPOSE, self.cookie, value, now=now)
        if (
            not isinstance(ref, dict)
            or set(ref) != {"i"}
            or not isinstance(ref["i"], str)
            or not ref["i"].isascii()
        ):
            return None
        return self.key_of(ref["i"])

    def _session(self, key: str, record: str | None, now: float) -> Session | None:
        return from_data(self.sealer.open(RECORD_PURPOSE, key, record, now=now)) if record else None

    async def open(self, value: str, now: float) -> Session | None:
        key = self._key_for(value, now)
        if key is None:
            return None
        record = await on_loop(self.store.load(key, self._idle), busy=busy())
        return self._session(key, record, now)

    async def _save(self, key: str, session: Session, now: float, expected: str | None = None) -> bool:
        lifetime = self.lifetime(session, now, idle=False)
        record = self.sealer.seal(RECORD_PURPOSE, key, to_data(session), now=now, lifetime_seconds=lifetime)
        return await self.store.save(
            key,
            record,
            idle_seconds=self._idle,
            index=self._index_of(session),
            expires_at=now + lifetime,
            expected=expected,
        )

    async def keep(
        self, session: Session, jar: Mapping[str, str], now: float, *, index: Sequence[str], new: bool
    ) -> tuple[str, ...]:
        assert new, "a Redis session is renewed in refreshed(), in place"
        session_id = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
        await on_loop(self._save(self.key_of(session_id), session, now), busy=busy())
        return self.cookies_for({"i": session_id}, jar, now, self.lifetime(session, now, idle=False))

    def reseal_due(self, session: Session, now: float) -> bool:
        return False

    async def end(self, value: str) -> None:
        key = self._key_for(value, self.clock())
        if key is not None:
            await on_loop(self.store.delete(key), busy=busy())

    async def refreshed(
        self, session: Session, value: str, refresh: Callable[[], Awaitable[Refreshed]], budget: float
    ) -> Refreshed:
        """On the loop, waiting at most ``budget`` seconds for a peer. The replica holding the
        session's lock asks the IdP and stores the result; the others wait for the record to
        change, then use what was stored."""
        key = self._key_for(value, self.clock())
        if key is None:
            return Refreshed(None, self.clock())
        lock = lock_key(key.rpartition(":")[2])
        token = secrets.token_hex(16)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        # The lock outlives one refresh's whole time budget, never a crashed holder by much.
        while not await self.store.lock(lock, token, 2 * budget + 1):
            current = self._session(key, await self.store.load(key, self._idle), self.clock())
            if current is None or current.refresh_token != session.refresh_token:
                return Refreshed(current, self.clock())  # ended, or refreshed by another replica
            if loop.time() >= deadline:
                raise LoginUnavailable("store_busy", "another replica's refresh of this session is slow")
            await asyncio.sleep(PEER_POLL_SECONDS)
        try:
            now = self.clock()
            record = await self.store.load(key, self._idle)
            current = self._session(key, record, now)
            if current is None or current.refresh_token != session.refresh_token:
                return Refreshed(current, now)
            result = await refresh()
            if result.session is None:
                await self.store.delete(key)
            elif not await self._save(key, result.session, result.at, expected=record):
                # Ended while the IdP answered (a logout, front or back channel): it stays ended.
                return Refreshed(None, result.at)
            return result
        finally:
            await self.store.unlock(lock, token)


class NoStore:
    """A SessionStore without Redis (explain, policy tests): it cannot be asked."""

    @staticmethod
    def _no() -> LoginUnavailable:
        return LoginUnavailable("offline", "no session store here")

    async def load(self, key: str, idle_seconds: int) -> str | None:
        raise self._no()

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
        raise self._no()

    async def delete(self, key: str) -> None:
        raise self._no()

    async def lock(self, key: str, token: str, ttl_seconds: float) -> bool:
        raise self._no()

    async def unlock(self, key: str, token: str) -> None:
        raise self._no()

    async def end(self, index: str) -> int:
        raise self._no()

    async def first_use(self, marker: str, ttl_seconds: int) -> bool:
        raise self._no()

    async def count(self) -> int:
        raise self._no()
