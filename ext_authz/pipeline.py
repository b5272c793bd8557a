"""The decision core: request in, decision out. Imports no grpc, no protobuf, no HTTP client.

Stages: rule match → credential → identity → requirements → answer. Expected denials are values;
an AuthError raised by a stage is turned into a Deny here and never travels further.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ext_authz import errors
from ext_authz.authorization import Rules
from ext_authz.credentials import CredentialFinder
from ext_authz.identity import KeyResolver, Verifier
from ext_authz.model import Decision, Principal, Request, TokenLocation
from ext_authz.response import Answers
from ext_authz.settings import Settings


def token_locations(settings: Settings) -> list[TokenLocation]:
    locations: list[TokenLocation] = []
    for p in settings.providers:
        locations += [TokenLocation("header", h.name, h.prefix) for h in p.from_headers]
        locations += [TokenLocation("cookie", name) for name in p.from_cookies]
        locations += [TokenLocation("param", name) for name in p.from_params]
    return locations


class Pipeline:
    def __init__(
        self, settings: Settings, keys: KeyResolver, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self._rules = Rules(settings.rules)
        self._finder = CredentialFinder(token_locations(settings))
        self._verifier = Verifier(
            settings.providers, keys, max_token_bytes=settings.max_token_bytes, clock=clock
        )
        self.answers = Answers(settings)

    async def decide(self, request: Request) -> Decision:
        rule = self._rules.match(request)
        if rule is None:
            return self.answers.deny(errors.NoMatchingRule())
        principal: Principal | None = None
        try:
            credential = self._finder.find(request)
            if credential is not None:
                principal = await self._verifier.verify(credential)
        except errors.AuthError as error:
            if rule.anonymous:
                # An anonymous route ignores a bad token: the request goes on without identity.
                return self.answers.allow(request, None, rule.name)
            return self.answers.deny(error, rule.name)
        if rule.anonymous:
            return self.answers.allow(request, principal, rule.name)
        if principal is None:
            return self.answers.deny(errors.MissingToken(), rule.name)
        try:
            rule.check(principal)
        except errors.AuthError as error:
            return self.answers.deny(error, rule.name, principal.provider)
        return self.answers.allow(request, principal, rule.name)
