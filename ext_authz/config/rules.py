"""The ``rules:`` section: parsed, validated and compiled once (path templates, header regexes, CEL).

Header regexes are RE2 (linear time in the header's length); path templates compile to fixed-shape
Python patterns (whole-segment groups), never to operator-written regular expressions.

A rule is ``match`` (all conditions must hold) plus either ``allow: anonymous`` or ``require``
(a tree of requirements, all of which must hold). Everything a request needs is prepared here;
``authorization.py`` only evaluates. The values are in ``config.model``.
"""

from __future__ import annotations

import re
from typing import Any

import re2
from cel_expr_python import cel

from ext_authz.config import values as read
from ext_authz.config.model import (
    AllOf,
    AnyOf,
    Authentication,
    Claim,
    DenySettings,
    Expression,
    HeaderCondition,
    Match,
    Not,
    PathPattern,
    Providers,
    Regex,
    Requirement,
    Roles,
    RuleSettings,
    Scopes,
    Tenants,
)
from ext_authz.hosts import canonical_host

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# A wildcard's domain: DNS labels (no IP address).
_HOST = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")

# RE2, not Python's backtracking `re`: a header value is request input, and a pattern such as
# `([a-z0-9]+-?)+` takes exponential time on `re` against "aaaa...!" (the event loop stalls, and
# every Check behind it times out). RE2 is the engine of Envoy's own `safe_regex`.
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a bad pattern is our ConfigError, not a line on stderr


_REMEMBERED_CHARS = 64  # at most ~256 bytes of text a value
_REMEMBERED_VALUES = 256  # so well under 100 KB a condition, whatever clients send


class _Remembered:
    """An RE2 pattern that keeps its answers for short values (64 characters, 256 of them):
    requests repeat their header values, and a call into RE2 costs ~2 µs. Emptied when full. An error (a lone
    surrogate) is raised each time, never kept."""

    __slots__ = ("_seen", "pattern")

    def __init__(self, pattern: Regex) -> None:
        self.pattern = pattern
        self._seen: dict[str, bool] = {}

    def fullmatch(self, text: str) -> object:
        if len(text) > _REMEMBERED_CHARS:
            return self.pattern.fullmatch(text)
        seen = self._seen.get(text)
        if seen is None:
            seen = self.pattern.fullmatch(text) is not None
            if len(self._seen) >= _REMEMBERED_VALUES:
                self._seen.clear()
            self._seen[text] = seen
        return True if seen else None


def compile_header_regex(pattern: str, path: str) -> Regex:
    try:
        compiled: Regex = _Remembered(re2.compile(pattern, _RE2_OPTIONS))
    except re2.error as exc:
        reason = (
            exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        )
        read.fail(
            path,
            f"RE2 cannot compile {pattern!r}: {reason} (RE2 syntax: no backreferences, lookahead or "
            "lookbehind, possessive or atomic groups)",
        )
    return compiled


# `claims.x` or `claims["x"]` names claim x; `claims.all(...)`, `claims.exists(...)`, `claims.size()`
# call a macro or function on the whole map (the lookahead: no name is taken before a "(").
_CLAIMS_REF = re.compile(
    r"""\bclaims\b(?:\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)(?![A-Za-z0-9_]|\s*\()"""
    r"""|\s*\[\s*(?:"([^"\\]*)"|'([^'\\]*)')\s*\])?"""
)


def claims_used(text: str) -> frozenset[str] | None:
    """Top-level claim names an expression reads, when every use of ``claims`` names one."""
    names: set[str] = set()
    for m in _CLAIMS_REF.finditer(text):
        name = m.group(1) or m.group(2) or m.group(3)
        if name is None:
            return None  # `claims` used as a whole (size(claims), claims[x], claims.all(...), ...)
        names.add(name)
    return frozenset(names)


# ---- parsing ----

_CEL_ENV: Any = None


def _cel_env() -> Any:
    global _CEL_ENV
    if _CEL_ENV is None:
        dyn_map = cel.Type.Map(cel.Type.STRING, cel.Type.DYN)
        _CEL_ENV = cel.NewEnv(
            variables={
                "claims": dyn_map,
                "request": dyn_map,
                "params": cel.Type.Map(cel.Type.STRING, cel.Type.STRING),
            }
        )
    return _CEL_ENV


def compile_expression(text: str, path: str) -> Expression:
    try:
        program = _cel_env().compile(text)
    except RuntimeError as exc:
        message = str(exc).replace("INVALID_ARGUMENT: ", "").split(" [INVALID_ARGUMENT]")[0]
        read.fail(path, f"CEL does not compile: {message}")
    returns = program.return_type().name()
    if returns not in ("bool", "dyn", "BOOL", "DYN"):
        read.fail(path, f"a CEL expression must give a boolean, this one gives {returns.lower()}")
    return Expression(text, program, claims_used(text))


def path_pattern(value: object, path: str) -> PathPattern:
    text = read.string(value, path)
    if not text.startswith("/"):
        read.fail(path, f"{text!r} must start with '/'")
    if "*" in text[:-1]:
        read.fail(path, f"{text!r}: '*' is only allowed at the end (a prefix match)")
    if "?" in text or "#" in text:
        read.fail(path, f"{text!r}: the query string is not part of the path")
    body = text[:-1] if text.endswith("*") else text
    if "{" not in body and "}" not in body:
        return PathPattern(text, prefix=body) if text.endswith("*") else PathPattern(text, exact=text)
    regex, names, pos = "", [], 0
    for m in _PARAM.finditer(body):
        literal = body[pos : m.start()]
        if "{" in literal or "}" in literal:
            read.fail(path, f"{text!r}: a parameter is written {{name}} with a letter, digits or '_'")
        if not literal.endswith("/") or (m.end() < len(body) and body[m.end()] != "/"):
            read.fail(path, f"{text!r}: a parameter must be a whole path segment")
        if m.group(1) in names:
            read.fail(path, f"{text!r}: parameter {m.group(1)!r} appears twice")
        names.append(m.group(1))
        regex += re.escape(literal) + f"(?P<{m.group(1)}>[^/]+)"
        pos = m.end()
    rest = body[pos:]
    if "{" in rest or "}" in rest:
        read.fail(path, f"{text!r}: a parameter is written {{name}} with a letter, digits or '_'")
    regex += re.escape(rest) + (".*" if text.endswith("*") else "")
    return PathPattern(text, template=re.compile(regex, re.DOTALL))


def _match(raw: object, path: str) -> Match:
    m = read.mapping(
        raw if raw is not None else {}, path, ("paths", "methods", "hosts", "headers", "context")
    )
    paths = None
    if "paths" in m:
        paths = tuple(
            path_pattern(v, f"{path}.paths[{i}]")
            for i, v in enumerate(read.listof(m["paths"], f"{path}.paths"))
        )
    methods = None
    if "methods" in m:
        names = read.str_list(m["methods"], f"{path}.methods")
        for i, method in enumerate(names):
            if not read.METHOD.match(method.upper()):
                read.fail(f"{path}.methods[{i}]", f"{method!r} is not an HTTP method")
        methods = frozenset(n.upper() for n in names)
    hosts, suffixes = None, []
    if "hosts" in m:
        exact = set()
        for i, host in enumerate(read.str_list(m["hosts"], f"{path}.hosts")):
            wildcard = host.startswith("*.")
            # The spelling requests are compared in (hosts.py): a request cannot miss the rule by
            # spelling the same host differently.
            canonical = canonical_host(host[2:] if wildcard else host, port_allowed=False)
            if canonical is None or (wildcard and (canonical.startswith("[") or not _HOST.match(canonical))):
                read.fail(
                    f"{path}.hosts[{i}]",
                    f"{host!r} is not a host name, an IP address ([v6] in brackets) or *.domain (no port)",
                )
            if wildcard:
                suffixes.append("." + canonical)
            else:
                exact.add(canonical)
        hosts = frozenset(exact)
    headers = tuple(
        _header_condition(name, value, f"{path}.headers")
        for name, value in read.mapping(m.get("headers", {}), f"{path}.headers", _AnyKey()).items()
    )
    context = tuple(
        (read.string(k, f"{path}.context"), _scalar_text(v, f"{path}.context.{k}"))
        for k, v in read.mapping(m.get("context", {}), f"{path}.context", _AnyKey()).items()
    )
    return Match(paths, methods, hosts, tuple(suffixes), headers, context)


class _AnyKey(tuple[str, ...]):
    """A ``known`` argument for ``mapping`` that accepts every string key."""

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str)


def _scalar_text(value: object, path: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    read.fail(path, "must be a string")


def _header_condition(name: str, value: object, path: str) -> HeaderCondition:
    header = read.header_name(name, f"{path}.{name}")
    where = f"{path}.{name}"
    if not isinstance(value, dict):
        return HeaderCondition(header, "equals", _scalar_text(value, where))
    spec = read.mapping(value, where, ("present", "regex"))
    if len(spec) != 1:
        read.fail(where, "give one of: a value, {present: true|false}, {regex: ...}")
    if "present" in spec:
        return HeaderCondition(
            header, "present" if read.boolean(spec["present"], f"{where}.present") else "absent"
        )
    pattern = read.string(spec["regex"], f"{where}.regex")
    return HeaderCondition(header, "regex", pattern, compile_header_regex(pattern, f"{where}.regex"))


_REQUIRE_KEYS = (
    "providers", "scopes", "claims", "roles", "groups", "tenants", "acr", "max_auth_age_seconds", "any_of",
    "all_of", "not", "expression",
)  # fmt: skip


def _require(raw: object, path: str, provider_names: frozenset[str]) -> AllOf:
    r = read.mapping(raw if raw is not None else {}, path, _REQUIRE_KEYS)
    children: list[Requirement] = []
    if "providers" in r:
        listed = read.str_list(r["providers"], f"{path}.providers")
        for i, name in enumerate(listed):
            if name not in provider_names:
                read.fail(f"{path}.providers[{i}]", f"no provider is named {name!r}")
        children.append(Providers(frozenset(listed)))
    if "scopes" in r:
        scopes = read.str_list(r["scopes"], f"{path}.scopes", allow_empty=True)
        for i, scope in enumerate(scopes):
            if any(ch.isspace() or ch in '"\\' for ch in scope):
                read.fail(f"{path}.scopes[{i}]", "a scope contains no white space, '\"' or '\\'")
        if scopes:
            children.append(Scopes(scopes))
    if "claims" in r:
        for claim, expected in read.mapping(r["claims"], f"{path}.claims", _AnyKey()).items():
            children.append(_claim(claim, expected, f"{path}.claims.{claim}"))
    for kind in ("roles", "groups"):
        if kind in r:
            children.append(Roles(kind, read.str_list(r[kind], f"{path}.{kind}")))
    if "tenants" in r:
        children.append(Tenants(frozenset(read.str_list(r["tenants"], f"{path}.tenants"))))
    if "acr" in r or "max_auth_age_seconds" in r:
        acr = read.str_list(r.get("acr", []), f"{path}.acr", allow_empty="acr" not in r)
        for i, value in enumerate(acr):
            if not value.isascii() or not value.isprintable() or any(ch in value for ch in ' "\\'):
                read.fail(f"{path}.acr[{i}]", "an acr value is printable ASCII without blanks, '\"' or '\\'")
        max_age = None
        if "max_auth_age_seconds" in r:
            max_age = int(
                read.number(r["max_auth_age_seconds"], f"{path}.max_auth_age_seconds", 0, 366 * 86400)
            )
            if max_age != r["max_auth_age_seconds"]:
                read.fail(f"{path}.max_auth_age_seconds", "a whole number of seconds")
        children.append(Authentication(acr, max_age))
    for combinator in ("any_of", "all_of"):
        if combinator in r:
            items = read.listof(r[combinator], f"{path}.{combinator}")
            parts = tuple(
                _require(item, f"{path}.{combinator}[{i}]", provider_names) for i, item in enumerate(items)
            )
            children.append(AnyOf(parts) if combinator == "any_of" else AllOf(parts))
    if "not" in r:
        children.append(Not(_require(r["not"], f"{path}.not", provider_names)))
    if "expression" in r:
        children.append(
            compile_expression(read.string(r["expression"], f"{path}.expression"), f"{path}.expression")
        )
    return AllOf(tuple(children))


def _claim_value(value: object, path: str) -> object:
    if isinstance(value, str | bool) or (isinstance(value, int | float) and not isinstance(value, bool)):
        return value
    read.fail(path, "an expected claim value is a string, number or boolean")


def _claim(claim: str, expected: object, path: str) -> Claim:
    segments = read.parse_claim_path(claim, path)
    if isinstance(expected, dict):
        spec = read.mapping(expected, path, ("any_of", "all_of"))
        if len(spec) != 1:
            read.fail(path, "give a value, {any_of: [...]} or {all_of: [...]}")
        ((mode, values),) = spec.items()
        items = tuple(
            _claim_value(v, f"{path}.{mode}[{i}]")
            for i, v in enumerate(read.listof(values, f"{path}.{mode}"))
        )
        return Claim(claim, segments, mode, items)  # type: ignore[arg-type]
    if isinstance(expected, list):
        read.fail(path, "for several values write {any_of: [...]} or {all_of: [...]}")
    return Claim(claim, segments, "equals", (_claim_value(expected, path),))


_RULE_KEYS = ("name", "match", "allow", "require", "claim_to_headers", "deny", "mode", "login")


def parse_rule(raw: object, path: str, provider_names: frozenset[str], *, dry_run: bool) -> RuleSettings:
    r = read.mapping(raw, path, _RULE_KEYS)
    if ("allow" in r) == ("require" in r):
        read.fail(path, "give exactly one of 'allow: anonymous' or 'require: {...}'")
    name = read.string(r["name"], f"{path}.name") if "name" in r else path
    match = _match(r.get("match"), f"{path}.match")
    claim_headers = tuple(
        read.claim_header(c, f"{path}.claim_to_headers[{i}]")
        for i, c in enumerate(
            read.listof(r.get("claim_to_headers", []), f"{path}.claim_to_headers", allow_empty=True)
        )
    )
    deny = None
    if "deny" in r:
        d = read.mapping(r["deny"], f"{path}.deny", ("status", "message"))
        status = int(read.number(d.get("status", 403), f"{path}.deny.status", 400, 599))
        if status != d.get("status", 403):
            read.fail(f"{path}.deny.status", "must be a whole number")
        message = read.string(d.get("message", "access to this resource is denied"), f"{path}.deny.message")
        if not message.isprintable():
            read.fail(f"{path}.deny.message", "must be printable text")
        deny = DenySettings(status, message)
    if "mode" in r and r["mode"] not in ("enforce", "dry_run"):
        read.fail(f"{path}.mode", "must be enforce or dry_run")
    rule_dry_run = r.get("mode", "dry_run" if dry_run else "enforce") == "dry_run"
    if "allow" in r:
        if r["allow"] != "anonymous":
            read.fail(f"{path}.allow", "the only value is 'anonymous' (use 'require' for token rules)")
        if deny is not None:
            read.fail(f"{path}.deny", "an anonymous rule denies nothing")
        if "login" in r:
            read.fail(f"{path}.login", "an anonymous rule needs no sign-in")
        return RuleSettings(name, match, True, AllOf(()), claim_headers, None, rule_dry_run)
    require = _require(r["require"], f"{path}.require", provider_names)
    login = None
    if r.get("login") is not None:
        login = read.string(r["login"], f"{path}.login")
        if login not in provider_names:
            read.fail(f"{path}.login", f"unknown provider {login!r}")
    return RuleSettings(name, match, False, require, claim_headers, deny, rule_dry_run, login)


def parse_rules(raw: object, provider_names: frozenset[str], *, dry_run: bool) -> tuple[RuleSettings, ...]:
    rules = tuple(
        parse_rule(r, f"rules[{i}]", provider_names, dry_run=dry_run)
        for i, r in enumerate(read.listof(raw, "rules"))
    )
    seen: dict[str, int] = {}
    for i, rule in enumerate(rules):
        if rule.name in seen:
            read.fail(
                f"rules[{i}].name", f"another rule (rules[{seen[rule.name]}]) has the name {rule.name!r}"
            )
        seen[rule.name] = i
    return rules
