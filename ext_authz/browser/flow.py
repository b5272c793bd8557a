"""Browser sign-in in the Check: sessions, the sign-in redirect, the callback, refresh and logout.

A rule with ``login: PROVIDER`` accepts, besides bearer tokens, the session cookie of a browser
that signed in at that provider. What answers what (README: Browser sign-in):

- ``callback_path`` and ``logout_path`` are answered here, before any rule: a 302 (with the
  cookies it sets or ends) or a small HTML page (400/403/503). Never a rule's decision.
- a request on a login rule without a bearer token or a usable session: a browser navigation gets
  a 302 to the provider's authorization endpoint (with a sealed transaction cookie); anything else
  the 401 it gets without sessions.
- a session stands for a verified principal: the ID token's claims (it was verified when it was
  stored, and the cookie is sealed) plus the granted ``scope``. Its tokens are refreshed when they
  expire within ``refresh_before_seconds`` (single-flight per session in this process; the
  renewed cookie rides on the allowed response, ``OkHttpResponse.response_headers_to_add``).
- the session cookie never reaches a backend: it is taken out of every allowed request's Cookie
  header, on login rules or not.

Network waits (endpoints, token requests) go to the loop with ``handoff.on_loop``; the network
itself is behind :class:`LoginClient` (``sessions.client``), so this module does no I/O.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Literal
from urllib.parse import urlencode, urlsplit

from ext_authz import errors
from ext_authz.browser.backchannel import backchannel_logout
from ext_authz.browser.pages import (
    RETRY_AFTER_SECONDS,
    busy,
    logout_form,
    page,
    redirect,
    same_origin,
    unavailable,
)
from ext_authz.browser.refresh import FORWARDING, Refresher
from ext_authz.browser.stores import (
    Backing,
    CookieSessions,
    NoStore,
    RedisSessions,
    SessionTooLarge,
    log_store_down,
)
from ext_authz.config.model import FORWARDED_ACCESS_TOKEN, ProviderSettings, RuleSettings, Settings
from ext_authz.handoff import on_loop
from ext_authz.hosts import canonical_host
from ext_authz.identity import Verifier, parse_token
from ext_authz.model import Allow, Credential, Decision, Deny, Principal, Request, reason_of
from ext_authz.sessions import cookies, signin
from ext_authz.sessions.oidc import Endpoints, LoginClient, LoginUnavailable, TokenRefused
from ext_authz.sessions.session import Session, SessionEvents, SessionStore, index_key
from ext_authz.sources import CookieToken, Reading, cookie_header_without
from ext_authz.trace import NotJudged

log = logging.getLogger(__name__)

SIGNIN_PURPOSE = "signin"
MAX_REMEMBERED_SESSIONS = 4096  # opened cookies, by value: a page's requests open it once


@dataclass(frozen=True, slots=True)
class Found:
    """What a request's session cookie gave."""

    principal: Principal | None = None
    session: Session | None = None
    set_cookies: tuple[str, ...] = ()  # Set-Cookie values for the answer (renewed, or ended)
    unavailable: errors.AuthError | None = None  # the IdP is needed and down: 503
    reason: NotJudged | Literal["session"] = "no_session"  # why there is no principal (traces)


class Browsers:
    """The sessions of one config; built with the pipeline, called per request."""

    def __init__(
        self,
        settings: Settings,
        verifier: Verifier,
        client: LoginClient,
        *,
        clock: Callable[[], float],
        store: SessionStore | None = None,
        events: SessionEvents | None = None,
    ) -> None:
        self._events = events or SessionEvents()
        assert settings.sessions is not None
        self.settings = settings.sessions
        self._sealer = cookies.Sealer(self.settings.secrets)
        self._store: SessionStore = store or NoStore()
        self._backing: Backing = (
            RedisSessions(self.settings, self._sealer, self._store, clock=clock, index_of=self._index_of)
            if self.settings.store == "redis"
            else CookieSessions(self.settings, self._sealer)
        )
        self._providers = {p.name: p for p in settings.providers if p.login is not None}
        self._verifier = verifier
        self._client = client
        self._clock = clock
        self._max_token_bytes = settings.max_token_bytes
        self._cookie = self.settings.cookie
        self._chunk_names = frozenset(cookies.chunk_names(self._cookie))
        self._source = CookieToken(self._cookie)
        self._opened: dict[str, tuple[Session, Principal]] = {}
        self._refresher = Refresher(
            verifier, client, self._backing, clock=clock, max_token_bytes=settings.max_token_bytes
        )
        backchannel = self.settings.backchannel_logout_path
        self._paths = frozenset(
            {self.settings.callback_path, self.settings.logout_path, *([backchannel] if backchannel else [])}
        )

    # ---- what the pipeline asks ----

    def answers_path(self, path: str) -> bool:
        return path in self._paths

    async def answer(self, request: Request, path: str) -> Decision:
        """``callback_path`` or ``logout_path`` (``path``: the request's path as the rules read it)."""
        decision = await self._answer(request, path)
        if path == self.settings.callback_path:
            code = reason_of(decision)
            outcome = "completed" if code == "sign_in_completed" else code
            self._events.count("sign_in", outcome)
        elif path == self.settings.logout_path:
            code = reason_of(decision)
            self._events.count("logout", "front" if code == "logged_out" else code)
        return decision

    async def _answer(self, request: Request, path: str) -> Decision:
        if path == self.settings.callback_path:
            return await self._callback(request)
        if path == self.settings.backchannel_logout_path:
            if request.method.upper() != "POST":
                return page(405, "method_not_allowed", "Not allowed", "Back-channel logout takes POST.")
            status, body = await self.backchannel_logout(request.body)
            headers = (("content-type", "application/json"), ("cache-control", "no-store"))
            return Deny(status, errors.GRPC_PERMISSION_DENIED, "backchannel_logout", headers, body)
        assert path == self.settings.logout_path
        return await self._logout(request)

    async def backchannel_logout(self, body: str) -> tuple[int, str]:
        """OIDC Back-Channel Logout 1.0: the status and JSON body to answer (``backchannel``)."""
        return await backchannel_logout(
            body,
            providers=self._providers,
            verifier=self._verifier,
            store=self._store,
            events=self._events,
            clock=self._clock,
            max_token_bytes=self._max_token_bytes,
        )

    def carries_session(self, request: Request) -> bool:
        header = request.headers.get("cookie")
        return header is not None and self._cookie in header

    def strip(self, request: Request, allow: Allow) -> Allow:
        """``allow`` with the session cookie (every chunk) out of the Cookie header the backend gets."""
        header = request.headers.get("cookie", "")
        remaining = cookie_header_without(header, self._present_chunks(request))
        if remaining == header.strip():
            return allow
        to_set = tuple((n, v) for n, v in allow.headers_to_set if n != "cookie")
        to_remove = tuple(n for n in allow.headers_to_remove if n != "cookie")
        if remaining:
            return replace(
                allow, headers_to_set=(*to_set, ("cookie", remaining)), headers_to_remove=to_remove
            )
        return replace(allow, headers_to_set=to_set, headers_to_remove=(*to_remove, "cookie"))

    async def session(self, request: Request, rule: RuleSettings) -> Found:
        """The principal of the request's session for ``rule``'s provider, renewed when due."""
        jar = self._jar(request)
        value = cookies.join(self._cookie, jar)
        if value is None:
            if any(name in self._chunk_names for name in jar):
                return Found(set_cookies=self._expire_session(jar), reason="session_invalid")
            return Found()
        now = self._clock()
        remembered = self._opened.get(value)
        if remembered is None:
            try:
                session = await self._backing.open(value, now)
            except LoginUnavailable as exc:
                return self._store_down(exc)
            if session is None or session.provider not in self._providers:
                log.info("session cookie refused: tampered, foreign key, expired or truncated")
                return Found(set_cookies=self._expire_session(jar), reason="session_invalid")
            principal = self._principal(session)
            if principal is None:
                return Found(set_cookies=self._expire_session(jar), reason="session_invalid")
        else:
            session, principal = remembered
            if now >= session.sealed_at + self.settings.idle_timeout_seconds:
                # The cookie's own expiry (idle timeout) holds for a remembered one, too.
                self._opened.pop(value, None)
                return Found(set_cookies=self._expire_session(jar), reason="session_expired")
        if session.provider != rule.login:
            return Found(reason="session_other_provider")  # kept: it serves that provider's rules
        if now >= session.started_at + self.settings.max_age_seconds:
            self._opened.pop(value, None)
            return Found(set_cookies=self._expire_session(jar), reason="session_expired")
        provider = self._providers[session.provider]
        if session.tokens_expire_at - now <= self.settings.refresh_before_seconds:
            return await self._renew(session, provider, jar, value, now)
        if remembered is None and self._backing.remembers:
            self._remember(value, session, principal)
        set_cookies: tuple[str, ...] = ()
        if self._backing.reseal_due(session, now):
            # Activity extends the idle timeout: re-sealed now and then, not on every request.
            # (It fitted when it was sealed; the same data fits again.)
            with contextlib.suppress(SessionTooLarge):
                set_cookies = await self._keep(replace(session, sealed_at=int(now)), jar, now, new=False)
        return Found(principal, session, set_cookies, reason="session")

    @staticmethod
    def _store_down(exc: LoginUnavailable) -> Found:
        log_store_down(exc)
        return Found(unavailable=errors.LoginUnavailable(RETRY_AFTER_SECONDS), reason="login_unavailable")

    def sign_in(self, request: Request, rule: RuleSettings, found: Found) -> Deny | None:
        """A navigation's redirect to sign in at ``rule``'s provider; None for other requests."""
        if not signin.is_navigation(request.method, request.headers):
            return None
        provider = self._providers[rule.login or ""]
        scheme, host = request.scheme.lower(), request.host
        if not cookies.secure_context(scheme, canonical_host(host) or ""):
            return page(
                400,
                "insecure_origin",
                "Sign-in needs HTTPS",
                "This site signs you in only over https (or on localhost): a session cookie is never "
                "sent in clear.",
                set_cookies=found.set_cookies,
            )
        endpoints = self._client.endpoints_now(provider.name)
        if endpoints is None:
            return unavailable(found.set_cookies)
        assert provider.login is not None
        redirect_uri = f"{scheme}://{host}{self.settings.callback_path}"
        transaction = signin.new_transaction(
            signin.return_path(request.path, request.query), provider=provider.name, redirect_uri=redirect_uri
        )
        jar = self._jar(request)
        name = signin.transaction_cookie(self._cookie, transaction.state)
        now = self._clock()
        sealed = self._sealer.seal(
            SIGNIN_PURPOSE,
            name,
            signin.to_data(transaction),
            now=now,
            lifetime_seconds=signin.TRANSACTION_SECONDS,
        )
        # The cookie the flow needs first: a gateway that passes one Set-Cookie (nginx) passes it.
        set_cookies = [
            cookies.set_cookie(name, sealed, max_age_seconds=signin.TRANSACTION_SECONDS),
            *found.set_cookies,
            *(cookies.expire_cookie(old) for old in signin.transactions_to_expire(self._cookie, jar)),
        ]
        location = signin.authorization_url(
            endpoints.authorization,
            client_id=provider.login.client_id,
            redirect_uri=redirect_uri,
            scopes=provider.login.scopes,
            transaction=transaction,
        )
        self._events.count("sign_in", "started")
        return redirect(location, set_cookies, "sign_in_started", rule.name)

    def finish(self, request: Request, allow: Allow, found: Found) -> Allow:
        """An allowed session request: its access token in (when the provider forwards it), a
        renewed cookie on the response. (The session's cookies come out of every allowed request
        in Pipeline._decide_sessions, this one too.)"""
        session = found.session
        assert session is not None
        login = self._providers[session.provider].login
        assert login is not None
        if login.forward_access_token in FORWARDING and session.access_token is not None:
            if login.forward_access_token == "authorization":  # noqa: S105 - a header name
                name, value = "authorization", f"Bearer {session.access_token}"
            else:
                name, value = FORWARDED_ACCESS_TOKEN, session.access_token
            allow = replace(
                allow,
                headers_to_set=(*(h for h in allow.headers_to_set if h[0] != name), (name, value)),
                headers_to_remove=tuple(n for n in allow.headers_to_remove if n != name),
            )
        if found.set_cookies:
            allow = replace(allow, response_headers=tuple(("set-cookie", c) for c in found.set_cookies))
        return replace(allow, reason="session")

    # ---- sessions ----

    def _jar(self, request: Request) -> Mapping[str, str]:
        """The request's cookies, the first value of each name (the most specific path first)."""
        return {name: values[0] for name, values in Reading(request).cookies().items() if values}

    def _present_chunks(self, request: Request) -> frozenset[str]:
        """The session's cookies in the request: its parts and the sign-in transactions'."""
        prefix = f"{self._cookie}-signin-"
        return frozenset(
            name for name in self._jar(request) if name in self._chunk_names or name.startswith(prefix)
        )

    def _principal(self, session: Session) -> Principal | None:
        try:
            parsed = parse_token(session.id_token, self._max_token_bytes)
        except errors.AuthError:
            return None
        claims = {**parsed.claims, "scope": session.scope}
        credential = Credential(session.id_token, (self._source,))
        return Principal(session.provider, claims, parsed.payload_segment, credential)

    def _remember(self, value: str, session: Session, principal: Principal) -> None:
        if len(self._opened) >= MAX_REMEMBERED_SESSIONS:
            with contextlib.suppress(KeyError, StopIteration, RuntimeError):  # another thread got there first
                del self._opened[next(iter(self._opened))]
        self._opened[value] = (session, principal)

    async def _keep(
        self, session: Session, jar: Mapping[str, str], now: float, *, new: bool
    ) -> tuple[str, ...]:
        """The Set-Cookie lines that keep ``session`` (stored first, with store: redis)."""
        return await self._backing.keep(session, jar, now, index=self._index_of(session), new=new)

    def _index_of(self, session: Session) -> list[str]:
        """The back-channel logout sets a session is listed in: its ID token's sid and sub."""
        claims = parse_token(session.id_token, self._max_token_bytes).claims
        return [
            index_key(kind, session.provider, value)
            for kind in ("sid", "sub")
            if isinstance(value := claims.get(kind), str) and value
        ]

    def _expire_session(self, jar: Mapping[str, str]) -> tuple[str, ...]:
        return tuple(cookies.expire_cookies(self._cookie, jar))

    async def _renew(
        self, session: Session, provider: ProviderSettings, jar: Mapping[str, str], value: str, now: float
    ) -> Found:
        """A session whose tokens expire soon: refreshed, or kept while the IdP is down and the
        tokens still hold, or over (refused, or expired without a refresh token)."""
        self._opened.pop(value, None)
        if session.refresh_token is None:
            if now < session.tokens_expire_at:
                return Found(self._principal(session), session, reason="session")
            return Found(set_cookies=self._expire_session(jar), reason="session_expired")
        try:
            refreshed = await on_loop(
                self._refresher.refresh_once(session, provider, value),
                busy=busy(),
            )
        except (LoginUnavailable, errors.KeysUnavailable) as exc:
            if now < session.tokens_expire_at:
                self._events.count("refresh", "unavailable_kept")  # the tokens still hold
                return Found(self._principal(session), session, reason="session")
            log.warning(
                "session refresh impossible: the identity provider is unavailable",
                extra={"fields": {"provider": provider.name, "outcome": getattr(exc, "outcome", "keys")}},
            )
            self._events.count("refresh", "unavailable")
            return Found(unavailable=errors.LoginUnavailable(RETRY_AFTER_SECONDS), reason="login_unavailable")
        if refreshed.session is None:
            self._events.count("refresh", "refused")
            return Found(set_cookies=self._expire_session(jar), reason="refresh_refused")
        self._events.count("refresh", "renewed")
        new = refreshed.session
        principal = self._principal(new)
        if principal is None:
            return Found(set_cookies=self._expire_session(jar), reason="session_invalid")
        if not self._backing.remembers:
            return Found(principal, new, reason="session")  # stored in place: the cookie is unchanged
        try:
            renewed = await self._keep(new, jar, self._clock(), new=False)
        except SessionTooLarge:
            log.warning(
                "session refresh: the renewed session is too large for cookies",
                extra={"fields": {"provider": provider.name}},
            )
            return Found(set_cookies=self._expire_session(jar), reason="refresh_refused")
        return Found(principal, new, renewed, reason="session")

    # ---- the callback ----

    async def _callback(self, request: Request) -> Decision:
        if request.method.upper() != "GET":
            return page(405, "method_not_allowed", "Not allowed", "The sign-in callback takes GET only.")
        jar = self._jar(request)
        state = signin.callback_state(request.query)
        name = signin.transaction_cookie(self._cookie, state) if state is not None else None
        transaction = None
        now = self._clock()
        if name is not None and name in jar:
            transaction = signin.from_data(self._sealer.open(SIGNIN_PURPOSE, name, jar[name], now=now))
        provider = self._providers.get(transaction.provider) if transaction is not None else None
        endpoints = self._client.endpoints_now(provider.name) if provider is not None else None
        if transaction is not None and (provider is None or endpoints is None):
            # The transaction names a provider this config no longer signs in with, or whose
            # endpoints are unknown: start again (after a reload) or wait (an outage).
            if provider is None:
                transaction = None
            else:
                return unavailable(())
        outcome = signin.read_callback(
            request.query,
            transaction,
            issuer=provider.issuer if provider is not None else "",
            iss_required=endpoints.iss_parameter if endpoints is not None else False,
        )
        ended = (cookies.expire_cookie(name),) if name is not None and name in jar else ()
        if isinstance(outcome, signin.CallbackRefused):
            log.info("sign-in callback refused", extra={"fields": {"reason": outcome.code}})
            return page(
                outcome.status, outcome.code, "Sign-in failed", outcome.description, set_cookies=ended
            )
        assert provider is not None and endpoints is not None
        return await self._complete(outcome, provider, endpoints, jar, ended)

    async def _complete(
        self,
        callback: signin.CallbackCode,
        provider: ProviderSettings,
        endpoints: Endpoints,
        jar: Mapping[str, str],
        ended: tuple[str, ...],
    ) -> Decision:
        transaction = callback.transaction
        assert provider.login is not None
        form = {
            "grant_type": "authorization_code",
            "code": callback.code,
            "redirect_uri": transaction.redirect_uri,
            "code_verifier": transaction.verifier,
        }
        try:
            answer = await on_loop(
                self._client.token_request(provider, endpoints, form),
                busy=busy(),
            )
        except (LoginUnavailable, errors.KeysUnavailable) as exc:
            log.warning(
                "sign-in: the token endpoint is unavailable",
                extra={"fields": {"provider": provider.name, "outcome": getattr(exc, "outcome", "busy")}},
            )
            return unavailable(ended)
        if isinstance(answer, TokenRefused):
            why = f"code refused ({answer.error})"
            return _sign_in_failed(provider, why, "The sign-in could not be completed: start again.", ended)
        if answer.id_token is None:
            return _sign_in_failed(provider, "no ID token", "The identity provider sent no ID token.", ended)
        try:
            await self._verifier.verify_id_token(
                answer.id_token, provider.name, client_id=provider.login.client_id, nonce=transaction.nonce
            )
        except errors.KeysUnavailable:
            return unavailable(ended)
        except errors.AuthError as error:
            why = f"ID token refused ({error.code})"
            return _sign_in_failed(provider, why, "The identity provider's answer was refused.", ended)
        now = self._clock()
        session = self._refresher.session_from(
            answer,
            provider,
            id_token=answer.id_token,
            started_at=int(now),
            now=now,
            scope=" ".join(provider.login.scopes),
        )
        try:
            kept = await self._keep(session, jar, now, new=True)
        except SessionTooLarge:
            message = "The identity provider's tokens are too large to keep in cookies (use the redis store)."
            return _sign_in_failed(provider, "session too large for cookies", message, ended, 502)
        except LoginUnavailable as exc:
            log_store_down(exc)
            return unavailable(ended)
        # The session first (nginx passes only the first Set-Cookie; the transaction's expires anyway).
        return redirect(transaction.return_to, [*kept, *ended], "sign_in_completed", "")

    # ---- logout ----

    async def _logout(self, request: Request) -> Decision:
        method = request.method.upper()
        if method not in ("GET", "POST"):
            return page(405, "method_not_allowed", "Not allowed", "Log out with POST.")
        if not same_origin(request, post=method == "POST"):
            return logout_form(self.settings.logout_path)
        jar = self._jar(request)
        value = cookies.join(self._cookie, jar)
        session = None
        if value is not None:
            self._opened.pop(value, None)
            try:
                session = await self._backing.open(value, self._clock())
                await self._backing.end(value)
            except LoginUnavailable as exc:
                log_store_down(exc)
                return unavailable(())  # not ended: say so, rather than pretend
        ended = self._expire_session(jar)
        target = self._post_logout_url(request)
        provider = self._providers.get(session.provider) if session is not None else None
        endpoints = self._client.endpoints_now(provider.name) if provider is not None else None
        if session is not None and provider is not None and endpoints is not None and endpoints.end_session:
            assert provider.login is not None
            params = {
                "id_token_hint": session.id_token,
                "post_logout_redirect_uri": target,
                "client_id": provider.login.client_id,
            }
            parts = urlsplit(endpoints.end_session)
            query = f"{parts.query}&{urlencode(params)}" if parts.query else urlencode(params)
            return redirect(parts._replace(query=query).geturl(), ended, "logged_out", "")
        return redirect(target, ended, "logged_out", "")

    def _post_logout_url(self, request: Request) -> str:
        target = self.settings.post_logout_redirect
        if target.startswith("/"):
            return f"{request.scheme.lower() or 'https'}://{request.host}{target}"
        return target


def _sign_in_failed(
    provider: ProviderSettings, why: str, message: str, ended: tuple[str, ...], status: int = 403
) -> Deny:
    """The callback's page for a sign-in that cannot complete (logged: the provider and why,
    never a token or code)."""
    log.warning("sign-in failed", extra={"fields": {"provider": provider.name, "why": why}})
    code = "session_too_large" if status == 502 else "sign_in_failed"
    return page(status, code, "Sign-in failed", message, set_cookies=ended)
