"""Whether a principal satisfies a rule's requirements, judged three-valued (see ``Truth``). Pure.

``explain_requirement``, ``unknown_reason`` and ``cel_error_reason`` describe a judgement for
``ext-authz explain``; the request path never builds those descriptions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ext_authz.claims import claim_value
from ext_authz.config.model import (
    AllOf,
    AnyOf,
    Authentication,
    Claim,
    ClaimLocations,
    Expression,
    Not,
    Providers,
    Requirement,
    Roles,
    Scopes,
    Tenants,
)
from ext_authz.model import Principal
from ext_authz.paths import RequestView

NO_LOCATIONS = ClaimLocations((), (), ())
# How far in the future an auth_time may be (clocks differ): beyond it, it is refused.
AUTH_TIME_LEEWAY_SECONDS = 60


def _same(actual: object, expected: object) -> bool:
    """JSON equality: true is not 1, 1 is 1.0."""
    if isinstance(actual, bool) or isinstance(expected, bool):
        return isinstance(actual, bool) and isinstance(expected, bool) and actual == expected
    if isinstance(actual, int | float) and isinstance(expected, int | float):
        return actual == expected
    return type(actual) is type(expected) and actual == expected


def _claim_has(value: object, expected: object) -> Truth:
    """The claim is, or (an array) contains, the value. An element that is null, an object or an
    array cannot be compared: unknown, unless another element is the value."""
    if isinstance(value, list):
        result: Truth = False
        for v in value:
            if _same(v, expected):
                return True
            if v is None or isinstance(v, Mapping | list):
                result = None
        return result
    return _same(value, expected)


def _strings_at(claims: Mapping[str, object], paths: tuple[tuple[str, ...], ...], *, split: bool) -> set[str]:
    found: set[str] = set()
    for path in paths:
        value = claim_value(claims, path)
        if isinstance(value, str):
            found.update(value.split() if split else (value,))
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, str))
    return found


def granted_scopes(claims: Mapping[str, object], locations: ClaimLocations) -> frozenset[str]:
    """OAuth scopes at the provider's scope claims: space-separated strings or arrays."""
    return frozenset(_strings_at(claims, locations.scopes, split=True))


@dataclass(slots=True)
class Context:
    """What requirements look at for one request and principal."""

    principal: Principal
    locations: ClaimLocations
    view: RequestView
    params: Mapping[str, str]
    now: float = 0.0  # the clock's time, for auth_time (max_auth_age_seconds)
    _request_data: dict[str, object] | None = field(default=None)

    def cel_data(self, claims_used: frozenset[str] | None) -> dict[str, object]:
        if self._request_data is None:
            self._request_data = {
                "method": self.view.method,
                "path": self.view.path,
                "host": self.view.host,
                "headers": dict(self.view.request.headers),
            }
        claims = self.principal.claims
        if claims_used is None:
            selected = dict(claims)
        else:
            selected = {name: claims[name] for name in claims_used if name in claims}
        params = dict(self.params)
        tenant = self.principal.tenant
        if tenant is not None:
            # The path's own {tenant} parameter, when the rule has one, stays what the path says:
            # `params.tenant == claims.tid` must compare the path with the token, never the token
            # with itself.
            params.setdefault("tenant", tenant)
        return {"claims": selected, "request": self._request_data, "params": params}


# Requirements are judged three-valued, in Kleene's strong logic: True (satisfied), False (not
# satisfied) or None (unknown: a CEL runtime error or a non-boolean result, or a `claims:` leaf
# whose claim is absent, null, an object, or an array holding such a value and not the one asked
# for). all_of is False if any child is False, else None if any is None, else True; any_of is True
# if any child is True, else None if any is None, else False; not None is None. Only True allows:
# an error can never become an allow by negation. Without `not` this denies exactly what two-valued
# logic with "error = false" denied (both are monotone).
Truth = bool | None


def all_of(values: Iterable[Truth]) -> Truth:
    """Kleene conjunction, stopping at the first False."""
    result: Truth = True
    for value in values:
        if value is False:
            return False
        if value is None:
            result = None
    return result


def any_of(values: Iterable[Truth]) -> Truth:
    """Kleene disjunction, stopping at the first True: not all_of(not v) (De Morgan holds)."""
    return negate(all_of(negate(value) for value in values))


def negate(value: Truth) -> Truth:
    return None if value is None else not value


def evaluate(requirement: Requirement, ctx: Context) -> Truth:
    """True, False, or None when the requirement cannot be judged (see ``Truth``)."""
    claims = ctx.principal.claims
    if isinstance(requirement, AllOf):
        return all_of(evaluate(child, ctx) for child in requirement.children)
    if isinstance(requirement, AnyOf):
        return any_of(evaluate(child, ctx) for child in requirement.children)
    if isinstance(requirement, Not):
        return negate(evaluate(requirement.child, ctx))
    if isinstance(requirement, Providers):
        return ctx.principal.provider in requirement.names
    if isinstance(requirement, Scopes):
        # An absent scope claim grants the empty set: defined, and not satisfied.
        granted = granted_scopes(claims, ctx.locations)
        return all(scope in granted for scope in requirement.scopes)
    if isinstance(requirement, Claim):
        return _claim_result(requirement, claim_value(claims, requirement.path))
    if isinstance(requirement, Roles):
        paths = ctx.locations.roles if requirement.kind == "roles" else ctx.locations.groups
        present = _strings_at(claims, paths, split=False)
        return any(v in present for v in requirement.values)
    if isinstance(requirement, Tenants):
        return ctx.principal.tenant in requirement.values
    if isinstance(requirement, Authentication):
        return _authentication_result(requirement, claims, ctx.now)
    return _expression_result(requirement, ctx)


def _authentication_result(requirement: Authentication, claims: Mapping[str, object], now: float) -> bool:
    """RFC 9470 §3: ``acr`` one of those asked for, ``auth_time`` recent enough. An absent or
    malformed claim does not satisfy it (the client is asked to authenticate again)."""
    if requirement.acr and claims.get("acr") not in requirement.acr:
        return False
    if requirement.max_age_seconds is not None:
        auth_time = claims.get("auth_time")
        if (
            not isinstance(auth_time, int | float)
            or isinstance(auth_time, bool)
            or not math.isfinite(auth_time)
        ):
            return False
        if auth_time > now + AUTH_TIME_LEEWAY_SECONDS:
            return False  # an authentication in the future is no recent one
        return now - auth_time <= requirement.max_age_seconds
    return True


def holds(requirement: Requirement, ctx: Context) -> bool:
    """The requirement is satisfied (an unknown is not)."""
    return evaluate(requirement, ctx) is True


def _claim_result(requirement: Claim, value: object) -> Truth:
    # An absent (or null) claim, or an object, cannot be compared with a value: unknown, so that
    # `not: {claims: {...}}` denies a token that lacks the claim (fail closed). Several values
    # combine like all_of / any_of.
    if value is None or isinstance(value, Mapping):
        return None
    combine = all_of if requirement.mode == "all_of" else any_of
    return combine(_claim_has(value, expected) for expected in requirement.values)


def _expression_result(expression: Expression, ctx: Context) -> Truth:
    try:
        value = expression.program.eval(data=ctx.cel_data(expression.claims_used))
        if value.type().name().upper() == "BOOL":
            result = value.plain_value()
            if isinstance(result, bool):
                return result
    except Exception:  # noqa: S110 - the runtime raising rather than giving an error value: unknown
        pass
    return None  # a CEL runtime error, or a result that is not a boolean


def _expression_error(expression: Expression, ctx: Context) -> str:
    """Why the expression is unknown, safe to show (explain only: it evaluates again)."""
    try:
        value = expression.program.eval(data=ctx.cel_data(expression.claims_used))
        kind = value.type().name().upper()
    except Exception as exc:
        return f"evaluation failed ({type(exc).__name__})"
    if kind == "ERROR":
        return cel_error_reason(str(value.plain_value()), expression.text)
    return f"gives {kind.lower()}, not a boolean"


# CEL error messages may quote what the request carried (a claim value, a header value, even the
# Authorization header, as a map key not found): explain shows only type names and the operator's
# own words from the expression.
CEL_TYPE_NAMES = frozenset(
    ("bool", "int", "int64", "uint", "uint64", "double", "string", "bytes", "list", "map", "null_type",
     "type", "timestamp", "duration", "dyn", "message")
)  # fmt: skip
# The words of cel-cpp's runtime error messages: a message with any other word (one that is not a
# type name nor in the expression either) is shown as its status alone ("invalid argument").
_CEL_MESSAGE_WORDS = frozenset(
    """key not found in map no matching overloads overload cannot convert to type conversion error
    from failed invalid regular expression index integer overflow divide by zero modulus applying
    select non message out of range unsupported unknown no such field function argument value
    string timestamp duration""".split()  # noqa: SIM905
)
_CEL_STATUS = re.compile(r"^([A-Z_]+): ")
_QUOTED_TYPE = re.compile(r"""(['"])(?:%s)\1""" % "|".join(sorted(CEL_TYPE_NAMES)))  # noqa: UP031
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def cel_error_reason(message: str, expression_text: str) -> str:
    """A CEL runtime error, short and without data the request carried (for ``explain``).

    What cel-cpp puts after " : ", ": " or "=" (the key it did not find, an index, a regex error)
    is kept only when it is made of type names and words of the expression; the message itself
    only when made of the words cel-cpp's messages use, else its status alone.
    """
    text = message.strip()
    status = _CEL_STATUS.match(text)
    if status:
        text = text[status.end() :]
    head, _, detail = text.partition(" : ")  # cel-cpp puts the offending item after " : "
    head = head.partition(": ")[0].partition("=")[0].strip()  # "Index error: index=9 size=1"

    def known(word: str) -> bool:
        return word in CEL_TYPE_NAMES or word in expression_text or not word.strip("_")  # "_>_"

    bare = _QUOTED_TYPE.sub("", head)  # 'string', "int": quoted type names
    if (
        "'" in bare
        or '"' in bare
        or not all(w.lower() in _CEL_MESSAGE_WORDS or known(w) for w in _WORD.findall(bare))
    ):
        return status.group(1).lower().replace("_", " ") if status else "evaluation failed"
    detail = detail.strip()
    if len(detail) >= 2 and detail[0] == detail[-1] == '"':
        inner = detail[1:-1]
        detail = detail if inner and '"' not in inner and inner in expression_text else ""
    elif '"' in detail or "'" in detail or not all(known(w) for w in _WORD.findall(detail)):
        detail = ""
    reason = f"{head} {detail}" if detail else head
    reason = "".join(ch for ch in reason if ch.isprintable())[:120]
    return reason or "evaluation failed"


def unknown_reason(requirement: Requirement, ctx: Context) -> str:
    """Why ``requirement`` is unknown, safe to show (for ``explain``; never on the request path)."""
    if isinstance(requirement, AllOf | AnyOf | Not):
        return "a requirement below is an error"
    if isinstance(requirement, Claim):
        value = claim_value(ctx.principal.claims, requirement.path)
        if value is None:
            return f"claim {requirement.claim} is absent or null"
        if isinstance(value, Mapping):
            return f"claim {requirement.claim} is an object"
        return f"claim {requirement.claim} is an array with a null, object or array in it"
    if isinstance(requirement, Expression):
        return _expression_error(requirement, ctx)
    return "evaluation failed"


def describe(requirement: Requirement) -> str:
    if isinstance(requirement, AllOf):
        return "all of" if requirement.children else "a valid token"
    if isinstance(requirement, AnyOf):
        return "any of"
    if isinstance(requirement, Not):
        return "not"
    if isinstance(requirement, Providers):
        return f"provider in {sorted(requirement.names)}"
    if isinstance(requirement, Scopes):
        return f"scopes {list(requirement.scopes)}"
    if isinstance(requirement, Claim):
        values = [v for v in requirement.values]
        shown = repr(values[0]) if requirement.mode == "equals" else f"{requirement.mode} {values!r}"
        return f"claim {requirement.claim} = {shown}"
    if isinstance(requirement, Roles):
        return f"{requirement.kind} any of {list(requirement.values)}"
    if isinstance(requirement, Tenants):
        return f"tenant in {sorted(requirement.values)}"
    if isinstance(requirement, Authentication):
        parts = [f"acr in {list(requirement.acr)}"] if requirement.acr else []
        if requirement.max_age_seconds is not None:
            parts.append(f"authenticated within {requirement.max_age_seconds} s")
        return "authentication: " + ", ".join(parts)
    return f"expression {requirement.text}"


def explain_requirement(
    requirement: Requirement, ctx: Context, depth: int = 0
) -> list[tuple[int, str, Truth, str | None]]:
    """Each node in preorder: depth, description, truth, and why it is unknown (when it is)."""
    value = evaluate(requirement, ctx)
    reason = unknown_reason(requirement, ctx) if value is None else None
    steps = [(depth, describe(requirement), value, reason)]
    if isinstance(requirement, AllOf | AnyOf):
        for child in requirement.children:
            steps += explain_requirement(child, ctx, depth + 1)
    elif isinstance(requirement, Not):
        steps += explain_requirement(requirement.child, ctx, depth + 1)
    return steps
