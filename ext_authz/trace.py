"""What the pipeline checked for one request, recorded only when a caller asks for it.

``Pipeline.decide(request, trace)`` fills a ``Trace`` as each stage runs: the path's readings and
the rules tried for them, where the credential was found and its verdict, the requirements judged
under each reading (or why they were not), the decision. ``ext-authz explain`` and
``ext-authz test`` render it; without a trace the request path builds none of it.

The token itself is never recorded: only where it was found, its verdict and verified claims.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from ext_authz.config.model import Requirement, RuleSettings
from ext_authz.errors import AuthError
from ext_authz.model import Decision, Principal
from ext_authz.requirements import Context, Truth, explain_requirement
from ext_authz.sources import TokenSource

# Why the requirements were not judged: the request was refused before a rule was chosen, no rule
# matches, the rule is anonymous, the token failed verification, or there is no token.
NotJudged = Literal[
    "refused", "no_rule", "anonymous", "not_verified", "no_token", "session_endpoint", "no_session",
    "session_invalid", "session_expired", "session_other_provider", "refresh_refused", "login_unavailable",
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class RuleTried:
    """One rule tried against the path's first reading, each match condition with whether it holds."""

    index: int
    name: str
    matched: bool
    conditions: tuple[tuple[str, bool], ...]

    @property
    def label(self) -> str:
        """The rule as the config names it: ``rules[2]``, or ``rules[2] "admin"`` when named."""
        default = f"rules[{self.index}]"
        return default if self.name == default else f"{default} {json.dumps(self.name)}"


@dataclass(frozen=True, slots=True)
class ReadingPicked:
    """One way a backend may read the path, and the rule it picks (None: no rule; listed when
    readings differ)."""

    how: str
    path: str
    rule: str | None
    params: Mapping[str, str]
    # Whether the rule's requirements hold under this reading (None: not evaluated); explain
    # fills it in from what was judged.
    requirements_hold: bool | None = None


@dataclass(frozen=True, slots=True)
class TokenSeen:
    """The identity stage's verdict: a principal, an error, or neither (no token)."""

    locations: tuple[TokenSource, ...]  # empty when none was found (or two different ones)
    principal: Principal | None
    error: AuthError | None
    # For a token that failed verification: the provider its unverified `iss` names.
    claimed_provider: str | None = None


@dataclass(frozen=True, slots=True)
class Judged:
    """The rule's requirements under one reading of the path: every node, and the denial (if any)."""

    path: str
    steps: tuple[tuple[int, str, Truth, str | None], ...]  # explain_requirement's preorder
    denial: AuthError | None


@dataclass(slots=True)
class Trace:
    """A recorder the pipeline's stages append to (mutable: one per traced request)."""

    # The path as rules read it (None: the request was refused before it was read).
    normalised_path: str | None = None
    rules: tuple[RuleTried, ...] = ()
    # The rule the path's first reading picks, and its parameters.
    matched: RuleSettings | None = None
    params: Mapping[str, str] = field(default_factory=dict)
    # Every reading, when backends could read the path differently (else empty).
    readings: tuple[ReadingPicked, ...] = ()
    # Whether the rule (or, without one, the config) is in dry-run mode.
    dry_run: bool = False
    token: TokenSeen | None = None
    judged: list[Judged] = field(default_factory=list)
    not_judged: NotJudged | None = None
    refused: AuthError | None = None
    decision: Decision | None = None

    def judge(self, require: Requirement, ctx: Context, denial: AuthError | None) -> None:
        steps = tuple(explain_requirement(require, ctx))
        self.judged.append(Judged(ctx.view.path, steps, denial))

    def skip(self, why: NotJudged, refused: AuthError | None = None) -> None:
        self.not_judged, self.refused = why, refused
