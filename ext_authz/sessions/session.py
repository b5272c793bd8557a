"""A browser session as the sealed session cookie carries it (``store: cookie``). Pure values.

The cookie is sealed (AES-256-GCM under the session secret, ``cookies.Sealer``): what opens is
what ext-authz wrote, so the ID token inside was verified when it was stored and its claims are
read again without a signature check. Times are whole seconds of the server clock.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

PURPOSE = "session"
PREFIX = "ext-authz:session:"  # the Redis keys of store: redis (sessions.redisstore)


def record_key(digest: str) -> str:
    return f"{PREFIX}s:{digest}"


def lock_key(digest: str) -> str:
    return f"{PREFIX}lock:{digest}"


def index_key(kind: str, provider: str, value: str) -> str:
    """A set of the record keys of one ``sid`` or ``sub`` (``kind``) of ``provider`` (or a logout
    token's ``jti`` marker). The parts are hashed together, length-prefixed, so no provider name
    or claim value (either may hold ':') can name another's key."""
    encoded = f"{len(provider)}:{provider}{value}".encode("utf-8", "surrogatepass")
    return f"{PREFIX}{kind}:{hashlib.sha256(encoded).hexdigest()}"


@dataclass(frozen=True, slots=True)
class Session:
    provider: str
    id_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    # Only kept when the provider forwards it to the backend (`forward_access_token`).
    access_token: str | None = field(repr=False)
    tokens_expire_at: int  # the access token's expires_in, else the ID token's exp
    scope: str
    started_at: int  # the sign-in: max_age_seconds counts from here
    sealed_at: int  # the cookie's own age: re-sealed (idle timeout) once it is old enough


def to_data(session: Session) -> dict[str, object]:
    data: dict[str, object] = {
        "p": session.provider,
        "i": session.id_token,
        "e": session.tokens_expire_at,
        "s": session.scope,
        "t": session.started_at,
        "w": session.sealed_at,
    }
    if session.refresh_token is not None:
        data["r"] = session.refresh_token
    if session.access_token is not None:
        data["a"] = session.access_token
    return data


_REQUIRED = {"p": str, "i": str, "e": int, "s": str, "t": int, "w": int}
_OPTIONAL = {"r": str, "a": str}


def from_data(data: object) -> Session | None:
    """The session a sealed cookie held; None for anything else (another version's shape)."""
    if not isinstance(data, dict) or not set(_REQUIRED) <= set(data) <= set(_REQUIRED) | set(_OPTIONAL):
        return None
    for name, kind in (*_REQUIRED.items(), *_OPTIONAL.items()):
        value = data.get(name)
        if name in data and (not isinstance(value, kind) or isinstance(value, bool)):
            return None
    if not data["p"] or not data["i"]:
        return None
    return Session(
        provider=data["p"],
        id_token=data["i"],
        refresh_token=data.get("r"),
        access_token=data.get("a"),
        tokens_expire_at=data["e"],
        scope=data["s"],
        started_at=data["t"],
        sealed_at=data["w"],
    )


class SessionStore(Protocol):
    """Where ``store: redis`` keeps sessions (``sessions.redisstore``); every method runs on the
    loop and raises ``oidc.LoginUnavailable`` when the store cannot be asked."""

    async def load(self, key: str, idle_seconds: int) -> str | None: ...

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
        """Store ``record``; with ``expected``, only when the stored record is still that one (a
        refresh never brings back a session a logout ended meanwhile). Whether it was stored."""
        ...

    async def delete(self, key: str) -> None: ...

    async def lock(self, key: str, token: str, ttl_seconds: float) -> bool: ...

    async def unlock(self, key: str, token: str) -> None: ...

    async def end(self, index: str) -> int: ...

    async def first_use(self, marker: str, ttl_seconds: int) -> bool: ...

    async def count(self) -> int: ...


class SessionEvents:
    """Counts of sign-ins, refreshes and logouts by outcome (bounded labels), for metrics; shared
    by every config's flow in a server, written from request threads and the loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        self.active: int | None = None  # sessions in the store (store: redis), refreshed now and then

    def count(self, event: str, outcome: str) -> None:
        with self._lock:
            self._counts[event, outcome] = self._counts.get((event, outcome), 0) + 1

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)
