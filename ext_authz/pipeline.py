"""The decision core: request in, decision out. Imports no grpc, no protobuf, no HTTP client.

Stages: rule match → credential → identity → requirements → answer. Expected denials are values;
an AuthError raised by a stage is turned into a Deny here and never travels further. A rule in
dry-run mode computes and logs its decision but lets the request through.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from ext_authz import errors
from ext_authz.authorization import Matched
from ext_authz.binding import SenderConstraints, SharedReplayCache
from ext_authz.browser import Browsers
from ext_authz.compiled import Compiled
from ext_authz.config.model import DEFAULT_RULE, ProviderSettings, Settings
from ext_authz.credentials import CredentialFinder
from ext_authz.dpop import NonceIssuer, ReplayCache
from ext_authz.identity import KeyResolver, Verifier, parse_token
from ext_authz.model import Allow, Credential, Decision, Deny, Principal, Request, WouldDeny
from ext_authz.paths import RequestView
from ext_authz.sessions.oidc import LoginClient, NoLogin
from ext_authz.sessions.session import SessionEvents, SessionStore
from ext_authz.tokencache import CacheCounters, TokenCache
from ext_authz.trace import TokenSeen, Trace

if TYPE_CHECKING:  # the network client is the server's: the core only calls it
    from ext_authz.introspection import Introspector

log = logging.getLogger(__name__)


class Pipeline:
    def __init__(
        self,
        config: Compiled,
        keys: KeyResolver,
        *,
        clock: Callable[[], float] = time.time,
        cache_counters: CacheCounters | None = None,
        login_client: LoginClient | None = None,
        session_store: SessionStore | None = None,
        session_events: SessionEvents | None = None,
        introspector: Introspector | None = None,
        replays: ReplayCache | None = None,
        shared_replays: SharedReplayCache | None = None,
        dpop_nonces: NonceIssuer | None = None,
    ) -> None:
        settings = self.settings = config.settings
        self.config = config
        self.rules = config.rules
        self.finder = CredentialFinder(config.sources)
        entries = settings.token_cache_entries
        cache = TokenCache(entries, cache_counters) if entries else None
        self.verifier = Verifier(
            settings.providers,
            keys,
            max_token_bytes=settings.max_token_bytes,
            clock=clock,
            cache=cache,
            introspector=introspector,
        )
        needs_nonces = any(p.dpop is not None and p.dpop.nonce for p in settings.providers)
        self.constraints = SenderConstraints(
            settings.providers,
            clock=clock,
            replays=replays,
            shared_replays=shared_replays,
            nonces=dpop_nonces
            or (NonceIssuer(secrets.token_bytes(32), 300, clock) if needs_nonces else None),
        )
        self._constrained = bool(self.constraints)  # read per Check: an attribute, not a call
        self.answers = config.answers
        self._all_dry_run = config.all_dry_run
        # Browser sign-in (`sessions:`): without a network client every provider is unreachable.
        self.browsers = (
            Browsers(
                settings,
                self.verifier,
                login_client or NoLogin(),
                clock=clock,
                store=session_store,
                events=session_events,
            )
            if settings.sessions is not None
            else None
        )

    async def identify(
        self, request: Request, trace: Trace | None = None
    ) -> tuple[Principal | None, errors.AuthError | None]:
        """The verified principal, or why the request's credentials do not yield one."""
        credential: Credential | None = None
        identity: tuple[Principal | None, errors.AuthError | None]
        try:
            credential = self.finder.find(request)
            if credential is None:
                identity = None, None
            else:
                principal = await self.verifier.verify(credential)
                if self._constrained:
                    principal = await self.constraints.check(principal, request)
                identity = principal, None
        except errors.AuthError as error:
            identity = None, error
        if trace is not None:
            trace.token = self._token_seen(credential, *identity)
        return identity

    async def decide(self, request: Request, trace: Trace | None = None) -> Decision:
        """The decision for ``request``; each stage also records what it checked in ``trace``."""
        # Without sessions, the rules' decision is the decision (no coroutine more per Check).
        decide = self._decide_rules if self.browsers is None else self._decide_sessions
        if trace is None:
            return await decide(request, None)
        trace.dry_run = self.settings.dry_run  # the matched rule's own mode replaces it
        trace.decision = await decide(request, trace)
        return trace.decision

    async def _decide_sessions(self, request: Request, trace: Trace | None) -> Decision:
        browsers = self.browsers
        assert browsers is not None
        decision = await self._decide_rules(request, trace)
        if isinstance(decision, Allow) and browsers.carries_session(request):
            # The session cookie never reaches a backend (a session route's or any other).
            return browsers.strip(request, decision)
        return decision

    async def _decide_rules(self, request: Request, trace: Trace | None) -> Decision:
        try:
            view = RequestView.of(request, self.settings.path_readings)
            browsers = self.browsers
            if browsers is not None and browsers.answers_path(view.path):
                if trace is not None:
                    trace.skip("session_endpoint")
                return await browsers.answer(request, view.path)
            if trace is not None:
                self.rules.trace_match(view, trace)
            matched = self.rules.choose(view)
        except errors.InvalidRequest as malformed:
            # A malformed host, or a path whose readings pick different rules: no rule can be
            # trusted to be the one the backend serves, so none decides (not even anonymous).
            if trace is not None:
                trace.skip("refused", malformed)
            return await self._unruled(self.answers.deny(malformed), request, self._all_dry_run, trace)
        if matched is None:
            if trace is not None:
                trace.skip("no_rule")
            denial = self.answers.deny(errors.NoMatchingRule())
            return await self._unruled(denial, request, self.settings.dry_run, trace)
        identity = await self.identify(request, trace)
        principal, error = identity
        rule = matched.rule
        if rule.login is not None and principal is None and error is None and self.browsers is not None:
            return await self._session_decision(request, matched, view, trace)
        if rule.anonymous:
            # An anonymous route ignores a bad token: the request goes on without identity.
            if trace is not None:
                trace.skip("anonymous")
            return self.answers.allow(request, principal, rule)
        decision: Decision
        if error is not None:
            decision = self.answers.deny(error, rule)
        elif principal is None:
            decision = self.answers.deny(errors.MissingToken(), rule)
        else:
            failed = self.rules.check_every_reading(matched, principal, view, trace)
            if failed is None:
                decision = self.answers.allow(request, principal, rule)
            else:
                decision = self.answers.deny(failed, rule, principal)
        if trace is not None and principal is None:
            trace.skip("not_verified" if error is not None else "no_token")
        if isinstance(decision, Deny) and rule.dry_run:
            return self._dry_run(decision, request, identity, matched)
        return decision

    async def _session_decision(
        self, request: Request, matched: Matched, view: RequestView, trace: Trace | None
    ) -> Decision:
        """A login rule's request without a bearer token: its session, else a sign-in."""
        browsers = self.browsers
        assert browsers is not None
        rule = matched.rule
        found = await browsers.session(request, rule)
        principal = found.principal
        if trace is not None and found.reason != "session":
            trace.skip(found.reason)
        decision: Decision
        if principal is None:
            if found.unavailable is not None:
                decision = self.answers.deny(found.unavailable, rule)
            else:
                decision = browsers.sign_in(request, rule, found) or self.answers.deny(
                    errors.MissingToken(), rule
                )
                if found.set_cookies and decision.status == 401:
                    cookies = tuple(("set-cookie", c) for c in found.set_cookies)
                    decision = replace(decision, headers=(*decision.headers, *cookies))
        else:
            failed = self.rules.check_every_reading(matched, principal, view, trace)
            if failed is None:
                return browsers.finish(request, self.answers.allow(request, principal, rule), found)
            decision = self.answers.deny(failed, rule, principal)
        if rule.dry_run:
            return self._dry_run(decision, request, (principal, None), matched)
        return decision

    async def _unruled(self, denial: Deny, request: Request, dry_run: bool, trace: Trace | None) -> Decision:
        """A denial no rule decided: let through in dry-run mode (the token is traced all the same)."""
        if dry_run:
            identity = await self.identify(request, trace)
            return self._dry_run(denial, request, identity, Matched(DEFAULT_RULE, {}))
        if trace is not None:
            await self.identify(request, trace)
        return denial

    def _dry_run(
        self,
        denial: Deny,
        request: Request,
        identity: tuple[Principal | None, errors.AuthError | None],
        matched: Matched,
    ) -> Decision:
        """Let the request through, recording the denial it would have had."""
        would = WouldDeny(denial.status, denial.code)
        log.warning(
            "dry-run: request allowed that would be denied",
            extra={
                "fields": {"rule": matched.rule.name, "dry_run_status": denial.status, "reason": denial.code}
            },
        )
        metadata = {"dry_run_denial": {"status": would.status, "code": would.code}}
        allow = self.answers.allow(request, identity[0], matched.rule, metadata, reason="dry_run")
        return replace(allow, would_deny=would)

    def _token_seen(
        self, credential: Credential | None, principal: Principal | None, error: errors.AuthError | None
    ) -> TokenSeen:
        locations = credential.locations if credential is not None else ()
        claimed = None
        if error is not None and credential is not None:
            provider = issuing_provider(self.settings, credential.token)
            claimed = provider.name if provider else None
        return TokenSeen(locations, principal, error, claimed)


def issuing_provider(settings: Settings, token: str) -> ProviderSettings | None:
    """The provider the token's ``iss`` names, read WITHOUT verification: for display and for
    placing a given token, never for a decision."""
    try:
        issuer = parse_token(token, settings.max_token_bytes).claims.get("iss")
    except errors.AuthError:
        return None
    if not isinstance(issuer, str):
        return None
    return next(
        (
            p
            for p in settings.providers
            if (p.issuer == issuer and p.issuer_template is None)
            or (p.issuer_template is not None and p.issuer_template.tenant_of(issuer) is not None)
        ),
        None,
    )
