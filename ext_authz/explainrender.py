"""How ``ext-authz explain`` shows an explanation: the values it is made of, as text or JSON.

Of the request, header and query parameter names are shown, never their values; of the token,
only where it was found, its verdict and its verified claims.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl

from ext_authz.config.model import RuleSettings
from ext_authz.model import Allow, Decision, Request
from ext_authz.trace import ReadingPicked, RuleTried

# ---- the explanation ----


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
    # The checks beyond the signature that held: (check, verdict), e.g. ("DPoP", "proof valid ...").
    checks: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class RequirementStep:
    """One requirement's result: satisfied, not satisfied, or an error (``error`` says why)."""

    depth: int
    text: str
    holds: bool  # satisfied; False both when not satisfied and when an error
    error: str | None = None  # set when the requirement could not be judged (it then denies)


@dataclass(frozen=True, slots=True)
class Explanation:
    request: Request
    normalised_path: str
    rules: tuple[RuleTried, ...]
    matched: RuleSettings | None
    params: Mapping[str, str]
    token: TokenVerdict
    requirements: tuple[RequirementStep, ...] | None
    requirements_note: str | None
    dry_run: bool
    decision: Decision
    # Every reading of the path when backends could read it differently (else empty).
    readings: tuple[ReadingPicked, ...] = ()


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
        would = decision.would_deny
        if would is not None:
            result["dry_run_denial"] = {"status": would.status, "code": would.code}
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
                "conditions": [{"condition": text, "holds": holds} for text, holds in r.conditions],
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
            "checks": [{"check": name, "verdict": verdict} for name, verdict in t.checks],
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
        lines += [f"      {_mark(holds)} {text}" for text, holds in trace.conditions]
    if e.matched is None:
        lines.append("  no rule matches")
    return lines


def _token_lines(t: TokenVerdict) -> list[str]:
    if not t.present:
        return ["token     none"]
    lines = [f"token     found in {', '.join(t.locations)}" if t.locations else "token     present"]
    if t.verified:
        lines.append(f"          verified: provider {t.provider}")
        lines += [f"          {name}: {verdict}" for name, verdict in t.checks]
        lines.append(f"          claims: {json.dumps(t.claims, sort_keys=True)}")
    else:
        lines.append(f"          not verified: {t.code} ({t.description})")
        if t.claimed_provider:
            lines.append(f"          its iss names provider {t.claimed_provider}")
    return lines


def _requirement_lines(e: Explanation) -> list[str]:
    title = f"requirements of {e.rules[-1].label}" if e.matched else "requirements"
    if e.requirements is None:
        return [f"{title}: {e.requirements_note or 'not evaluated'}"]
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
        if decision.would_deny is not None:
            would = decision.would_deny
            lines.append(f"          dry run: would have denied {would.status} {would.code}")
        lines += [f"          set header {n}: {v}" for n, v in decision.headers_to_set]
        lines += [f"          remove header {n}" for n in decision.headers_to_remove]
        lines += [f"          remove query parameter {n}" for n in decision.query_params_to_remove]
    else:
        lines.append(f"decision  DENY {decision.status} {decision.code}{attribution}")
        lines += [f"          {n}: {v}" for n, v in decision.headers]
        lines.append(f"          body: {decision.body}")
    return lines
