"""Stage 3: which rule applies to a request, and does the principal satisfy it. Pure.

Rules come compiled from ``config/rules.py``. The first rule whose ``match`` holds applies; its
path is read the ways a backend could read it (``paths.py``), and under ``path_readings: all``
every reading must pick the same rule with the same template parameters (else 400
``ambiguous_path``) and the rule's requirements (``requirements.py``) must hold under each. A
request without a host, when a rule reads the host, is 400 ``invalid_host``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from ext_authz import errors
from ext_authz.config.model import (
    AllOf,
    AnyOf,
    Authentication,
    Expression,
    Match,
    Not,
    PathPattern,
    Providers,
    ProviderSettings,
    Regex,
    Requirement,
    RuleSettings,
    Scopes,
)
from ext_authz.model import Principal
from ext_authz.paths import RequestView, path_readings
from ext_authz.requirements import NO_LOCATIONS, Context, evaluate
from ext_authz.trace import ReadingPicked, RuleTried, Trace

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


# ---- rules ----


def _mentions_host(requirement: Requirement) -> bool:
    if isinstance(requirement, AllOf | AnyOf):
        return any(_mentions_host(child) for child in requirement.children)
    if isinstance(requirement, Not):
        return _mentions_host(requirement.child)
    return isinstance(requirement, Expression) and "host" in requirement.text


def _mentions_time(requirement: Requirement) -> bool:
    if isinstance(requirement, AllOf | AnyOf):
        return any(_mentions_time(child) for child in requirement.children)
    if isinstance(requirement, Not):
        return _mentions_time(requirement.child)
    return isinstance(requirement, Authentication) and requirement.max_age_seconds is not None


# ---- the rule index ----

_INDEX_FROM_RULES = 4  # fewer rules: a plain scan costs less than the index's key
_INDEX_ENTRIES = 4096  # request shapes remembered; beyond that the candidates are worked out each time
_INDEX_HOST_CHARS = 255  # a longer host (none is) is judged each time, never kept
_OTHER = object()  # in a shape: a first segment or method no rule names


def _first_segment(path: str) -> str | None:
    """``orders`` for ``/orders`` and ``/orders/42``; None for a path not starting with ``/``."""
    return path[1:].partition("/")[0] if path.startswith("/") else None


def _pattern_segment(pattern: PathPattern) -> str | None:
    """The first segment every path this pattern matches has, None when it is not fixed."""
    if pattern.exact is not None:
        return _first_segment(pattern.exact)
    head = pattern.prefix if pattern.prefix is not None else pattern.text.partition("{")[0]
    # A path that starts with ``head`` has its first segment fixed only once ``head`` has a
    # second "/": ``/orders/`` (yes), ``/ord`` or ``/`` (no).
    segment, slash, _ = head[1:].partition("/")
    return segment if slash else None


@dataclass(frozen=True, slots=True)
class _Needs:
    """Conditions of one rule's match that depend only on the request's shape (see _RuleIndex):
    each is necessary for match_params to hold, never sufficient."""

    segments: frozenset[str] | None  # the path's first segment is one of these (None: any)
    match: Match
    present: tuple[str, ...]  # headers that must be there
    absent: tuple[str, ...]  # headers that must not be
    context: tuple[str, ...]  # context keys that must be there


class _RuleIndex:
    """Which rules can match a request of a given shape, worked out once per shape.

    The shape: the path's first segment, the method, the host, and which of the headers and
    context keys the rules name are present. A rule is a candidate unless its match cannot hold
    for that shape (another first segment than all its paths fix, another method or host, a
    header or context key it needs missing, a header it forbids present). Candidates keep the
    config's order and then get the full match, so the first rule that matches is the same one a
    scan of every rule finds.
    """

    def __init__(self, rules: tuple[RuleSettings, ...]) -> None:
        self._rules = rules
        self._needs: list[_Needs] = []
        headers: dict[str, None] = {}
        context: dict[str, None] = {}
        for rule in rules:
            m = rule.match
            segments: frozenset[str] | None = None
            if m.paths is not None:
                fixed = [_pattern_segment(p) for p in m.paths]
                if all(segment is not None for segment in fixed):
                    segments = frozenset(segment for segment in fixed if segment is not None)
            present = tuple(c.name for c in m.headers if c.kind != "absent")
            absent = tuple(c.name for c in m.headers if c.kind == "absent")
            keys = tuple(key for key, _ in m.context)
            headers.update(dict.fromkeys((*present, *absent)))
            context.update(dict.fromkeys(keys))
            self._needs.append(_Needs(segments, m, present, absent, keys))
        self._header_names = tuple(headers)
        self._context_keys = tuple(context)
        # The shape holds only what the rules name (a first segment some rule fixes, a method some
        # rule lists; anything else is _OTHER) and the host when a rule reads hosts: what a client
        # sends beyond that never goes into a key.
        self._segments = frozenset(s for n in self._needs if n.segments is not None for s in n.segments)
        methods = [rule.match.methods for rule in rules if rule.match.methods is not None]
        self._methods = frozenset(m for listed in methods for m in listed)
        self._reads_host = any(rule.match.hosts is not None or rule.match.host_suffixes for rule in rules)
        self._by_shape: dict[tuple[object, ...], tuple[RuleSettings, ...]] = {}

    def candidates(self, view: RequestView) -> tuple[RuleSettings, ...]:
        headers, context = view.request.headers, view.request.context
        segment = _first_segment(view.path)
        host = view.host if self._reads_host else ""
        shape = (
            segment if segment in self._segments else _OTHER,
            view.method if view.method in self._methods else _OTHER,
            host,
            tuple(name in headers for name in self._header_names),
            tuple(key in context for key in self._context_keys),
        )
        found = self._by_shape.get(shape)
        if found is None:
            needs = zip(self._rules, self._needs, strict=True)
            found = tuple(rule for rule, need in needs if self._may(need, view, segment))
            if len(host) <= _INDEX_HOST_CHARS:
                if len(self._by_shape) >= _INDEX_ENTRIES:
                    self._by_shape.clear()  # many shapes (hosts, say): start over rather than grow
                self._by_shape[shape] = found
        return found

    @staticmethod
    def _may(needs: _Needs, view: RequestView, segment: str | None) -> bool:
        m = needs.match
        if needs.segments is not None and segment not in needs.segments:
            return False
        if m.methods is not None and view.method not in m.methods:
            return False
        if (m.hosts is not None or m.host_suffixes) and not _host_ok(m, view.host):
            return False
        headers, context = view.request.headers, view.request.context
        if any(name not in headers for name in needs.present) or any(
            name in headers for name in needs.absent
        ):
            return False
        return all(key in context for key in needs.context)


@dataclass(frozen=True, slots=True)
class Matched:
    rule: RuleSettings
    params: Mapping[str, str]


class Rules:
    """The ordered rules of a config: the first that matches applies."""

    def __init__(
        self,
        rules: tuple[RuleSettings, ...],
        providers: tuple[ProviderSettings, ...],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rules = rules
        self._clock = clock
        # Whether a rule reads the time (max_auth_age_seconds): else no clock is read per request.
        self._reads_time = any(_mentions_time(rule.require) for rule in rules)
        self._locations = {p.name: p.claims for p in providers}
        # Whether any rule reads the host (a `hosts:` condition, or an expression that may):
        # then a request without one cannot be told apart from the guarded host, and is refused.
        self.reads_host = any(
            rule.match.hosts is not None or rule.match.host_suffixes or _mentions_host(rule.require)
            for rule in rules
        )

        self._index = _RuleIndex(rules) if len(rules) > _INDEX_FROM_RULES else None

    def match(self, view: RequestView) -> Matched | None:
        """The rule for ``view.path`` (one reading)."""
        candidates = self.rules if self._index is None else self._index.candidates(view)
        for rule in candidates:
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
        locations = self._locations.get(principal.provider, NO_LOCATIONS)
        now = self._clock() if self._reads_time else 0.0
        return Context(principal, locations, view, matched.params, now)

    def trace_match(self, view: RequestView, trace: Trace) -> None:
        """Record each rule tried for the first reading (with its conditions), the rule it picks,
        and, when backends could read the path differently, the rule each reading picks."""
        matched = self.match(view)
        tried: list[RuleTried] = []
        for index, rule in enumerate(self.rules):
            hit = matched is not None and rule is matched.rule
            tried.append(RuleTried(index, rule.name, hit, tuple(explain_match(rule.match, view))))
            if hit:
                break
        trace.normalised_path, trace.rules = view.path, tuple(tried)
        if matched is not None:
            trace.matched, trace.params = matched.rule, dict(matched.params)
            trace.dry_run = matched.rule.dry_run
        if view.other_paths:
            readings = path_readings(view.request.path)
            picks = [(how, path, self.match(view.reading(path))) for how, path in readings]
            trace.readings = tuple(
                ReadingPicked(how, path, m.rule.name if m else None, dict(m.params) if m else {})
                for how, path, m in picks
            )

    def check_every_reading(
        self, matched: Matched, principal: Principal, view: RequestView, trace: Trace | None = None
    ) -> errors.AuthError | None:
        """``denial`` under each reading of the path (CEL sees ``request.path`` per reading): the
        first reading's that fails, or None when every one holds. A trace judges every reading."""
        denial = self.denial(matched, self.context(matched, principal, view), trace)
        for path in view.other_paths:
            if denial is not None and trace is None:
                return denial
            other = self.denial(matched, self.context(matched, principal, view.reading(path)), trace)
            denial = denial or other
        return denial

    def denial(self, matched: Matched, ctx: Context, trace: Trace | None = None) -> errors.AuthError | None:
        """Why the principal does not satisfy the rule's requirements (None: it does)."""
        found: errors.AuthError | None = None
        for requirement in matched.rule.require.children:
            if evaluate(requirement, ctx) is True:
                continue  # False and None (unknown) both deny
            if isinstance(requirement, Providers):
                found = errors.IssuerNotAccepted()
            elif isinstance(requirement, Scopes):
                found = errors.InsufficientScope(requirement.scopes)
            elif isinstance(requirement, Authentication):
                found = errors.InsufficientUserAuthentication(requirement.acr, requirement.max_age_seconds)
            else:
                found = errors.RequirementNotMet()
            break
        if trace is not None:
            trace.judge(matched.rule.require, ctx, found)
        return found

    def check(self, matched: Matched, ctx: Context) -> None:
        """Raise ``denial``'s reason (the raising form, for callers that want an exception)."""
        denial = self.denial(matched, ctx)
        if denial is not None:
            raise denial
