"""Refreshing a session's tokens (RFC 6749 §6; OIDC Core §12): one refresh per refresh token in a
process, its result shared for a while, the new ID token verified. Runs on the loop (the flow
hands it there with ``handoff.on_loop``); the store decides who refreshes across replicas."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import replace

from ext_authz import errors
from ext_authz.browser.stores import Backing, Refreshed
from ext_authz.config.model import FORWARDED_ACCESS_TOKEN, ProviderSettings
from ext_authz.identity import Verifier, parse_token
from ext_authz.sessions.oidc import LoginClient, TokenRefused, Tokens
from ext_authz.sessions.session import Session

log = logging.getLogger("ext_authz.browser.flow")

# A refresh's result is kept this long for requests that still carry the cookie it replaced
# (a page's parallel requests): they get the same new tokens, never a second refresh with a
# refresh token the IdP has rotated away (which IdPs treat as theft and answer by ending it all).
REFRESH_RESULT_SECONDS = 60.0
MAX_REFRESH_RESULTS = 10_000
FORWARDING = frozenset({"authorization", FORWARDED_ACCESS_TOKEN})


class Refresher:
    def __init__(
        self,
        verifier: Verifier,
        client: LoginClient,
        backing: Backing,
        *,
        clock: Callable[[], float],
        max_token_bytes: int,
    ) -> None:
        self._verifier = verifier
        self._client = client
        self._backing = backing
        self._clock = clock
        self._max_token_bytes = max_token_bytes
        self._refreshes: dict[bytes, asyncio.Future[Refreshed]] = {}

    async def refresh_once(self, session: Session, provider: ProviderSettings, value: str) -> Refreshed:
        """On the loop: one refresh per refresh token, its result shared for a while."""
        assert session.refresh_token is not None
        key = hashlib.sha256(session.refresh_token.encode("utf-8", "surrogatepass")).digest()
        now = self._clock()
        future = self._refreshes.get(key)
        if (
            future is not None
            and future.done()
            and (future.exception() is not None or now - future.result().at > REFRESH_RESULT_SECONDS)
        ):
            del self._refreshes[key]
            future = None
        if future is None:
            self._forget_old(now)
            refresh = functools.partial(self._refresh, session, provider)
            budget = 2 * provider.keys.fetch_timeout_seconds
            future = asyncio.get_running_loop().create_task(
                self._backing.refreshed(session, value, refresh, budget)
            )
            self._refreshes[key] = future
        return await asyncio.shield(future)

    def _forget_old(self, now: float) -> None:
        if len(self._refreshes) < MAX_REFRESH_RESULTS:
            return
        for key, future in list(self._refreshes.items()):
            if future.done() and (future.exception() is not None or now - future.result().at > 0):
                del self._refreshes[key]

    async def _refresh(self, session: Session, provider: ProviderSettings) -> Refreshed:
        assert provider.login is not None and session.refresh_token is not None
        endpoints = await self._client.endpoints(provider)
        answer = await self._client.token_request(
            provider,
            endpoints,
            {"grant_type": "refresh_token", "refresh_token": session.refresh_token},
        )
        now = self._clock()
        if isinstance(answer, TokenRefused):
            log.info(
                "session refresh refused: the session is over",
                extra={"fields": {"provider": provider.name, "error": answer.error}},
            )
            return Refreshed(None, now)
        id_token = session.id_token
        if answer.id_token is not None:
            try:
                claims = await self._verifier.verify_id_token(
                    answer.id_token, provider.name, client_id=provider.login.client_id, nonce=None
                )
            except errors.KeysUnavailable:
                raise
            except errors.AuthError as error:
                log.warning(
                    "refreshed ID token refused",
                    extra={"fields": {"provider": provider.name, "reason": error.code}},
                )
                return Refreshed(None, now)
            old = parse_token(session.id_token, self._max_token_bytes).claims
            if claims.get("sub") != old.get("sub"):  # OIDC Core §12.2: the same End-User
                log.warning(
                    "refreshed ID token names another subject", extra={"fields": {"provider": provider.name}}
                )
                return Refreshed(None, now)
            id_token = answer.id_token
        renewed = self.session_from(
            answer, provider, id_token=id_token, started_at=session.started_at, now=now, scope=session.scope
        )
        if answer.refresh_token is None:
            renewed = replace(
                renewed, refresh_token=session.refresh_token
            )  # RFC 6749 §6: kept when not rotated
        return Refreshed(renewed, now)

    def session_from(
        self,
        tokens: Tokens,
        provider: ProviderSettings,
        *,
        id_token: str,
        started_at: int,
        now: float,
        scope: str,
    ) -> Session:
        assert provider.login is not None
        if tokens.expires_in is not None:
            expires = int(now + tokens.expires_in)
        else:
            exp = parse_token(id_token, self._max_token_bytes).claims.get("exp")
            expires = int(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else int(now)
        forward = provider.login.forward_access_token in FORWARDING
        return Session(
            provider=provider.name,
            id_token=id_token,
            refresh_token=tokens.refresh_token,
            access_token=tokens.access_token if forward else None,
            tokens_expire_at=expires,
            scope=tokens.scope if tokens.scope is not None else scope,
            started_at=started_at,
            sealed_at=int(now),
        )
