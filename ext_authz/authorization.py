"""Stage 3: which rule applies to a request, and does the principal satisfy it. Pure.

Rules are compiled once from the settings; matching normalises the path once per request so that
``/public/../admin`` or ``/public/%2e%2e/admin`` is judged as ``/admin`` (RFC 3986 §6.2.2: percent-
decoding of unreserved characters, then removal of dot segments), and ``//admin`` as ``/admin``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ext_authz import errors
from ext_authz.model import Principal, Request
from ext_authz.settings import RuleSettings

_UNRESERVED_ESCAPE = re.compile(r"%(2[dDeE]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA]|5[fF]|7[eE])")
_SLASHES = re.compile(r"/{2,}")


def normalise_path(path: str) -> str:
    """The path as rules see it: unreserved escapes decoded, dot segments removed, '//' merged."""
    if not path:
        return path
    if "%" in path:
        path = _UNRESERVED_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), path)
    if "//" in path:
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


@dataclass(frozen=True, slots=True)
class CompiledRule:
    name: str
    anonymous: bool
    scopes: tuple[str, ...]
    providers: frozenset[str] | None
    methods: frozenset[str] | None
    exact_paths: frozenset[str]
    path_prefixes: tuple[str, ...]
    any_path: bool

    @classmethod
    def compile(cls, rule: RuleSettings) -> CompiledRule:
        paths = rule.paths
        return cls(
            name=rule.name,
            anonymous=rule.anonymous,
            scopes=rule.scopes,
            providers=rule.providers,
            methods=rule.methods,
            exact_paths=frozenset(p for p in paths or () if not p.endswith("*")),
            path_prefixes=tuple(p[:-1] for p in paths or () if p.endswith("*")),
            any_path=paths is None,
        )

    def matches(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return self.any_path or path in self.exact_paths or path.startswith(self.path_prefixes)

    def check(self, principal: Principal) -> None:
        """Raise the reason the principal does not satisfy this rule's requirements."""
        if self.providers is not None and principal.provider not in self.providers:
            raise errors.IssuerNotAccepted()
        if self.scopes:
            granted = granted_scopes(principal.claims)
            if not all(scope in granted for scope in self.scopes):
                raise errors.InsufficientScope(self.scopes)


class Rules:
    """The ordered rules of a config: the first that matches applies."""

    def __init__(self, rules: tuple[RuleSettings, ...]) -> None:
        self._rules = tuple(CompiledRule.compile(r) for r in rules)

    def match(self, request: Request) -> CompiledRule | None:
        method = request.method.upper()
        path = normalise_path(request.path)
        for rule in self._rules:
            if rule.matches(method, path):
                return rule
        return None


def granted_scopes(claims: Mapping[str, object]) -> frozenset[str]:
    """OAuth scopes from ``scope`` (RFC 8693: space-separated) and ``scp`` (string or array)."""
    granted: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            granted.update(value.split())
        elif isinstance(value, list):
            granted.update(v for v in value if isinstance(v, str))
    return frozenset(granted)
