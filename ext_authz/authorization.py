r"""Stage 3: which rule applies to a request, and does the principal satisfy it. Pure.

Rules come compiled from ``config/rules.py``. Matching normalises the path once per request so that
``/public/../admin`` or ``/public/%2e%2e/admin`` is judged as ``/admin`` (RFC 3986 §6.2.2:
percent-decoding of unreserved characters, then removal of dot segments), and ``//admin`` as
``/admin``. Template parameters are percent-decoded after matching.

Backends do not all read a path the RFC 3986 way: Tomcat and Jetty drop ``;params`` from every
segment before resolving dot segments (``/public/..;/admin`` is ``/admin`` to them), others decode
``%2F`` / ``%5C`` or take ``\`` as a separator, decode twice, stop at ``%00``, or keep ``//``
(RFC 3986 to the letter: ``/admin//../x`` is ``/admin/x``). When a path contains any of ``;``,
``\``, ``//``, ``%2F``, ``%5C``, ``%25`` or ``%00`` (any case), or a ``%`` not followed by two hex
digits, ``path_readings`` lists every reading,
and under ``path_readings: all`` (the default) every reading must pick the same rule with the
same template parameters (else 400 ``ambiguous_path``) and the rule's requirements must hold under
each. Any other path has exactly one reading and costs nothing extra.

The host is compared in its one canonical spelling (``hosts.py``); a malformed authority is 400
``invalid_host``.

Every check can also report what it looked at (``explain``) for ``ext-authz explain``; the
request path never builds those descriptions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal
from urllib.parse import unquote

from ext_authz import errors
from ext_authz.claims import claim_value
from ext_authz.config.model import (
    AllOf,
    AnyOf,
    Claim,
    ClaimLocations,
    Expression,
    Match,
    Not,
    Providers,
    ProviderSettings,
    Regex,
    Requirement,
    Roles,
    RuleSettings,
    Scopes,
)
from ext_authz.hosts import canonical_host
from ext_authz.model import Principal, Request

_UNRESERVED_ESCAPE = re.compile(r"%(2[dDeE]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA]|5[fF]|7[eE])")
_SLASHES = re.compile(r"/{2,}")
NO_LOCATIONS = ClaimLocations((), (), ())


def normalise_path(path: str, *, merge_slashes: bool = True) -> str:
    """The path as rules see it: unreserved escapes decoded, dot segments removed, '//' merged.

    ``merge_slashes=False`` is RFC 3986 to the letter (Java's URI.normalize, WHATWG URL parsers):
    ``/admin//../x`` is ``/admin/x`` there, ``/x`` after merging.
    """
    if not path:
        return path
    if "%" in path:
        path = _UNRESERVED_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), path)
    if merge_slashes and "//" in path:
        path = _SLASHES.sub("/", path)
    if "." not in path:
        return path
    output: list[str] = []
    segments = path.split("/")
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "..":
            if len(output) > 1:
                output.pop()
            if last:
                output.append("")
        elif segment == ".":
            if last:
                output.append("")
        else:
            output.append(segment)
    return "/".join(output) or "/"


# ---- the readings of a path that backends may take ----

PathReadings = Literal["all", "rfc3986"]

_SEPARATOR_ESCAPE = re.compile(r"%(?:2[fF]|5[cC])")
# A "%" not followed by two hex digits is a stray one: a lenient decoder keeps it, and the escapes
# after it may spell a new escape once decoded (`%%32%65` is `%2e`).
_READING_TRIGGER = re.compile(r"[;\\]|//|%(?:2[fF]|5[cC]|25|00|(?![0-9a-fA-F]{2}))")
_STRAY_PERCENT = re.compile(r"%(?![0-9a-fA-F]{2})")


def _strip_params(path: str) -> str:
    """Tomcat, Jetty, Spring: ``;params`` removed from every segment (``/a;x=1/b`` is ``/a/b``)."""
    return "/".join(segment.partition(";")[0] for segment in path.split("/"))


def _cut_params(path: str) -> str:
    """Servers that end the path at its first ``;`` (``/a;x/../b`` is ``/a``)."""
    return path.partition(";")[0]


def _cut_nul(path: str) -> str:
    """C-based servers that decode ``%00`` and stop there (``/a%00/../b`` is ``/a``)."""
    return path.partition("%00")[0]


def _separators(path: str) -> str:
    """Servers that decode ``%2F`` and ``%5C``, or take ``\\`` as ``/`` (IIS, Windows, some proxies)."""
    return _SEPARATOR_ESCAPE.sub("/", path).replace("\\", "/")


_PERCENT_ESCAPES = re.compile(r"%(?:25)+")


def _decode_percent(path: str) -> str:
    """Servers that decode again: ``%252e`` is ``%2e`` (then ``.``), ``%25252e`` too: ``%25`` is
    decoded until none is left, in one linear pass (a loop of ``replace`` would be quadratic).

    The first decoding decodes the unreserved escapes too, so that escaped hex digits after a
    ``%`` count: ``%25%32%65`` is ``%2e`` to a double decoder, and ``%%32%65`` to a single one."""
    if "%" in path:
        path = _UNRESERVED_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), path)
    return _PERCENT_ESCAPES.sub("%", path)


_TRANSFORMS: tuple[tuple[str, tuple[Callable[[str], str], ...]], ...] = (
    ("rfc3986", ()),
    (";params stripped per segment", (_strip_params,)),
    ("path cut at ';'", (_cut_params,)),
    ("%2F %5C \\ as '/'", (_separators,)),
    (";params stripped, then %2F %5C \\ as '/'", (_strip_params, _separators)),
    ("%2F %5C \\ as '/', then ;params stripped", (_separators, _strip_params)),
    ("%2F %5C \\ as '/', path cut at ';'", (_separators, _cut_params)),
    ("path cut at %00", (_cut_nul,)),
)


def has_other_readings(path: str) -> bool:
    """Whether a backend could read ``path`` otherwise than RFC 3986 does (the fast test)."""
    return (
        ";" in path
        or "\\" in path
        or "//" in path
        or ("%" in path and _READING_TRIGGER.search(path) is not None)
    )


def path_readings(path: str) -> tuple[tuple[str, str], ...]:
    """(how, normalised path) for every distinct reading of ``path``, the RFC 3986 one first."""
    readings = {normalise_path(path): "rfc3986"}
    if not has_other_readings(path):
        return tuple((how, p) for p, how in readings.items())
    bases = [("", path)]
    if "%25" in path or _STRAY_PERCENT.search(path):
        bases.append(("%25 decoded again", _decode_percent(path)))
    for again, base in bases:
        for how, steps in _TRANSFORMS:
            text = base
            for step in steps:
                text = step(text)
            label = ", ".join(filter(None, (again, how if steps else ""))) or how
            readings.setdefault(normalise_path(text), label)
            if "//" in text:
                readings.setdefault(normalise_path(text, merge_slashes=False), f"{label}, '//' kept")
    return tuple((how, p) for p, how in readings.items())


def host_name(authority: str) -> str:
    """The host of an :authority value in its canonical spelling ("" when there is none).

    Raises InvalidHost when the authority is malformed: a spelling ext-authz cannot read with
    certainty is refused rather than judged as some other host.
    """
    if not authority:
        return ""
    host = canonical_host(authority)
    if host is None:
        raise errors.InvalidHost()
    return host


@dataclass(frozen=True, slots=True)
class RequestView:
    """What rules look at, computed once per request.

    ``path`` is the RFC 3986 reading; ``other_paths`` the other readings a backend could take,
    when they differ (empty for nearly every request).
    """

    request: Request
    method: str
    path: str
    host: str
    other_paths: tuple[str, ...] = ()

    @classmethod
    def of(cls, request: Request, readings: PathReadings = "all") -> RequestView:
        """Raises InvalidHost for a malformed authority."""
        path = request.path
        host = host_name(request.host)
        if readings == "all" and has_other_readings(path):
            normal, *others = (p for _, p in path_readings(path))
            return cls(request, request.method.upper(), normal, host, tuple(others))
        return cls(request, request.method.upper(), normalise_path(path), host)

    def reading(self, path: str) -> RequestView:
        """This request as judged under another reading of its path."""
        return replace(self, path=path, other_paths=())


# ---- match ----


def match_params(match: Match, view: RequestView) -> dict[str, str] | None:
    """The template parameters when every condition holds, else None."""
    if match.methods is not None and view.method not in match.methods:
        return None
    if (match.hosts is not None or match.host_suffixes) and not _host_ok(match, view.host):
        return None
    headers = view.request.headers
    for condition in match.headers:
        if not _header_ok(condition.kind, headers.get(condition.name), condition.value, condition.regex):
            return None
    for key, value in match.context:
        if view.request.context.get(key) != value:
            return None
    if match.paths is None:
        return {}
    for pattern in match.paths:
        params = pattern.match(view.path)
        if params is not None:
            return {k: unquote(v) for k, v in params.items()} if params else params
    return None


def _host_ok(match: Match, host: str) -> bool:
    if match.hosts and host in match.hosts:
        return True
    return any(host.endswith(suffix) and len(host) > len(suffix) for suffix in match.host_suffixes)


def _header_ok(kind: str, actual: str | None, value: str | None, regex: Regex | None) -> bool:
    if kind == "present":
        return actual is not None
    if kind == "absent":
        return actual is None
    if actual is None:
        return False
    if kind == "equals":
        return actual == value
    assert regex is not None
    try:
        return regex.fullmatch(actual) is not None
    except UnicodeEncodeError:  # a lone surrogate (never from gRPC: protobuf strings are UTF-8)
        return False


def explain_match(match: Match, view: RequestView) -> list[tuple[str, bool]]:
    """Each condition of ``match`` and whether it holds (for ``explain``)."""
    steps: list[tuple[str, bool]] = []
    if match.methods is not None:
        steps.append((f"method {view.method} in {sorted(match.methods)}", view.method in match.methods))
    if match.hosts is not None or match.host_suffixes:
        wanted = sorted(match.hosts or ()) + [f"*{s}" for s in match.host_suffixes]
        steps.append((f"host {view.host!r} in {wanted}", _host_ok(match, view.host)))
    for c in match.headers:
        steps.append((c.describe(), _header_ok(c.kind, view.request.headers.get(c.name), c.value, c.regex)))
    for key, value in match.context:
        steps.append((f"context {key} = {value!r}", view.request.context.get(key) == value))
    if match.paths is not None:
        hit = any(p.match(view.path) is not None for p in match.paths)
        steps.append((f"path {view.path!r} matches {[p.text for p in match.paths]}", hit))
    if not steps:
        steps.append(("matches every request", True))
    return steps


# ---- require ----


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
        return {"claims": selected, "request": self._request_data, "params": dict(self.params)}


# Requirements are judged three-valued, in Kleene's strong logic: True (satisfied), False (not
# satisfied) or None (unknown: a CEL runtime error or a non-boolean result, or a `claims:` leaf
# whose claim is absent, null, an object, or an array holding such a value and not the one asked
# for). all_of is False if any child is False, else None if any is None, else True; any_of is True
# if any child is True, else None if any is None, else False; not None is None. Only True allows:
# an error can never become an allow by negation. Without `not` this denies exactly what two-valued
# logic with "error = false" denied (both are monotone).
Truth = bool | None


def evaluate(requirement: Requirement, ctx: Context) -> Truth:
    """True, False, or None when the requirement cannot be judged (see ``Truth``)."""
    claims = ctx.principal.claims
    if isinstance(requirement, AllOf):
        result: Truth = True
        for child in requirement.children:
            value = evaluate(child, ctx)
            if value is False:
                return False
            if value is None:
                result = None
        return result
    if isinstance(requirement, AnyOf):
        result = False
        for child in requirement.children:
            value = evaluate(child, ctx)
            if value is True:
                return True
            if value is None:
                result = None
        return result
    if isinstance(requirement, Not):
        value = evaluate(requirement.child, ctx)
        return None if value is None else not value
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
    return _expression_result(requirement, ctx)


def holds(requirement: Requirement, ctx: Context) -> bool:
    """The requirement is satisfied (an unknown is not)."""
    return evaluate(requirement, ctx) is True


def _claim_result(requirement: Claim, value: object) -> Truth:
    # An absent (or null) claim, or an object, cannot be compared with a value: unknown, so that
    # `not: {claims: {...}}` denies a token that lacks the claim (fail closed). Several values
    # combine like all_of / any_of.
    if value is None or isinstance(value, Mapping):
        return None
    if requirement.mode == "all_of":
        result: Truth = True
        for expected in requirement.values:
            has = _claim_has(value, expected)
            if has is False:
                return False
            if has is None:
                result = None
        return result
    result = False
    for expected in requirement.values:
        has = _claim_has(value, expected)
        if has is True:
            return True
        if has is None:
            result = None
    return result


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


# ---- rules ----


def _mentions_host(requirement: Requirement) -> bool:
    if isinstance(requirement, AllOf | AnyOf):
        return any(_mentions_host(child) for child in requirement.children)
    if isinstance(requirement, Not):
        return _mentions_host(requirement.child)
    return isinstance(requirement, Expression) and "host" in requirement.text


@dataclass(frozen=True, slots=True)
class Matched:
    rule: RuleSettings
    params: Mapping[str, str]


class Rules:
    """The ordered rules of a config: the first that matches applies."""

    def __init__(self, rules: tuple[RuleSettings, ...], providers: tuple[ProviderSettings, ...]) -> None:
        self.rules = rules
        self._locations = {p.name: p.claims for p in providers}
        # Whether any rule reads the host (a `hosts:` condition, or an expression that may):
        # then a request without one cannot be told apart from the guarded host, and is refused.
        self.reads_host = any(
            rule.match.hosts is not None or rule.match.host_suffixes or _mentions_host(rule.require)
            for rule in rules
        )

    def match(self, view: RequestView) -> Matched | None:
        """The rule for ``view.path`` (one reading)."""
        for rule in self.rules:
            params = match_params(rule.match, view)
            if params is not None:
                return Matched(rule, params)
        return None

    def choose(self, view: RequestView) -> Matched | None:
        """The rule every reading of the path picks, with the same parameters.

        Raises AmbiguousPath when two readings pick different rules (or one none), or the same
        template rule with different parameters: the backend might serve what another rule guards.
        Raises InvalidHost for a request without a host when a rule reads the host.
        """
        if not view.host and self.reads_host:
            raise errors.InvalidHost()
        matched = self.match(view)
        for path in view.other_paths:
            other = self.match(view.reading(path))
            if other is None or matched is None:
                if other is not matched:
                    raise errors.AmbiguousPath()
            elif other.rule is not matched.rule or other.params != matched.params:
                raise errors.AmbiguousPath()
        return matched

    def context(self, matched: Matched, principal: Principal, view: RequestView) -> Context:
        return Context(principal, self._locations.get(principal.provider, NO_LOCATIONS), view, matched.params)

    def check_every_reading(self, matched: Matched, principal: Principal, view: RequestView) -> None:
        """``check`` under each reading of the path (CEL sees ``request.path`` per reading)."""
        self.check(matched, self.context(matched, principal, view))
        for path in view.other_paths:
            self.check(matched, self.context(matched, principal, view.reading(path)))

    def check(self, matched: Matched, ctx: Context) -> None:
        """Raise the reason the principal does not satisfy the rule's requirements."""
        for requirement in matched.rule.require.children:
            if evaluate(requirement, ctx) is True:
                continue  # False and None (unknown) both deny
            if isinstance(requirement, Providers):
                raise errors.IssuerNotAccepted()
            if isinstance(requirement, Scopes):
                raise errors.InsufficientScope(requirement.scopes)
            raise errors.RequirementNotMet()
