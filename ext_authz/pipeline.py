"""The decision core: request in, decision out. Imports no grpc, no protobuf, no HTTP client.

Stages: rule match → credential → identity → requirements → answer. Expected denials are values;
an AuthError raised by a stage is turned into a Deny here and never travels further. A rule in
dry-run mode computes and logs its decision but lets the request through.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ext_authz import errors
from ext_authz.authorization import Matched
from ext_authz.compiled import Compiled
from ext_authz.config.model import DEFAULT_RULE
from ext_authz.credentials import CredentialFinder
from ext_authz.identity import KeyResolver, Verifier
from ext_authz.model import Decision, Deny, Principal, Request
from ext_authz.paths import RequestView
from ext_authz.tokencache import CacheCounters, TokenCache

log = logging.getLogger(__name__)


class Pipeline:
    def __init__(
        self,
        config: Compiled,
        keys: KeyResolver,
        *,
        clock: Callable[[], float] = time.time,
        cache_counters: CacheCounters | None = None,
    ) -> None:
        settings = self.settings = config.settings
        self.config = config
        self.rules = config.rules
        self.finder = CredentialFinder(config.sources)
        entries = settings.token_cache_entries
        cache = TokenCache(entries, cache_counters) if entries else None
        self.verifier = Verifier(
            settings.providers, keys, max_token_bytes=settings.max_token_bytes, clock=clock, cache=cache
        )
        self.answers = config.answers
        self._all_dry_run = config.all_dry_run

    async def identify(self, request: Request) -> tuple[Principal | None, errors.AuthError | None]:
        """The verified principal, or why the request's credentials do not yield one."""
        try:
            credential = self.finder.find(request)
            if credential is None:
                return None, None
            return await self.verifier.verify(credential), None
        except errors.AuthError as error:
            return None, error

    async def decide(self, request: Request) -> Decision:
        try:
            view = RequestView.of(request, self.settings.path_readings)
            matched = self.rules.choose(view)
        except errors.InvalidRequest as malformed:
            # A malformed host, or a path whose readings pick different rules: no rule can be
            # trusted to be the one the backend serves, so none decides (not even anonymous).
            denial = self.answers.deny(malformed)
            if self._all_dry_run:
                return self._dry_run(denial, request, await self.identify(request), Matched(DEFAULT_RULE, {}))
            return denial
        if matched is None:
            denial = self.answers.deny(errors.NoMatchingRule())
            if self.settings.dry_run:
                return self._dry_run(denial, request, await self.identify(request), Matched(DEFAULT_RULE, {}))
            return denial
        identity = await self.identify(request)
        principal, error = identity
        rule = matched.rule
        if rule.anonymous:
            # An anonymous route ignores a bad token: the request goes on without identity.
            return self.answers.allow(request, principal, rule)
        decision: Decision
        if error is not None:
            decision = self.answers.deny(error, rule)
        elif principal is None:
            decision = self.answers.deny(errors.MissingToken(), rule)
        else:
            try:
                self.rules.check_every_reading(matched, principal, view)
                decision = self.answers.allow(request, principal, rule)
            except errors.AuthError as failed:
                decision = self.answers.deny(failed, rule, principal)
        if isinstance(decision, Deny) and rule.dry_run:
            return self._dry_run(decision, request, identity, matched)
        return decision

    def _dry_run(
        self,
        denial: Deny,
        request: Request,
        identity: tuple[Principal | None, errors.AuthError | None],
        matched: Matched,
    ) -> Decision:
        """Let the request through, recording the denial it would have had."""
        would = {"status": denial.status, "code": denial.code}
        log.warning(
            "dry-run: request allowed that would be denied",
            extra={
                "fields": {"rule": matched.rule.name, "dry_run_status": denial.status, "reason": denial.code}
            },
        )
        return self.answers.allow(
            request, identity[0], matched.rule, {"dry_run_denial": would}, reason=f"dry_run:{denial.code}"
        )
