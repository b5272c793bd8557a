"""One compile step per config: everything the request path reads, built once from the model.

``compile(settings)`` runs when a config is loaded or reloaded, never per request. The pipeline,
explain and the policy tests take its result; the server builds one per reload (with the key
store, which is runtime state and not part of it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ext_authz.authorization import Rules
from ext_authz.config.model import ProviderSettings, Settings
from ext_authz.response import Answers
from ext_authz.sources import TokenSource, provider_sources


@dataclass(frozen=True, slots=True)
class Compiled:
    settings: Settings
    by_issuer: Mapping[str, ProviderSettings]  # tokens are routed by their (unverified) iss
    sources: tuple[TokenSource, ...]  # every place any provider reads tokens, in config order
    owned_headers: frozenset[str]  # identity headers set on allowed requests, removed from all others
    rules: Rules  # matchers and requirement trees
    answers: Answers  # the Allow / Deny templates (realm, header removals)
    # Only then is a request that no rule can be chosen for let through (and logged).
    all_dry_run: bool


def compile(settings: Settings, clock: Callable[[], float] = time.time) -> Compiled:
    """``clock``: the time rules read (``max_auth_age_seconds``), the pipeline's own."""
    answers = Answers(settings)
    return Compiled(
        settings=settings,
        by_issuer={p.issuer: p for p in settings.providers},
        sources=tuple(dict.fromkeys(s for p in settings.providers for s in provider_sources(p))),
        owned_headers=answers.owned_headers,
        rules=Rules(settings.rules, settings.providers, clock),
        answers=answers,
        all_dry_run=settings.dry_run and all(rule.dry_run for rule in settings.rules),
    )
