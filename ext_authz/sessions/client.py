"""The OpenID provider over HTTP for browser sign-in: discovery of the login endpoints and token
requests (code exchange, refresh). Runs on the asyncio loop; request threads reach it through
``handoff.on_loop``. The HTTP itself is ``keys.fetch.HttpFetcher``'s (one aiohttp session).

Endpoints are fetched at start and after each reload for every provider with ``login``, then
again once ``refresh_interval_seconds`` has passed; a failed fetch keeps the endpoints in hand
(an IdP outage does not forget where the IdP is). Until a provider's first fetch succeeds it is
not ready (like a provider without keys).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote_plus

from ext_authz.config.model import LoginSettings, ProviderSettings
from ext_authz.keys.fetch import FetchError, HttpFetcher, client_ssl_context, discovery_url
from ext_authz.sessions.oidc import (
    Endpoints,
    LoginUnavailable,
    TokenRefused,
    Tokens,
    endpoints_from,
    token_answer,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Known:
    endpoints: Endpoints
    fetched_at: float


def client_authentication(login: LoginSettings) -> tuple[dict[str, str], dict[str, str]]:
    """The headers and form fields that authenticate the login client (RFC 6749 §2.3.1)."""
    return client_credentials(login.token_endpoint_auth, login.client_id, login.client_secret)


def client_credentials(
    method: Literal["client_secret_basic", "client_secret_post", "none"],
    client_id: str,
    client_secret: str | None,
) -> tuple[dict[str, str], dict[str, str]]:
    """The headers and form fields that authenticate a client (RFC 6749 §2.3.1): shared by the
    token requests here and by introspection requests (RFC 7662 §2.1)."""
    if method == "client_secret_basic":
        assert client_secret is not None
        # §2.3.1: each part form-urlencoded before the Basic encoding (a ':' in an id survives).
        pair = f"{quote_plus(client_id, safe='')}:{quote_plus(client_secret, safe='')}"
        return {"Authorization": "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")}, {}
    if method == "client_secret_post":
        assert client_secret is not None
        return {}, {"client_id": client_id, "client_secret": client_secret}
    return {}, {"client_id": client_id}


class HttpLoginClient:
    """One per server: endpoints by issuer survive reloads that keep the provider."""

    def __init__(self, fetcher: HttpFetcher, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._fetcher = fetcher
        self._clock = clock
        self._known: dict[str, _Known] = {}  # by provider name
        self._issuers: dict[str, tuple[str, bool]] = {}  # what each name's endpoints were fetched for
        self._inflight: dict[str, asyncio.Task[Endpoints]] = {}

    @staticmethod
    def _context(provider: ProviderSettings) -> ssl.SSLContext:
        return client_ssl_context(provider.keys.ca_file)

    def endpoints_now(self, provider: str) -> Endpoints | None:
        known = self._known.get(provider)
        return known.endpoints if known is not None else None

    def ready(self, providers: tuple[ProviderSettings, ...]) -> bool:
        """Every provider with ``login`` has its endpoints."""
        return all(self._current(p) is not None for p in providers if p.login is not None)

    def _current(self, provider: ProviderSettings) -> _Known | None:
        if self._issuers.get(provider.name) != (provider.issuer, provider.allow_insecure_http):
            return None
        return self._known.get(provider.name)

    async def endpoints(self, provider: ProviderSettings) -> Endpoints:
        known = self._current(provider)
        if known is not None and self._clock() - known.fetched_at < provider.keys.refresh_interval_seconds:
            return known.endpoints
        task = self._inflight.get(provider.name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(provider), name="login-endpoints")
            self._inflight[provider.name] = task
            task.add_done_callback(lambda _: self._inflight.pop(provider.name, None))
        try:
            return await asyncio.shield(task)
        except LoginUnavailable:
            if known is not None:
                return known.endpoints  # the IdP is down: where it is has not changed
            raise

    async def _fetch(self, provider: ProviderSettings) -> Endpoints:
        started = self._clock()
        try:
            async with asyncio.timeout(provider.keys.fetch_timeout_seconds):
                fetched = await self._fetcher.get_json(
                    discovery_url(provider.issuer),
                    ssl_context=self._context(provider),
                    allow_insecure_http=provider.allow_insecure_http,
                )
            endpoints = endpoints_from(fetched.body, provider)
        except (FetchError, LoginUnavailable, TimeoutError) as exc:
            outcome = exc.outcome if isinstance(exc, FetchError | LoginUnavailable) else "timeout"
            message = str(exc) or f"no answer within {provider.keys.fetch_timeout_seconds:g} s"
            log.warning(
                "login endpoints fetch failed",
                extra={"fields": {"provider": provider.name, "outcome": outcome, "error": message}},
            )
            raise LoginUnavailable(outcome, message) from None
        self._known[provider.name] = _Known(endpoints, started)
        self._issuers[provider.name] = (provider.issuer, provider.allow_insecure_http)
        return endpoints

    async def warm(self, providers: tuple[ProviderSettings, ...], on_change: Callable[[], None]) -> None:
        """Fetch every login provider's endpoints (at start and after a reload), retrying with a
        capped backoff until each has them; ``on_change`` after each success (readiness)."""
        pending = [p for p in providers if p.login is not None]
        delay = 1.0
        while pending:
            failed = []
            for provider in pending:
                try:
                    await self.endpoints(provider)
                except LoginUnavailable:
                    failed.append(provider)
                else:
                    on_change()
            pending = failed
            if pending:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def token_request(
        self, provider: ProviderSettings, endpoints: Endpoints, form: Mapping[str, str]
    ) -> Tokens | TokenRefused:
        assert provider.login is not None
        headers, credentials = client_authentication(provider.login)
        headers["Accept"] = "application/json"
        try:
            async with asyncio.timeout(provider.keys.fetch_timeout_seconds):
                status, body = await self._fetcher.post_form(
                    endpoints.token,
                    {**form, **credentials},
                    headers=headers,
                    ssl_context=self._context(provider),
                    allow_insecure_http=provider.allow_insecure_http,
                )
        except FetchError as exc:
            raise LoginUnavailable(exc.outcome, str(exc)) from None
        except TimeoutError:
            raise LoginUnavailable(
                "timeout", f"no answer within {provider.keys.fetch_timeout_seconds:g} s"
            ) from None
        return token_answer(status, body)
