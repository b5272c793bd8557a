"""The rules section: a config error for each kind of bad rule, naming its key path."""

from __future__ import annotations

from typing import Any

import pytest

from ext_authz.config.parse import parse
from ext_authz.config.values import ConfigError

PROVIDER = {"name": "idp", "issuer": "https://idp.example.com/", "audiences": ["api"]}


def error_of(*rules: Any, **top: Any) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse({"providers": [PROVIDER], "rules": list(rules), **top})
    return caught.value


BAD_RULES: list[tuple[str, Any, str, str]] = [
    ("not a mapping", "allow", "rules[0]", "mapping"),
    ("unknown key", {"require": {}, "when": {}}, "rules[0].when", "unknown key"),
    ("no action", {"match": {}}, "rules[0]", "exactly one"),
    (
        "template unclosed",
        {"match": {"paths": ["/users/{id"]}, "require": {}},
        "rules[0].match.paths[0]",
        "{name}",
    ),
    (
        "template partial segment",
        {"match": {"paths": ["/users/x{id}"]}, "require": {}},
        "rules[0].match.paths[0]",
        "whole path segment",
    ),
    (
        "template twice",
        {"match": {"paths": ["/a/{id}/b/{id}"]}, "require": {}},
        "rules[0].match.paths[0]",
        "twice",
    ),
    (
        "template bad name",
        {"match": {"paths": ["/a/{1x}"]}, "require": {}},
        "rules[0].match.paths[0]",
        "{name}",
    ),
    (
        "host with port",
        {"match": {"hosts": ["api.example.com:443"]}, "require": {}},
        "rules[0].match.hosts[0]",
        "no port",
    ),
    (
        "host bad wildcard",
        {"match": {"hosts": ["a.*.com"]}, "require": {}},
        "rules[0].match.hosts[0]",
        "host name",
    ),
    (
        "header bad name",
        {"match": {"headers": {"x y": "1"}}, "require": {}},
        "rules[0].match.headers.x y",
        "header name",
    ),
    (
        "header bad regex",
        {"match": {"headers": {"x": {"regex": "("}}}, "require": {}},
        "rules[0].match.headers.x.regex",
        "RE2 cannot compile '('",
    ),
    (
        "header two specs",
        {"match": {"headers": {"x": {"regex": "a", "present": True}}}, "require": {}},
        "rules[0].match.headers.x",
        "one of",
    ),
    (
        "header present string",
        {"match": {"headers": {"x": {"present": "yes"}}}, "require": {}},
        "rules[0].match.headers.x.present",
        "true or false",
    ),
    (
        "context list",
        {"match": {"context": {"rule": ["a"]}}, "require": {}},
        "rules[0].match.context.rule",
        "string",
    ),
    ("require unknown", {"require": {"role": ["a"]}}, "rules[0].require.role", "unknown key"),
    (
        "claims list value",
        {"require": {"claims": {"groups": ["a", "b"]}}},
        "rules[0].require.claims.groups",
        "any_of",
    ),
    (
        "claims object value",
        {"require": {"claims": {"a": {"b": 1}}}},
        "rules[0].require.claims.a.b",
        "unknown key",
    ),
    ("claims bad path", {"require": {"claims": {"a..b": "x"}}}, "rules[0].require.claims.a..b", "claim path"),
    (
        "claims any_of empty",
        {"require": {"claims": {"a": {"any_of": []}}}},
        "rules[0].require.claims.a.any_of",
        "empty",
    ),
    (
        "claims null",
        {"require": {"claims": {"a": None}}},
        "rules[0].require.claims.a",
        "string, number or boolean",
    ),
    ("roles string", {"require": {"roles": "admin"}}, "rules[0].require.roles", "list"),
    ("any_of not list", {"require": {"any_of": {"roles": ["a"]}}}, "rules[0].require.any_of", "list"),
    (
        "nested error",
        {"require": {"any_of": [{"scopes": ["a b"]}]}},
        "rules[0].require.any_of[0].scopes[0]",
        "white space",
    ),
    (
        "not error",
        {"require": {"not": {"providers": ["x"]}}},
        "rules[0].require.not.providers[0]",
        "no provider",
    ),
    (
        "cel syntax",
        {"require": {"expression": "claims.sub =="}},
        "rules[0].require.expression",
        "CEL does not compile",
    ),
    (
        "cel unknown variable",
        {"require": {"expression": "user.id == 1"}},
        "rules[0].require.expression",
        "CEL does not compile",
    ),
    ("cel not boolean", {"require": {"expression": "1 + 2"}}, "rules[0].require.expression", "boolean"),
    ("deny status 200", {"require": {}, "deny": {"status": 200}}, "rules[0].deny.status", "between"),
    ("deny status float", {"require": {}, "deny": {"status": 404.5}}, "rules[0].deny.status", "whole number"),
    (
        "deny message control",
        {"require": {}, "deny": {"message": "a\nb"}},
        "rules[0].deny.message",
        "printable",
    ),
    ("deny on anonymous", {"allow": "anonymous", "deny": {"status": 404}}, "rules[0].deny", "denies nothing"),
    ("mode typo", {"require": {}, "mode": "dryrun"}, "rules[0].mode", "enforce or dry_run"),
    (
        "claim header reserved",
        {"require": {}, "claim_to_headers": [{"header": "host", "claim": "sub"}]},
        "rules[0].claim_to_headers[0].header",
        "cannot be set",
    ),
    (
        "claim header is token header",
        {"require": {}, "claim_to_headers": [{"header": "authorization", "claim": "sub"}]},
        "rules[0].claim_to_headers",
        "carries tokens",
    ),
]


@pytest.mark.parametrize(
    ("rule", "key_path", "message"), [c[1:] for c in BAD_RULES], ids=[c[0] for c in BAD_RULES]
)
def test_bad_rule(rule: Any, key_path: str, message: str) -> None:
    error = error_of(rule)
    assert error.key_path == key_path
    assert message in error.message


def test_rule_header_already_set_by_a_provider() -> None:
    with pytest.raises(ConfigError) as caught:
        parse(
            {
                "providers": [{**PROVIDER, "claim_to_headers": [{"header": "x-user-id", "claim": "sub"}]}],
                "rules": [{"require": {}, "claim_to_headers": [{"header": "X-User-Id", "claim": "email"}]}],
            }
        )
    assert caught.value.key_path == "rules[0].claim_to_headers" and "provider 'idp'" in caught.value.message


def test_duplicate_rule_names() -> None:
    error = error_of({"name": "a", "require": {}}, {"name": "a", "require": {}})
    assert error.key_path == "rules[1].name" and "rules[0]" in error.message


def test_bad_top_level_mode_and_preset() -> None:
    assert error_of({"require": {}}, mode="audit").key_path == "mode"
    with pytest.raises(ConfigError) as caught:
        parse({"providers": [{**PROVIDER, "preset": "ping"}]})
    assert caught.value.key_path == "providers[0].preset" and "keycloak" in caught.value.message


def test_rule_names_and_modes() -> None:
    s = parse(
        {
            "providers": [PROVIDER],
            "mode": "dry_run",
            "rules": [{"name": "admin-api", "require": {}}, {"require": {}, "mode": "enforce"}],
        }
    )
    assert [r.name for r in s.rules] == ["admin-api", "rules[1]"]
    assert [r.dry_run for r in s.rules] == [True, False]
    assert s.dry_run


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"(a)\1", "invalid escape sequence"),  # a backreference
        (r"(?=a)a", "invalid perl operator"),  # lookahead
        (r"(?<=a)b", "invalid perl operator"),  # lookbehind
        (r"a++", "bad repetition operator"),  # possessive
        (r"(?>a)", "invalid perl operator"),  # atomic group
        (r"((a{100}){100}){100}", "invalid repetition size"),  # beyond RE2's limits
    ],
)
def test_header_regex_that_re2_cannot_compile_names_the_rule(pattern: str, reason: str) -> None:
    """Header regexes are RE2 (linear time): a pattern only backtracking engines run is a config
    error at its key path, naming the rule by its index."""
    error = error_of(
        {"match": {"paths": ["/a"]}, "require": {}},
        {"match": {"paths": ["/b"]}, "require": {}},
        {"name": "foo", "match": {"headers": {"x-foo": {"regex": pattern}}}, "require": {}},
    )
    assert error.key_path == "rules[2].match.headers.x-foo.regex"
    assert error.message.startswith(f"RE2 cannot compile {pattern!r}: {reason}")
    assert "RE2 syntax" in error.message


def test_header_regex_is_re2_with_full_match() -> None:
    s = parse(
        {
            "providers": [PROVIDER],
            "rules": [{"match": {"headers": {"x": {"regex": "v[0-9]+|beta"}}}, "require": {}}],
        }
    )
    regex = s.rules[0].match.headers[0].regex
    assert regex is not None and type(regex.pattern).__module__.startswith("re2")  # type: ignore[attr-defined]
    assert regex.fullmatch("v12") and regex.fullmatch("beta")
    assert regex.fullmatch("v12") and not regex.fullmatch("v12-beta")  # remembered answers are the same
    assert not regex.fullmatch("v12-beta") and not regex.fullmatch("xbeta")


def test_header_regex_classes_are_ascii_as_documented() -> None:
    s = parse(
        {"providers": [PROVIDER], "rules": [{"match": {"headers": {"x": {"regex": r"\w+"}}}, "require": {}}]}
    )
    regex = s.rules[0].match.headers[0].regex
    assert regex is not None and regex.fullmatch("a_1") and not regex.fullmatch("é")


@pytest.mark.parametrize(
    ("written", "exact", "suffixes"),
    [
        ("Admin.Example.COM.", {"admin.example.com"}, ()),
        ("[2001:DB8:0::1]", {"[2001:db8::1]"}, ()),
        ("10.0.0.1", {"10.0.0.1"}, ()),
        ("*.Example.com.", set(), (".example.com",)),
    ],
)
def test_hosts_are_compiled_to_the_spelling_requests_are_compared_in(
    written: str, exact: set[str], suffixes: tuple[str, ...]
) -> None:
    (rule,) = parse(
        {"providers": [PROVIDER], "rules": [{"match": {"hosts": [written]}, "require": {}}]}
    ).rules
    assert rule.match.hosts == frozenset(exact)
    assert rule.match.host_suffixes == suffixes


@pytest.mark.parametrize(
    "written", ["a.b:", "[::1]:443", "::1", "a..b", "a.b..", "*.[::1]", "*.", "a b", "u@a.b", "010.0.0.1"]
)
def test_hosts_that_are_not_one_host(written: str) -> None:
    error = error_of({"match": {"hosts": [written]}, "require": {}})
    assert error.key_path == "rules[0].match.hosts[0]"


def test_path_readings_setting() -> None:
    assert parse({"providers": [PROVIDER]}).path_readings == "all"
    assert parse({"providers": [PROVIDER], "path_readings": "rfc3986"}).path_readings == "rfc3986"
    with pytest.raises(ConfigError) as caught:
        parse({"providers": [PROVIDER], "path_readings": "none"})
    assert caught.value.key_path == "path_readings"
