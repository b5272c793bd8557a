"""``ext-authz test CASES.yaml --config F``: policy tests for CI, like ``opa test``.

Each case is a request, optionally the claims of a token, and the expected answer. Every case is
decided by the real ``Pipeline.decide()`` over the config's rules and providers; only the keys are
stand-ins: each provider that issues a case's token gets a throwaway key pair (made on first use,
with an algorithm from its ``algorithms`` allow-list: ES256, else EdDSA, RS256, PS256, then any
other), the token is signed with it, and that provider's keys resolve to it. The config's real
keys are never fetched.

Case file::

    cases:
      - name: admin can delete               # optional; default "cases[0]"
        request:
          method: DELETE                     # optional; default GET
          path: /admin/users/1?x=1           # required; a query string may follow "?"
          host: api.example.com              # optional
          headers: {x-env: prod}             # optional
          context: {rule: admin-api}         # optional: Envoy's context_extensions
        claims: {sub: alice, scope: admin}   # optional: no claims, no token
        provider: example                    # optional (only with claims); default: the first provider
        expect:
          status: 200                        # required: 200 = allowed
          code: insufficient_scope           # optional: a denial's reason code (in dry-run, the
                                             #   would-be denial's)
          headers: {x-user-id: alice}        # optional: each set to exactly this value (on a
                                             #   denial: the answer's headers, www-authenticate ...)

Claims default to ``iss`` = the provider's issuer, its first audience at ``aud`` (or at the
provider's ``audience_claim``), ``iat`` = now and ``exp`` = now + 300; a case's claims override
them, and a claim set to null is left out (``exp: null`` for a token without expiry). The token
goes where the provider reads tokens first (its first ``from_headers`` entry, else cookie, else
query parameter), with ``typ: JWT`` (or the provider's accepted type) and a ``kid``.

Output: ``PASS name`` or ``FAIL name: expected 403, got 200 (...)`` per case (a denial by a
requirement that could not be judged adds ``error in <requirement>: <reason>``, as explain shows
it), then ``N passed, M failed``. Exit status 0 when every case passes, 1 when any fails, 2 when the case
file or the config is malformed (the message names the file and the key path, e.g.
``cases[2].expect.status``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ext_authz import jws
from ext_authz.compiled import compile
from ext_authz.config.model import ProviderSettings, Settings
from ext_authz.config.values import (
    METHOD,
    fail,
    header_name,
    listof,
    load_yaml_file,
    mapping,
    number,
    string,
    type_name,
)
from ext_authz.explain import build_request, explanation, token_location, with_token
from ext_authz.explainrender import RequirementStep
from ext_authz.keys.jwks import KeySet, VerificationKey
from ext_authz.keys.static import StaticKeys
from ext_authz.model import Allow, Decision, Request
from ext_authz.pipeline import Pipeline
from ext_authz.trace import Trace

TOKEN_LIFETIME_SECONDS = 300
# Fast to generate first; RSA (slow to generate) only for a provider that accepts nothing else.
ALGORITHM_PREFERENCE = (
    "ES256", "EdDSA", "RS256", "PS256", "ES384", "ES512", "RS384", "RS512", "PS384", "PS512",
)  # fmt: skip

# ---- the case file ----


@dataclass(frozen=True, slots=True)
class Expect:
    status: int
    code: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    request: Request  # without the token
    claims: Mapping[str, object] | None  # None: no token
    provider: str  # which provider issues the token
    expect: Expect


_CASE_KEYS = ("name", "request", "claims", "provider", "expect")
_REQUEST_KEYS = ("method", "path", "host", "headers", "context")
_EXPECT_KEYS = ("status", "code", "headers")


def _text(value: object, path: str) -> str:
    """A header or context value: YAML may read `2` or `true` as a number or boolean."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return string(value, path, allow_empty=True)


def _string_map(value: object, path: str) -> dict[str, object]:
    if not isinstance(value, dict):
        fail(path, f"must be a mapping, not {type_name(value)}")
    for key in value:
        if not isinstance(key, str):
            fail(f"{path}.{key}", "a key must be a string")
    return value


def _request(raw: object, path: str) -> Request:
    r = mapping(raw, path, _REQUEST_KEYS, required=("path",))
    method = string(r.get("method", "GET"), f"{path}.method").upper()
    if not METHOD.match(method):
        fail(f"{path}.method", f"{method!r} is not an HTTP method")
    headers = [
        (header_name(name, f"{path}.headers.{name}"), _text(value, f"{path}.headers.{name}"))
        for name, value in _string_map(r.get("headers", {}), f"{path}.headers").items()
    ]
    context = {
        key: _text(value, f"{path}.context.{key}")
        for key, value in _string_map(r.get("context", {}), f"{path}.context").items()
    }
    return build_request(
        method,
        string(r["path"], f"{path}.path"),
        host=string(r.get("host", ""), f"{path}.host", allow_empty=True),
        headers=headers,
        context=context,
    )


def _claims(raw: object, path: str) -> dict[str, object]:
    claims = _string_map(raw, path)
    for name, value in claims.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            fail(f"{path}.{name}", "must be a JSON value (quote dates and other YAML-only values)")
    return claims


def _expect(raw: object, path: str) -> Expect:
    e = mapping(raw, path, _EXPECT_KEYS, required=("status",))
    status = number(e["status"], f"{path}.status", 100, 599)
    if status != e["status"] or isinstance(e["status"], float):
        fail(f"{path}.status", "must be a whole number")
    code = string(e["code"], f"{path}.code") if "code" in e else None
    headers = {
        header_name(name, f"{path}.headers.{name}"): _text(value, f"{path}.headers.{name}")
        for name, value in _string_map(e.get("headers", {}), f"{path}.headers").items()
    }
    return Expect(int(status), code, headers)


def parse_cases(document: object, settings: Settings) -> tuple[Case, ...]:
    """Validate a decoded case file; raise ConfigError naming the first problem's key path."""
    top = mapping(document, "", ("cases",))
    if "cases" not in top:
        fail("cases", "is required (a list of cases)")
    providers = [p.name for p in settings.providers]
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(listof(top["cases"], "cases")):
        path = f"cases[{i}]"
        c = mapping(raw, path, _CASE_KEYS)
        name = string(c["name"], f"{path}.name") if "name" in c else path
        if name in seen:
            fail(f"{path}.name", f"another case (cases[{seen[name]}]) has the name {name!r}")
        seen[name] = i
        for key in ("request", "expect"):
            if key not in c:
                fail(f"{path}.{key}", "is required")
        claims = None if c.get("claims") is None else _claims(c["claims"], f"{path}.claims")
        provider = providers[0]
        if "provider" in c:
            provider = string(c["provider"], f"{path}.provider")
            if provider not in providers:
                fail(f"{path}.provider", f"no provider is named {provider!r}")
            if claims is None:
                fail(f"{path}.provider", "a provider issues a token: give the token's claims too")
        cases.append(
            Case(
                name,
                _request(c["request"], f"{path}.request"),
                claims,
                provider,
                _expect(c["expect"], f"{path}.expect"),
            )
        )
    return tuple(cases)


def load_cases(file: str | Path, settings: Settings) -> tuple[Case, ...]:
    """Read and validate a case file. Raises ConfigError (key path '' for file-level problems)."""
    return parse_cases(load_yaml_file(file), settings)


# ---- throwaway keys ----


@dataclass(frozen=True, slots=True)
class ThrowawayKey:
    """A key pair standing in for one provider's signing key."""

    kid: str
    alg: str
    typ: str
    private_key: jws.PrivateKey

    @property
    def verification_key(self) -> VerificationKey:
        return VerificationKey(self.kid, frozenset({self.alg}), self.private_key.public_key())

    def sign(self, claims: Mapping[str, object]) -> str:
        header = {"alg": self.alg, "typ": self.typ, "kid": self.kid}
        return jws.sign(header, claims, self.private_key, self.alg)


class ThrowawayKeys:
    """Throwaway keys, one per provider, made when a case first needs it; ``resolver`` resolves
    each provider's to it (a provider without one has an empty key set)."""

    def __init__(self, providers: tuple[ProviderSettings, ...]) -> None:
        self._providers = {p.name: p for p in providers}
        self._keys: dict[str, ThrowawayKey] = {}
        self.resolver = StaticKeys(keys=KeySet(()))

    def for_provider(self, name: str) -> ThrowawayKey:
        key = self._keys.get(name)
        if key is None:
            provider = self._providers[name]
            alg = next(a for a in ALGORITHM_PREFERENCE if a in provider.algorithms)
            typ = "JWT" if "jwt" in provider.token_types else sorted(provider.token_types)[0]
            key = ThrowawayKey(f"ext-authz-test-{name}", alg, typ, jws.generate_key(alg))
            self._keys[name] = key
            self.resolver.add(name, KeySet((key.verification_key,)))
        return key


def token_claims(provider: ProviderSettings, overrides: Mapping[str, object], now: int) -> dict[str, object]:
    """The provider's default claims (iss, audience, iat, exp) with the case's claims over them."""
    claims: dict[str, object] = {"iss": provider.issuer}
    audience_path = provider.claims.audience
    target = claims
    for segment in audience_path[:-1]:
        nested: dict[str, object] = {}
        target[segment] = nested
        target = nested
    target[audience_path[-1]] = provider.audiences[0]
    claims.update({"iat": now, "exp": now + TOKEN_LIFETIME_SECONDS})
    for name, value in overrides.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


# ---- running ----


def reason(decision: Decision) -> str | None:
    """A denial's code; for an allow in dry-run mode, the would-be denial's code."""
    if isinstance(decision, Allow):
        return decision.would_deny.code if decision.would_deny is not None else None
    return decision.code


def describe(decision: Decision) -> str:
    if isinstance(decision, Allow):
        text = f"allowed by rule {json.dumps(decision.rule)}"
        if decision.would_deny is not None:
            text += f"; dry run, would deny {decision.would_deny.status} {decision.would_deny.code}"
        return text
    return decision.code + (f", rule {json.dumps(decision.rule)}" if decision.rule else "")


def judge(expect: Expect, decision: Decision) -> tuple[str, ...]:
    """What differs from the expected answer (nothing: the case passes)."""
    problems: list[str] = []
    status = 200 if isinstance(decision, Allow) else decision.status
    if status != expect.status or (expect.code is not None and reason(decision) != expect.code):
        wanted = f"{expect.status} {expect.code}" if expect.code is not None else str(expect.status)
        problems.append(f"expected {wanted}, got {status} ({describe(decision)})")
    headers = dict(decision.headers_to_set if isinstance(decision, Allow) else decision.headers)
    for name, value in expect.headers.items():
        actual = headers.get(name)
        if actual != value:
            got = "not set" if actual is None else repr(actual)
            problems.append(f"header {name}: expected {value!r}, got {got}")
    return tuple(problems)


@dataclass(frozen=True, slots=True)
class Outcome:
    case: Case
    decision: Decision
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def line(self) -> str:
        return (
            f"PASS {self.case.name}" if self.passed else f"FAIL {self.case.name}: {'; '.join(self.problems)}"
        )


async def run_cases(
    settings: Settings, cases: tuple[Case, ...], *, clock: Callable[[], float] = time.time
) -> list[Outcome]:
    """Decide every case with the real pipeline; tokens are signed with throwaway keys."""
    keys = ThrowawayKeys(settings.providers)
    pipeline = Pipeline(compile(settings, clock), keys.resolver, clock=clock)
    providers = {p.name: p for p in settings.providers}
    outcomes: list[Outcome] = []
    for case in cases:
        request = case.request
        if case.claims is not None:
            provider = providers[case.provider]
            token = keys.for_provider(provider.name).sign(token_claims(provider, case.claims, int(clock())))
            request = with_token(request, token_location(provider), token)
        trace = Trace()
        decision = await pipeline.decide(request, trace)
        problems = judge(case.expect, decision)
        if problems and reason(decision) == "requirement_not_met":
            problems += requirement_errors(explanation(request, trace, decision).requirements or ())
        outcomes.append(Outcome(case, decision, problems))
    return outcomes


def requirement_errors(steps: tuple[RequirementStep, ...]) -> tuple[str, ...]:
    """The requirements that could not be judged (each denies), for a failed case's line."""
    errors = [
        f"{step.text}: {step.error}"
        for i, step in enumerate(steps)
        if step.error is not None and (i + 1 == len(steps) or steps[i + 1].depth <= step.depth)
    ]
    return (f"error in {'; '.join(errors)}",) if errors else ()


def summary(outcomes: list[Outcome]) -> str:
    passed = sum(o.passed for o in outcomes)
    return f"{passed} passed, {len(outcomes) - passed} failed"
