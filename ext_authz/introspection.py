"""OAuth 2.0 token introspection (RFC 7662): asking the issuer whether a token is active.

Runs on the asyncio loop; request threads read answers already in hand through ``answer_now``
(no I/O) and reach ``introspect`` through ``handoff.on_loop``. The HTTP itself is
``keys.fetch.HttpFetcher``'s (one aiohttp session, owned by the server).

Answers are cached by (provider, endpoint, SHA-256 of the token): the token itself is never a
key, a log field or a message. An active answer is kept for ``cache_seconds`` and never past
its ``exp`` (a revocation shows within ``cache_seconds``); an inactive one for
``negative_cache_seconds`` (a token just issued elsewhere is not refused for long). Concurrent
askers about one token share one request. An endpoint that cannot answer (down, slow, our client
credentials refused, garbage) is ``IntrospectionUnavailable`` (503): the token may well be fine.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from ext_authz import errors
from ext_authz.config.model import IntrospectionSettings, ProviderSettings
from ext_authz.config.urls import url_problem
from ext_authz.keys.fetch import FetchError, HttpFetcher, client_ssl_context, discovery_url
from ext_authz.sessions.client import client_credentials

log = logging.getLogger(__name__)

_NO_CLAIMS: Mapping[str, object] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Introspected:
    """The issuer's answer: ``claims`` are its members except ``active`` (empty when inactive)."""

    active: bool
    claims: Mapping[str, object]


INACTIVE = Introspected(False, _NO_CLAIMS)


class Introspector(Protocol):
    def answer_now(self, provider: ProviderSettings, token: str) -> Introspected | None:
        """A cached answer still valid now; no I/O, callable from any thread."""
        ...

    async def introspect(self, provider: ProviderSettings, token: str) -> Introspected:
        """The issuer's answer (cached or asked for, on the loop); raises
        ``errors.IntrospectionUnavailable`` when the endpoint cannot answer."""
        ...


class NoIntrospection:
    """For servers without introspecting providers (and tests): never an answer."""

    def answer_now(self, provider: ProviderSettings, token: str) -> Introspected | None:
        return None

    async def introspect(self, provider: ProviderSettings, token: str) -> Introspected:
        raise errors.IntrospectionUnavailable()


class _Unavailable(Exception):
    """One failed attempt: ``outcome`` is a stable label, the message safe to log (no token)."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


_Key = tuple[str, str, bytes]  # provider name, endpoint, SHA-256 of the token


@dataclass(frozen=True, slots=True)
class _Entry:
    answer: Introspected
    expires_at: float


@dataclass(frozen=True, slots=True)
class _Discovered:
    endpoint: str
    issuer: str  # what it was discovered for: a reload to another issuer discovers anew
    allow_insecure_http: bool
    fetched_at: float
    retry_at: float  # a failed refetch is not tried again before this (no fetch per request)


# Introspection requests under way at once (the HTTP client has 32 connections, shared with key
# and discovery fetches), and distinct tokens waiting for an answer (beyond: 503 at once).
MAX_IN_FLIGHT = 16
MAX_PENDING = 256


class HttpIntrospector:
    """One per server: cached answers and discovered endpoints survive reloads that keep the
    provider's name and endpoint."""

    def __init__(
        self,
        fetcher: HttpFetcher,
        *,
        clock: Callable[[], float] = time.time,
        max_entries: int = 10_000,
    ) -> None:
        self._fetcher = fetcher
        self._clock = clock  # wall clock: answers' exp is compared with it
        self._max_entries = max_entries
        # Request threads read the cache while the loop writes: every touch of _entries and
        # _discovered is under this lock, never held across I/O.
        self._lock = threading.Lock()
        self._entries: dict[_Key, _Entry] = {}  # insertion order: oldest first
        self._earliest_expiry = float("inf")  # no entry expires before this (sweeps skip till then)
        self._discovered: dict[str, _Discovered] = {}  # by provider name
        # Loop only:
        self._inflight: dict[_Key, asyncio.Task[Introspected]] = {}
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)  # binds to the loop on first wait (3.10+)
        self._discovering: dict[str, asyncio.Task[str]] = {}

    # ---- request threads -----------------------------------------------------------------

    def answer_now(self, provider: ProviderSettings, token: str) -> Introspected | None:
        endpoint = self._endpoint_now(provider)
        if endpoint is None:
            return None
        return self._cached(_key(provider, endpoint, token))

    def _endpoint_now(self, provider: ProviderSettings) -> str | None:
        settings = provider.introspection
        if settings is None:
            return None
        if settings.endpoint is not None:
            return settings.endpoint
        discovered = self._current_discovery(provider)
        return discovered.endpoint if discovered is not None else None

    def _current_discovery(self, provider: ProviderSettings) -> _Discovered | None:
        with self._lock:
            discovered = self._discovered.get(provider.name)
        if discovered is None or (discovered.issuer, discovered.allow_insecure_http) != (
            provider.issuer,
            provider.allow_insecure_http,
        ):
            return None
        return discovered

    def _cached(self, key: _Key) -> Introspected | None:
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if now >= entry.expires_at:
                del self._entries[key]
                return None
            return entry.answer

    def _store(self, key: _Key, answer: Introspected, ttl: float) -> None:
        if ttl <= 0 or self._max_entries <= 0:
            return
        now = self._clock()
        expires_at = now + ttl
        with self._lock:
            self._entries.pop(key, None)  # re-stored: now the newest
            if len(self._entries) >= self._max_entries:
                self._make_room(now)
            self._entries[key] = _Entry(answer, expires_at)
            self._earliest_expiry = min(self._earliest_expiry, expires_at)

    def _make_room(self, now: float) -> None:
        """Under the lock: drop the expired entries (a full scan, only once one has expired),
        then the oldest until one more fits."""
        if now >= self._earliest_expiry:
            self._entries = {k: e for k, e in self._entries.items() if now < e.expires_at}
            self._earliest_expiry = min((e.expires_at for e in self._entries.values()), default=float("inf"))
        while len(self._entries) >= self._max_entries:
            del self._entries[next(iter(self._entries))]

    # ---- the loop --------------------------------------------------------------------------

    async def introspect(self, provider: ProviderSettings, token: str) -> Introspected:
        settings = provider.introspection
        if settings is None:
            raise ValueError(f"provider {provider.name!r} does not introspect tokens")
        cached = self.answer_now(provider, token)
        if cached is not None:
            return cached
        endpoint = await self._endpoint(provider, settings)
        key = _key(provider, endpoint, token)
        task = self._inflight.get(key)
        if task is None:
            if len(self._inflight) >= MAX_PENDING:
                # A flood of made-up tokens (each a request: no negative cache helps with random
                # ones): beyond this many waiting, 503 at once rather than an ever longer queue.
                raise errors.IntrospectionUnavailable(retry_after_seconds=1)
            task = asyncio.get_running_loop().create_task(
                self._ask(provider, settings, endpoint, token, key), name="introspection"
            )
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        try:
            # shield: a caller that gives up (its deadline, a cancelled check) does not cancel
            # the request the other callers wait on.
            return await asyncio.shield(task)
        except _Unavailable:  # logged once, by the task; each caller gets its own denial
            raise errors.IntrospectionUnavailable() from None

    def _finished(self, key: _Key, task: asyncio.Task[Introspected]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have given up (no "never retrieved")

    async def _ask(
        self,
        provider: ProviderSettings,
        settings: IntrospectionSettings,
        endpoint: str,
        token: str,
        key: _Key,
    ) -> Introspected:
        headers, credentials = client_credentials(
            settings.auth_method, settings.client_id, settings.client_secret
        )
        headers["Accept"] = "application/json"
        # RFC 7662 §2.1; the hint only speeds the server's lookup (it may search further).
        form = {"token": token, "token_type_hint": "access_token", **credentials}
        timeout = provider.keys.fetch_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                # At most MAX_IN_FLIGHT requests at once (the rest queue, within the timeout):
                # the key and discovery fetches keep connections of their own.
                async with self._slots:
                    status, body = await self._fetcher.post_form(
                        endpoint,
                        form,
                        headers=headers,
                        ssl_context=self._context(provider),
                        allow_insecure_http=provider.allow_insecure_http,
                    )
            answer, ttl = _answer(status, body, settings, self._clock())
        except (FetchError, TimeoutError, _Unavailable) as exc:
            failure = _failure(exc, timeout)
            _warn("token introspection failed", provider, failure)
            raise failure from None
        except Exception as exc:  # an answer shaped as nothing above foresaw: unavailable, not a 500
            failure = _Unavailable("invalid", f"answer not understood ({type(exc).__name__})")
            _warn("token introspection failed", provider, failure)
            raise failure from None
        self._store(key, answer, ttl)
        return answer

    async def _endpoint(self, provider: ProviderSettings, settings: IntrospectionSettings) -> str:
        if settings.endpoint is not None:
            endpoint = settings.endpoint
        else:
            endpoint = await self._discovered_endpoint(provider)
        problem = _url_problem(endpoint, provider)
        if problem is not None:
            _warn("token introspection failed", provider, _Unavailable("invalid", f"endpoint {problem}"))
            raise errors.IntrospectionUnavailable()
        return endpoint

    async def _discovered_endpoint(self, provider: ProviderSettings) -> str:
        known = self._current_discovery(provider)
        now = self._clock()
        if known is not None and (
            now - known.fetched_at < provider.keys.refresh_interval_seconds or now < known.retry_at
        ):
            return known.endpoint
        task = self._discovering.get(provider.name)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._discover(provider), name="introspection-discovery"
            )
            self._discovering[provider.name] = task
            task.add_done_callback(lambda done: self._discovery_finished(provider.name, done))
        try:
            return await asyncio.shield(task)
        except _Unavailable:
            raise errors.IntrospectionUnavailable() from None

    def _discovery_finished(self, name: str, task: asyncio.Task[str]) -> None:
        self._discovering.pop(name, None)
        if not task.cancelled():
            task.exception()

    async def _discover(self, provider: ProviderSettings) -> str:
        started = self._clock()
        timeout = provider.keys.fetch_timeout_seconds
        try:
            issuer, also_named = _discovery_issuer(provider)
            async with asyncio.timeout(timeout):
                fetched = await self._fetcher.get_json(
                    discovery_url(issuer),
                    ssl_context=self._context(provider),
                    allow_insecure_http=provider.allow_insecure_http,
                )
            endpoint = _endpoint_from(fetched.body, provider, (issuer, *also_named))
        except (FetchError, TimeoutError, _Unavailable) as exc:
            failure = _failure(exc, timeout)
            known = self._current_discovery(provider)
            if known is None:
                _warn("introspection endpoint discovery failed", provider, failure)
                raise failure from None
            # The IdP is down: where its endpoint is has not changed. Not retried before
            # refetch_min_interval_seconds, so an outage costs no discovery fetch per request.
            _warn("introspection endpoint discovery failed; the known endpoint is kept", provider, failure)
            retry_at = self._clock() + provider.keys.refetch_min_interval_seconds
            with self._lock:
                self._discovered[provider.name] = _Discovered(
                    known.endpoint, known.issuer, known.allow_insecure_http, known.fetched_at, retry_at
                )
            return known.endpoint
        with self._lock:
            self._discovered[provider.name] = _Discovered(
                endpoint, provider.issuer, provider.allow_insecure_http, started, started
            )
        return endpoint

    @staticmethod
    def _context(provider: ProviderSettings) -> ssl.SSLContext:
        return client_ssl_context(provider.keys.ca_file)


def _failure(exc: FetchError | TimeoutError | _Unavailable, timeout: float) -> _Unavailable:
    if isinstance(exc, _Unavailable):
        return exc
    if isinstance(exc, FetchError):
        return _Unavailable(exc.outcome, str(exc))
    return _Unavailable("timeout", f"no answer within {timeout:g} s")


def _key(provider: ProviderSettings, endpoint: str, token: str) -> _Key:
    # surrogatepass: a token is whatever str the request carried; hashing must never fail on it.
    return provider.name, endpoint, hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _answer(
    status: int, body: object, settings: IntrospectionSettings, now: float
) -> tuple[Introspected, float]:
    """The introspection answer and how long it may be cached, or _Unavailable."""
    if status != 200:
        # A 401 here means the IdP refused OUR client credentials (RFC 7662 §2.3), not the token.
        hint = " (are the introspection client credentials right?)" if status in (401, 403) else ""
        raise _Unavailable("http_error", f"HTTP {status}{hint}")
    if not isinstance(body, dict):
        # decode_json gives a list for an object with a repeated member name: refused too.
        raise _Unavailable("invalid", "answer is not a JSON object")
    active = body.get("active")
    if not isinstance(active, bool):  # §2.2: REQUIRED, a boolean ("true" is not one)
        raise _Unavailable("invalid", "answer has no boolean active member")
    if not active:
        # §2.2: an inactive answer should carry nothing else; whatever it does carry is ignored.
        return INACTIVE, settings.negative_cache_seconds
    ttl = settings.cache_seconds
    exp = body.get("exp")
    # A NumericDate as the verifier reads one (finite, [0, 2**64)); any other exp is the
    # verifier's to refuse, and never arithmetic here (10**400 - now overflows a float).
    if isinstance(exp, int | float) and not isinstance(exp, bool) and 0 <= exp < 2**64:
        if now >= exp:  # an IdP that calls an expired token active: it is not (RFC 7519 §4.1.4)
            return INACTIVE, settings.negative_cache_seconds
        ttl = min(ttl, exp - now)
    claims = MappingProxyType({name: value for name, value in body.items() if name != "active"})
    return Introspected(True, claims), ttl


def _discovery_issuer(provider: ProviderSettings) -> tuple[str, tuple[str, ...]]:
    """Where the provider's discovery document is, and the other issuers it may name (as the key
    fetch does: a multi-tenant IdP's common document names the issuer template)."""
    template = provider.issuer_template
    if template is None:
        return provider.issuer, ()
    if template.discovery_issuer is None:
        raise _Unavailable(
            "invalid", "an issuer template without discovery_issuer needs introspection.endpoint"
        )
    return template.discovery_issuer, (provider.issuer, provider.issuer.replace("{tenant}", "{tenantid}"))


def _endpoint_from(document: object, provider: ProviderSettings, issuers: tuple[str, ...]) -> str:
    if not isinstance(document, dict):
        raise _Unavailable("invalid", "discovery document is not a JSON object")
    if document.get("issuer") not in issuers:  # OIDC Discovery §4.3
        raise _Unavailable("invalid", "discovery document names a different issuer")
    endpoint = document.get("introspection_endpoint")
    if not isinstance(endpoint, str) or not endpoint:
        raise _Unavailable("invalid", "discovery document has no introspection_endpoint")
    problem = _url_problem(endpoint, provider)
    if problem is not None:
        raise _Unavailable("invalid", f"introspection_endpoint {problem}")
    return endpoint


def _url_problem(url: str, provider: ProviderSettings) -> str | None:
    try:
        return url_problem(url, allow_insecure_http=provider.allow_insecure_http)
    except ValueError:  # urlsplit: e.g. an unbalanced "[" in the host
        return "must be an absolute http(s) URL"


def _warn(event: str, provider: ProviderSettings, exc: _Unavailable) -> None:
    # The message is ours or FetchError's (a status, an exception type name): never the token,
    # the client secret or the answer's text.
    log.warning(
        event, extra={"fields": {"provider": provider.name, "outcome": exc.outcome, "error": str(exc)}}
    )
