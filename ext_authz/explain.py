"""``ext-authz explain``: why one request is allowed or denied, step by step.

The final answer is ``Pipeline.decide()``'s own decision, adapted for display, so explain can
never disagree with the server. The steps beside it come from the same stage functions the
pipeline composes: ``Rules.match`` and ``explain_match`` (which rule, and why each earlier one did
not match), ``Pipeline.identify`` (the token verdict), ``Rules.context`` and
``explain_requirement`` (each requirement, nested for any_of / all_of / not).

Keys come from a JWKS file (offline: ``JwksFileKeys``, the same keys for every provider) or are
fetched like the server fetches them (``fetched_keys``: the real KeyStore, HttpFetcher and an
in-memory SharedKeyCache, waiting once for the first fetch).

The token is never printed: only where it was found, its verdict and its verified claims. Of the
request, header and query parameter names are shown, never their values.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

from ext_authz import errors
from ext_authz.authorization import Matched, Rules, explain_match
from ext_authz.compiled import compile
from ext_authz.config.model import (
    AllOf,
    AnyOf,
    JwksCacheSettings,
    Not,
    ProviderSettings,
    Requirement,
    RuleSettings,
    Settings,
)
from ext_authz.config.values import HEADER_NAME
from ext_authz.identity import KeyResolver, parse_token
from ext_authz.keys.cache import SharedKeyCache
from ext_authz.keys.fetch import HttpFetcher
from ext_authz.keys.jwks import JWKSError, KeySet, VerificationKey, parse_jwks, select_key
from ext_authz.keys.store import KeyStore
from ext_authz.model import Allow, Decision, Principal, Request
from ext_authz.paths import RequestView, path_readings
from ext_authz.pipeline import Pipeline
from ext_authz.requirements import Truth, explain_requirement
from ext_authz.sources import TokenSource, provider_sources

# Extra time, beyond the providers' own fetch timeouts, to let a failed first fetch report back.
FIRST_FETCH_MARGIN_SECONDS = 0.5


class UsageError(Exception):
    """A bad command-line value (the CLI exits 2 with this message)."""


# ---- the request ----


def parse_header(text: str) -> tuple[str, str]:
    """``'name: value'`` → (lower-case name, value)."""
    name, sep, value = text.partition(":")
    name = name.strip().lower()
    if not sep or not HEADER_NAME.match(name):
        raise UsageError(f"--header {text!r}: write 'name: value' with a valid header name")
    return name, value.strip()


def parse_context(text: str) -> tuple[str, str]:
    """``'key=value'`` → (key, value), as Envoy's context_extensions carry them."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--context {text!r}: write key=value")
    return key.strip(), value


def build_request(
    method: str,
    path: str,
    *,
    host: str = "",
    headers: Sequence[tuple[str, str]] = (),
    context: Mapping[str, str] | None = None,
) -> Request:
    """A Request as the transport adapter would build it: the query split off, repeated headers
    joined with "," (Envoy's encoding)."""
    path, _, query = path.partition("?")
    joined: dict[str, str] = {}
    for name, value in headers:
        joined[name] = f"{joined[name]},{value}" if name in joined else value
    return Request(method.upper(), path, query, host, joined, dict(context or {}))


def token_location(provider: ProviderSettings) -> TokenSource:
    """The first place ``provider`` reads tokens from: its first header, else cookie, else parameter."""
    return provider_sources(provider)[0]


def with_token(request: Request, location: TokenSource, token: str) -> Request:
    """``request`` carrying ``token`` at ``location`` (added to what is there, as a client would)."""
    return location.carry(request, token)


def issuing_provider(settings: Settings, token: str) -> ProviderSettings | None:
    """The provider the token's ``iss`` names, read WITHOUT verification: for display and for
    placing a given token, never for a decision."""
    try:
        issuer = parse_token(token, settings.max_token_bytes).claims.get("iss")
    except errors.AuthError:
        return None
    return next((p for p in settings.providers if p.issuer == issuer), None)


def provider_for_token(settings: Settings, token: str) -> ProviderSettings:
    """Where to put a given token: with the provider its ``iss`` names, else the first."""
    return issuing_provider(settings, token) or settings.providers[0]


# ---- keys ----


class JwksFileKeys:
    """A KeyResolver over one JWKS, used for every provider (``--jwks FILE``)."""

    def __init__(self, keys: KeySet) -> None:
        self.keys = keys

    async def key_for(self, provider: str, kid: str | None, alg: str) -> VerificationKey:
        return select_key(self.keys.candidates(kid, alg), kid)


def load_jwks_file(file: str) -> JwksFileKeys:
    try:
        document = json.loads(Path(file).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"--jwks {file}: cannot read the file: {exc.strerror or exc}") from None
    except ValueError:
        raise UsageError(f"--jwks {file}: not JSON") from None
    try:
        keys = parse_jwks(document, source=file)
    except JWKSError as exc:
        raise UsageError(f"--jwks {file}: {exc}") from None
    if not keys.keys:
        raise UsageError(f"--jwks {file}: contains no usable signature key")
    return JwksFileKeys(keys)


@contextlib.asynccontextmanager
async def fetched_keys(
    settings: Settings, *, clock: Callable[[], float] = time.time
) -> AsyncIterator[KeyStore]:
    """The providers' keys fetched as the server fetches them, after the first fetch of each
    (bounded by the providers' fetch timeouts); everything is closed on exit."""
    remote = [p for p in settings.providers if p.static_keys is None]
    fetcher = HttpFetcher() if remote else None
    cache = SharedKeyCache(JwksCacheSettings()) if remote else None
    changed = asyncio.Event()
    store = KeyStore(settings.providers, fetcher=fetcher, cache=cache, clock=clock, on_change=changed.set)

    def first_fetch_done(name: str) -> bool:
        keys = store.provider(name)
        return keys.usable() or sum(keys.stats.fetches.values()) > 0

    try:
        store.start()
        if remote:
            bound = max(p.keys.fetch_timeout_seconds for p in remote) + FIRST_FETCH_MARGIN_SECONDS
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(bound):
                    while not all(first_fetch_done(p.name) for p in remote):
                        changed.clear()
                        await changed.wait()
        yield store
    finally:
        await store.stop()
        if fetcher is not None:
            await fetcher.close()
        if cache is not None:
            await cache.close()


# ---- the explanation ----


@dataclass(frozen=True, slots=True)
class Check:
    text: str
    holds: bool


@dataclass(frozen=True, slots=True)
class RuleTrace:
    index: int
    name: str
    matched: bool
    conditions: tuple[Check, ...]

    @property
    def label(self) -> str:
        default = f"rules[{self.index}]"
        return default if self.name == default else f"{default} {json.dumps(self.name)}"


@dataclass(frozen=True, slots=True)
class TokenVerdict:
    present: bool
    locations: tuple[str, ...] = ()
    verified: bool = False
    provider: str | None = None
    claims: Mapping[str, object] | None = None
    # On failure: the stable reason code, its description and the status it answers with.
    code: str | None = None
    description: str | None = None
    status: int | None = None
    # The provider the token's unverified `iss` names (for a token that failed verification).
    claimed_provider: str | None = None


@dataclass(frozen=True, slots=True)
class RequirementStep:
    """One requirement's result: satisfied, not satisfied, or an error (``error`` says why)."""

    depth: int
    text: str
    holds: bool  # satisfied; False both when not satisfied and when an error
    error: str | None = None  # set when the requirement could not be judged (it then denies)


@dataclass(frozen=True, slots=True)
class PathReading:
    """One way a backend may read the path, and the rule it picks (listed when readings differ)."""

    how: str
    path: str
    rule: str | None
    params: Mapping[str, str]
    # Whether the rule's requirements hold under this reading (None: not evaluated).
    requirements_hold: bool | None = None


@dataclass(frozen=True, slots=True)
class Explanation:
    request: Request
    normalised_path: str
    rules: tuple[RuleTrace, ...]
    matched: RuleSettings | None
    params: Mapping[str, str]
    token: TokenVerdict
    requirements: tuple[RequirementStep, ...] | None
    requirements_note: str | None
    dry_run: bool
    decision: Decision
    # Every reading of the path when backends could read it differently (else empty).
    readings: tuple[PathReading, ...] = ()


async def explain(pipeline: Pipeline, request: Request) -> Explanation:
    refused: errors.AuthError | None = None
    try:
        view: RequestView | None = RequestView.of(request, pipeline.settings.path_readings)
    except errors.InvalidRequest as malformed:
        view, refused = None, malformed
    matched = pipeline.rules.match(view) if view is not None else None
    traces: list[RuleTrace] = []
    for index, rule in enumerate(pipeline.rules.rules if view is not None else ()):
        assert view is not None
        hit = matched is not None and rule is matched.rule
        conditions = tuple(Check(text, ok) for text, ok in explain_match(rule.match, view))
        traces.append(RuleTrace(index, rule.name, hit, conditions))
        if hit:
            break

    principal, error = await pipeline.identify(request)
    token = _token_verdict(pipeline, request, principal, error)

    readings: tuple[PathReading, ...] = ()
    if view is not None:
        try:
            pipeline.rules.choose(view)
        except errors.InvalidRequest as malformed:
            refused = malformed
    if view is not None and view.other_paths:
        judged = principal if refused is None and matched is not None and not matched.rule.anonymous else None
        readings = _readings(pipeline.rules, request, view, judged, matched)

    requirements: tuple[RequirementStep, ...] | None = None
    note: str | None = None
    if refused is not None:
        note = f"not evaluated: {refused.detail} (400 {refused.code})"
    elif matched is None:
        note = "no rule matches the request"
    elif matched.rule.anonymous:
        note = "none: the rule allows anonymous requests (a token is used when valid, ignored when not)"
    elif principal is None:
        note = f"not evaluated: {'the token was not verified' if error is not None else 'no token'}"
    else:
        assert view is not None  # a request without one is refused above
        ctx = pipeline.rules.context(matched, principal, view)
        steps = explain_requirement(matched.rule.require, ctx)
        requirements = _without_wrappers(matched.rule.require, steps)

    decision = await pipeline.decide(request)
    return Explanation(
        request=request,
        normalised_path=view.path if view is not None else request.path,
        rules=tuple(traces),
        matched=matched.rule if matched else None,
        params=dict(matched.params) if matched else {},
        token=token,
        requirements=requirements,
        requirements_note=note,
        dry_run=matched.rule.dry_run if matched else pipeline.settings.dry_run,
        decision=decision,
        readings=readings,
    )


def _readings(
    rules: Rules, request: Request, view: RequestView, principal: Principal | None, matched: Matched | None
) -> tuple[PathReading, ...]:
    """Each reading of the path, the rule it picks and (for a token rule every reading picks)
    whether the requirements hold under it."""
    shown: list[PathReading] = []
    for how, path in path_readings(request.path):
        reading = view.reading(path)
        picked = rules.match(reading)
        holds: bool | None = None
        if principal is not None and matched is not None:
            try:
                rules.check(matched, rules.context(matched, principal, reading))
                holds = True
            except errors.AuthError:
                holds = False
        shown.append(
            PathReading(
                how, path, picked.rule.name if picked else None, dict(picked.params) if picked else {}, holds
            )
        )
    return tuple(shown)


def _preorder(requirement: Requirement) -> Iterator[Requirement]:
    """The nodes in the order ``explain_requirement`` lists them."""
    yield requirement
    if isinstance(requirement, AllOf | AnyOf):
        for child in requirement.children:
            yield from _preorder(child)
    elif isinstance(requirement, Not):
        yield from _preorder(requirement.child)


def _without_wrappers(
    root: Requirement, steps: list[tuple[int, str, Truth, str | None]]
) -> tuple[RequirementStep, ...]:
    """The steps, leaving out the "all of" that wraps each single requirement map inside
    any_of / all_of / not (it holds exactly when its one child does)."""
    shown: list[RequirementStep] = []
    lifted: list[int] = []  # depths of the wrappers left out, innermost last
    for node, (depth, text, value, reason) in zip(_preorder(root), steps, strict=True):
        while lifted and depth <= lifted[-1]:
            lifted.pop()
        if node is not root and isinstance(node, AllOf) and len(node.children) == 1:
            lifted.append(depth)
            continue
        shown.append(RequirementStep(depth - len(lifted), text, value is True, reason))
    return tuple(shown)


def _token_verdict(
    pipeline: Pipeline, request: Request, principal: Principal | None, error: errors.AuthError | None
) -> TokenVerdict:
    try:
        credential = pipeline.finder.find(request)
    except errors.AuthError:
        credential = None  # two different tokens: `error` says so
    locations = tuple(str(loc) for loc in credential.locations) if credential else ()
    if principal is not None:
        return TokenVerdict(
            True, locations, verified=True, provider=principal.provider, claims=dict(principal.claims)
        )
    if error is None:
        return TokenVerdict(False)
    claimed = issuing_provider(pipeline.settings, credential.token) if credential is not None else None
    return TokenVerdict(
        True,
        locations,
        code=error.code,
        description=error.detail,
        status=error.status,
        claimed_provider=claimed.name if claimed else None,
    )


# ---- output ----


def _mark(holds: bool) -> str:
    return "[x]" if holds else "[ ]"


def _query_names(query: str) -> list[str]:
    return list(dict.fromkeys(name for name, _ in parse_qsl(query, keep_blank_values=True)))


def decision_json(decision: Decision) -> dict[str, object]:
    if isinstance(decision, Allow):
        result: dict[str, object] = {
            "allowed": True,
            "status": 200,
            "rule": decision.rule,
            "provider": decision.provider,
            "headers_to_set": [{"name": n, "value": v} for n, v in decision.headers_to_set],
            "headers_to_remove": list(decision.headers_to_remove),
            "query_parameters_to_remove": list(decision.query_params_to_remove),
        }
        if "dry_run_denial" in decision.metadata:
            result["dry_run_denial"] = decision.metadata["dry_run_denial"]
        return result
    return {
        "allowed": False,
        "status": decision.status,
        "code": decision.code,
        "rule": decision.rule or None,
        "provider": decision.provider,
        "headers": [{"name": n, "value": v} for n, v in decision.headers],
        "www_authenticate": dict(decision.headers).get("www-authenticate"),
        "body": json.loads(decision.body),
    }


def as_json(e: Explanation) -> dict[str, object]:
    t = e.token
    return {
        "request": {
            "method": e.request.method,
            "path": e.request.path,
            "normalised_path": e.normalised_path,
            "host": e.request.host,
            "headers": sorted(e.request.headers),
            "query_parameters": _query_names(e.request.query),
            "context": dict(e.request.context),
            "readings": [
                {
                    "how": r.how,
                    "path": r.path,
                    "rule": r.rule,
                    "params": dict(r.params),
                    "requirements_hold": r.requirements_hold,
                }
                for r in e.readings
            ],
        },
        "rules": [
            {
                "index": r.index,
                "name": r.name,
                "matched": r.matched,
                "conditions": [{"condition": c.text, "holds": c.holds} for c in r.conditions],
            }
            for r in e.rules
        ],
        "matched_rule": e.matched.name if e.matched else None,
        "anonymous": e.matched.anonymous if e.matched else False,
        "params": dict(e.params),
        "token": {
            "present": t.present,
            "locations": list(t.locations),
            "verified": t.verified,
            "provider": t.provider,
            "claims": t.claims,
            "error": None
            if t.code is None
            else {
                "code": t.code,
                "description": t.description,
                "status": t.status,
                "claimed_provider": t.claimed_provider,
            },
        },
        "requirements": None
        if e.requirements is None
        else [
            {"depth": s.depth, "requirement": s.text, "holds": s.holds, "error": s.error}
            for s in e.requirements
        ],
        "requirements_note": e.requirements_note,
        "dry_run": e.dry_run,
        "decision": decision_json(e.decision),
    }


def render_json(e: Explanation) -> str:
    return json.dumps(as_json(e), indent=2)


def render_text(e: Explanation) -> str:
    lines = [
        *_request_lines(e),
        *_rule_lines(e),
        *_token_lines(e.token),
        *_requirement_lines(e),
        *_decision_lines(e),
    ]
    return "\n".join(lines) + "\n"


def _request_lines(e: Explanation) -> list[str]:
    r = e.request
    judged = f"  (judged as {e.normalised_path})" if e.normalised_path != r.path else ""
    lines = [f"request   {r.method} {r.path}{judged}"]
    if r.host:
        lines.append(f"          host {r.host}")
    if r.headers:
        lines.append(f"          header names: {', '.join(sorted(r.headers))}")
    if r.query:
        lines.append(f"          query parameter names: {', '.join(_query_names(r.query))}")
    if r.context:
        lines.append(f"          context: {', '.join(f'{k}={v}' for k, v in r.context.items())}")
    if e.readings:
        lines.append("          backends may read the path as (every reading must pick the same rule):")
        for reading in e.readings:
            rule = json.dumps(reading.rule) if reading.rule is not None else "no rule"
            params = "".join(f" {k}={v}" for k, v in reading.params.items())
            verdict = {None: "", True: "  requirements hold", False: "  requirements fail"}
            held = verdict[reading.requirements_hold]
            lines.append(f"            {reading.path}  ({reading.how}) -> {rule}{params}{held}")
    return lines


def _rule_lines(e: Explanation) -> list[str]:
    lines = ["rules     (in order; the first that matches applies)"]
    for trace in e.rules:
        verdict = "MATCHED" if trace.matched else "no match"
        if trace.matched and e.params:
            verdict += "  params: " + ", ".join(f"{k}={v}" for k, v in e.params.items())
        lines.append(f"  {trace.label}: {verdict}")
        lines += [f"      {_mark(c.holds)} {c.text}" for c in trace.conditions]
    if e.matched is None:
        lines.append("  no rule matches")
    return lines


def _token_lines(t: TokenVerdict) -> list[str]:
    if not t.present:
        return ["token     none"]
    lines = [f"token     found in {', '.join(t.locations)}" if t.locations else "token     present"]
    if t.verified:
        lines.append(f"          verified: provider {t.provider}")
        lines.append(f"          claims: {json.dumps(t.claims, sort_keys=True)}")
    else:
        lines.append(f"          not verified: {t.code} ({t.description})")
        if t.claimed_provider:
            lines.append(f"          its iss names provider {t.claimed_provider}")
    return lines


def _requirement_lines(e: Explanation) -> list[str]:
    title = f"requirements of {e.rules[-1].label}" if e.matched else "requirements"
    if e.requirements is None:
        return [f"{title}: {e.requirements_note}"]
    return [title] + [f"      {'  ' * s.depth}{_requirement_mark(s)}" for s in e.requirements]


def _requirement_mark(step: RequirementStep) -> str:
    if step.error is not None:
        return f"[!] {step.text}  (error: {step.error})"
    return f"{_mark(step.holds)} {step.text}"


def _decision_lines(e: Explanation) -> list[str]:
    decision = e.decision
    lines = ["mode      dry_run: a denial is only logged; the request is let through"] if e.dry_run else []
    by = [f"rule {json.dumps(decision.rule)}"] if decision.rule else []
    by += [f"provider {decision.provider}"] if decision.provider else []
    attribution = f" ({', '.join(by)})" if by else ""
    if isinstance(decision, Allow):
        lines.append(f"decision  ALLOW 200{attribution}")
        denial = decision.metadata.get("dry_run_denial")
        if isinstance(denial, Mapping):
            lines.append(f"          dry run: would have denied {denial['status']} {denial['code']}")
        lines += [f"          set header {n}: {v}" for n, v in decision.headers_to_set]
        lines += [f"          remove header {n}" for n in decision.headers_to_remove]
        lines += [f"          remove query parameter {n}" for n in decision.query_params_to_remove]
    else:
        lines.append(f"decision  DENY {decision.status} {decision.code}{attribution}")
        lines += [f"          {n}: {v}" for n, v in decision.headers]
        lines.append(f"          body: {decision.body}")
    return lines


# ---- the command ----


async def run(
    settings: Settings,
    request: Request,
    keys: KeyResolver | None,
    *,
    clock: Callable[[], float] = time.time,
) -> Explanation:
    """Explain ``request`` with these keys, or with keys fetched like the server's when None."""
    if keys is not None:
        return await explain(Pipeline(compile(settings), keys, clock=clock), request)
    async with fetched_keys(settings, clock=clock) as store:
        return await explain(Pipeline(compile(settings), store, clock=clock), request)
