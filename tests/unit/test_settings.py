"""Config validation: every problem names its key path; good files get documented defaults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ext_authz.config.model import DEFAULT_ALGORITHMS
from ext_authz.config.parse import load, parse
from ext_authz.config.values import ConfigError, parse_claim_path
from tests.support.idp import SigningKey, generate_key


def provider(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "idp", "issuer": "https://idp.example.com/", "audiences": ["api"]}
    base.update(overrides)
    return base


def config(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"providers": [provider()]}
    base.update(overrides)
    return base


def error_of(document: object, base_dir: Path = Path(".")) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse(document, base_dir=base_dir)
    return caught.value


def test_defaults() -> None:
    s = parse(config())
    assert s.listen == "127.0.0.1:9001"
    assert s.realm == "ext-authz"
    assert s.max_token_bytes == 16 * 1024
    p = s.providers[0]
    assert p.algorithms == frozenset(DEFAULT_ALGORITHMS)
    assert p.clock_skew_seconds == 60
    assert p.token_types == {"jwt", "at+jwt"}
    assert not p.require_typ
    assert [(h.name, h.prefix) for h in p.from_headers] == [("authorization", "Bearer ")]
    assert p.from_cookies == () and p.from_params == ()
    assert p.forward_token and p.payload_header is None and p.jwks_uri is None
    # No rules: one rule that requires any valid token on every request.
    (rule,) = s.rules
    assert rule.match.paths is None and rule.match.methods is None and not rule.anonymous
    assert rule.require.children == ()


def test_full_example_from_the_readme() -> None:
    s = parse(
        {
            "listen": "127.0.0.1:9001",
            "providers": [
                provider(
                    jwks_uri="https://idp.example.com/.well-known/jwks.json",
                    algorithms=["RS256"],
                    clock_skew_seconds=30,
                    token_types=["JWT", "application/at+jwt"],
                    require_typ=True,
                    from_headers=[{"name": "Authorization", "prefix": "Bearer "}],
                    from_cookies=["session"],
                    from_params=["access_token"],
                    claim_to_headers=[
                        {"header": "X-User-Id", "claim": "sub"},
                        {"header": "x-roles", "claim": "realm_access.roles"},
                        {"header": "x-auth0-roles", "claim": '["https://example.com/roles"]'},
                    ],
                    forward_token=False,
                    payload_header="x-jwt-payload",
                )
            ],
            "rules": [
                {"match": {"paths": ["/healthz", "/public/*"]}, "allow": "anonymous"},
                {
                    "match": {"paths": ["/admin/*"], "methods": ["post", "PUT"]},
                    "require": {"scopes": ["admin"]},
                },
                {"match": {"paths": ["/*"]}, "require": {"providers": ["idp"]}},
                {"require": None},
            ],
        }
    )
    p = s.providers[0]
    assert p.token_types == {"jwt", "at+jwt"}
    assert p.from_headers[0].name == "authorization"
    assert [c.header for c in p.claim_to_headers] == ["x-user-id", "x-roles", "x-auth0-roles"]
    assert [c.path for c in p.claim_to_headers] == [
        ("sub",),
        ("realm_access", "roles"),
        ("https://example.com/roles",),
    ]
    assert s.rules[1].match.methods == frozenset({"POST", "PUT"})
    assert s.rules[1].scopes == ("admin",)
    assert s.rules[3].match.paths is None and s.rules[3].scopes == ()


BAD_CONFIGS: list[tuple[str, object, str, str]] = [
    ("not a mapping", ["x"], "", "must be a mapping"),
    ("unknown top key", config(provider=[]), "provider", "unknown key"),
    ("no providers", {}, "providers", "is required"),
    ("empty providers", {"providers": []}, "providers", "must not be empty"),
    ("bad listen", config(listen="9001"), "listen", "HOST:PORT"),
    ("bad port", config(listen="127.0.0.1:70000"), "listen", "HOST:PORT"),
    ("missing issuer", {"providers": [{"name": "a", "audiences": ["x"]}]}, "providers[0].issuer", "required"),
    ("typo key", config(providers=[provider(audience=["x"])]), "providers[0].audience", "unknown key"),
    (
        "http issuer",
        config(providers=[provider(issuer="http://idp.example.com")]),
        "providers[0].issuer",
        "https",
    ),
    ("relative issuer", config(providers=[provider(issuer="idp")]), "providers[0].issuer", "absolute"),
    (
        "empty audiences",
        config(providers=[provider(audiences=[])]),
        "providers[0].audiences",
        "must not be empty",
    ),
    (
        "audience not string",
        config(providers=[provider(audiences=[1])]),
        "providers[0].audiences[0]",
        "string",
    ),
    ("alg none", config(providers=[provider(algorithms=["none"])]), "providers[0].algorithms[0]", "never"),
    ("alg hs256", config(providers=[provider(algorithms=["HS256"])]), "providers[0].algorithms[0]", "never"),
    (
        "alg unknown",
        config(providers=[provider(algorithms=["XX1"])]),
        "providers[0].algorithms[0]",
        "supported",
    ),
    (
        "two key sources",
        config(providers=[provider(jwks_uri="https://a/k", jwks={"keys": []})]),
        "providers[0].jwks",
        "only one",
    ),
    ("jwks not a set", config(providers=[provider(jwks={"k": 1})]), "providers[0].jwks", "JWKS"),
    (
        "jwks no usable key",
        config(providers=[provider(jwks={"keys": [{"kty": "oct", "k": "AA"}]})]),
        "providers[0].jwks",
        "usable",
    ),
    (
        "skew negative",
        config(providers=[provider(clock_skew_seconds=-1)]),
        "providers[0].clock_skew_seconds",
        "between",
    ),
    (
        "skew bool",
        config(providers=[provider(clock_skew_seconds=True)]),
        "providers[0].clock_skew_seconds",
        "number",
    ),
    (
        "bad header",
        config(providers=[provider(claim_to_headers=[{"header": "x y", "claim": "sub"}])]),
        "providers[0].claim_to_headers[0].header",
        "valid HTTP header",
    ),
    (
        "pseudo header",
        config(providers=[provider(claim_to_headers=[{"header": ":path", "claim": "sub"}])]),
        "providers[0].claim_to_headers[0].header",
        "pseudo",
    ),
    (
        "host header",
        config(providers=[provider(claim_to_headers=[{"header": "Host", "claim": "sub"}])]),
        "providers[0].claim_to_headers[0].header",
        "cannot be set",
    ),
    (
        # Envoy's header mutation rules ignore x-envoy-* (allow_envoy: false), or obey them.
        "x-envoy header",
        config(
            providers=[
                provider(
                    claim_to_headers=[
                        {"header": "x-user-id", "claim": "sub"},
                        {"header": "X-Envoy-Upstream-Rq-Timeout-Ms", "claim": "t"},
                    ]
                )
            ]
        ),
        "providers[0].claim_to_headers[1].header",
        "x-envoy-",
    ),
    (
        "x-envoy payload header",
        config(providers=[provider(payload_header="x-envoy-original-path")]),
        "providers[0].payload_header",
        "cannot be set",
    ),
    (
        "host payload header",
        config(providers=[provider(payload_header="host")]),
        "providers[0].payload_header",
        "cannot be set",
    ),
    (
        "pseudo payload header",
        config(providers=[provider(payload_header=":authority")]),
        "providers[0].payload_header",
        "pseudo",
    ),
    (
        "rule x-envoy header",
        config(rules=[{"require": {}, "claim_to_headers": [{"header": "x-envoy-retry-on", "claim": "sub"}]}]),
        "rules[0].claim_to_headers[0].header",
        "x-envoy-",
    ),
    (
        "rule host header",
        config(rules=[{"require": {}, "claim_to_headers": [{"header": "host", "claim": "sub"}]}]),
        "rules[0].claim_to_headers[0].header",
        "cannot be set",
    ),
    (
        "rule pseudo header",
        config(rules=[{"require": {}, "claim_to_headers": [{"header": ":path", "claim": "sub"}]}]),
        "rules[0].claim_to_headers[0].header",
        "pseudo",
    ),
    (
        "claim header twice",
        config(
            providers=[
                provider(claim_to_headers=[{"header": "a", "claim": "sub"}, {"header": "A", "claim": "x"}])
            ]
        ),
        "providers[0].claim_to_headers",
        "twice",
    ),
    (
        "claim header is token header",
        config(providers=[provider(claim_to_headers=[{"header": "authorization", "claim": "sub"}])]),
        "providers[0].claim_to_headers",
        "carries tokens",
    ),
    (
        # x_token would be removed upstream as a spelling of the identity header x-token.
        "claim header is a spelling of the token header",
        config(
            providers=[
                provider(
                    from_headers=[{"name": "x_token"}],
                    claim_to_headers=[{"header": "x-token", "claim": "sub"}],
                )
            ]
        ),
        "providers[0].claim_to_headers",
        "token header 'x_token'",
    ),
    (
        "bad claim path",
        config(providers=[provider(claim_to_headers=[{"header": "a", "claim": "a..b"}])]),
        "providers[0].claim_to_headers[0].claim",
        "claim path",
    ),
    (
        "no token source",
        config(providers=[provider(from_headers=[])]),
        "providers[0].from_headers",
        "at least one",
    ),
    (
        "forward_token string",
        config(providers=[provider(forward_token="no")]),
        "providers[0].forward_token",
        "true or false",
    ),
    (
        "duplicate name",
        {"providers": [provider(), provider(issuer="https://b/")]},
        "providers[1].name",
        "duplicate",
    ),
    (
        "duplicate issuer",
        {"providers": [provider(), provider(name="b")]},
        "providers[1].issuer",
        "same issuer",
    ),
    ("empty rules", config(rules=[]), "rules", "must not be empty"),
    ("rule without action", config(rules=[{"match": {"paths": ["/"]}}]), "rules[0]", "exactly one"),
    ("rule both actions", config(rules=[{"allow": "anonymous", "require": {}}]), "rules[0]", "exactly one"),
    ("allow other", config(rules=[{"allow": "everyone"}]), "rules[0].allow", "anonymous"),
    (
        "path no slash",
        config(rules=[{"match": {"paths": ["admin"]}, "require": {}}]),
        "rules[0].match.paths[0]",
        "start with",
    ),
    (
        "star in middle",
        config(rules=[{"match": {"paths": ["/a/*/b"]}, "require": {}}]),
        "rules[0].match.paths[0]",
        "only allowed at the end",
    ),
    (
        "query in path",
        config(rules=[{"match": {"paths": ["/a?x=1"]}, "require": {}}]),
        "rules[0].match.paths[0]",
        "query",
    ),
    (
        "bad method",
        config(rules=[{"match": {"methods": ["GE T"]}, "require": {}}]),
        "rules[0].match.methods[0]",
        "HTTP method",
    ),
    (
        "match typo",
        config(rules=[{"match": {"path": ["/"]}, "require": {}}]),
        "rules[0].match.path",
        "unknown key",
    ),
    (
        "unknown provider",
        config(rules=[{"require": {"providers": ["nope"]}}]),
        "rules[0].require.providers[0]",
        "no provider",
    ),
    (
        "scope with space",
        config(rules=[{"require": {"scopes": ["a b"]}}]),
        "rules[0].require.scopes[0]",
        "white space",
    ),
    ("require typo", config(rules=[{"require": {"scope": ["a"]}}]), "rules[0].require.scope", "unknown key"),
    ("realm quote", config(realm='a"b'), "realm", "contain no"),
    ("token size", config(max_token_bytes=10), "max_token_bytes", "between"),
    (
        "refresh zero",
        config(providers=[provider(refresh_interval_seconds=0)]),
        "providers[0].refresh_interval_seconds",
        "between",
    ),
    (
        "refetch negative",
        config(providers=[provider(refetch_min_interval_seconds=-1)]),
        "providers[0].refetch_min_interval_seconds",
        "between",
    ),
    (
        "timeout zero",
        config(providers=[provider(fetch_timeout_seconds=0)]),
        "providers[0].fetch_timeout_seconds",
        "between",
    ),
    (
        "stale string",
        config(providers=[provider(max_stale_seconds="1d")]),
        "providers[0].max_stale_seconds",
        "number",
    ),
    (
        "cc bounds",
        config(providers=[provider(cache_control_min_seconds=100, cache_control_max_seconds=10)]),
        "providers[0].cache_control_min_seconds",
        "must not exceed",
    ),
    (
        "ca file",
        config(providers=[provider(ca_file="/nonexistent/ca.pem")]),
        "providers[0].ca_file",
        "cannot load",
    ),
    ("readiness", config(readiness="some"), "readiness", "all"),
    ("cache backend", config(jwks_cache={"backend": "memcached"}), "jwks_cache.backend", "memory or redis"),
    ("cache no url", config(jwks_cache={"backend": "redis"}), "jwks_cache.url", "required"),
    (
        "cache bad url",
        config(jwks_cache={"backend": "redis", "url": "http://x"}),
        "jwks_cache.url",
        "redis://",
    ),
    (
        "cache bad db",
        config(jwks_cache={"backend": "redis", "url": "redis://h:6379/x"}),
        "jwks_cache.url",
        "database",
    ),
    ("cache memory url", config(jwks_cache={"url": "redis://h"}), "jwks_cache.url", "only the redis"),
    (
        "cache typo",
        config(jwks_cache={"backend": "redis", "uri": "redis://h"}),
        "jwks_cache.uri",
        "unknown key",
    ),
    ("admin", config(admin="9002"), "admin", "HOST:PORT"),
    ("log level", config(log={"level": "verbose"}), "log.level", "one of"),
    ("log decisions", config(log={"decisions": "some"}), "log.decisions", "one of"),
    ("log rate", config(log={"sample_rate": 2}), "log.sample_rate", "between"),
    ("log subject", config(log={"subject": "sha1"}), "log.subject", "one of"),
    ("log typo", config(log={"levels": "info"}), "log.levels", "unknown key"),
    ("drain", config(shutdown={"drain_seconds": -1}), "shutdown.drain_seconds", "between"),
    ("grace", config(shutdown={"grace_seconds": "10s"}), "shutdown.grace_seconds", "number"),
    ("tracing", config(tracing={"enabled": "yes"}), "tracing.enabled", "true or false"),
    ("tracing typo", config(tracing={"enable": True}), "tracing.enable", "unknown key"),
]


@pytest.mark.parametrize(
    ("document", "key_path", "message"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS]
)
def test_bad_config_names_key_path(document: object, key_path: str, message: str) -> None:
    error = error_of(document)
    assert error.key_path == key_path
    assert message in error.message


def test_operations_defaults() -> None:
    s = parse(config())
    assert s.admin is None
    assert (s.log.level, s.log.decisions, s.log.sample_rate, s.log.subject) == ("info", "all", 1.0, "hash")
    assert (s.shutdown.drain_seconds, s.shutdown.grace_seconds) == (5, 10)
    assert not s.tracing.enabled and s.tracing.service_name == "ext-authz"
    s = parse(config(admin="127.0.0.1:9002", log={"decisions": "deny", "subject": "omit"}))
    assert s.admin == "127.0.0.1:9002" and s.log.decisions == "deny" and s.log.subject == "omit"


def test_key_policy_defaults_and_cache(tmp_path: Path) -> None:
    s = parse(config())
    policy = s.providers[0].keys
    assert (policy.refresh_interval_seconds, policy.refetch_min_interval_seconds) == (600, 30)
    assert (policy.fetch_timeout_seconds, policy.max_stale_seconds) == (5, 86400)
    assert (policy.cache_control_min_seconds, policy.cache_control_max_seconds) == (60, 3600)
    assert policy.ca_file is None
    assert s.readiness == "all"
    assert s.jwks_cache.backend == "memory"
    (tmp_path / "secret").write_text("s" * 32)
    redis = parse(
        config(
            readiness="any",
            jwks_cache={"backend": "redis", "url": "redis://:pw@cache:6380/2", "secret_file": "secret"},
        ),
        base_dir=tmp_path,
    )
    assert redis.readiness == "any"
    assert redis.jwks_cache.url == "redis://:pw@cache:6380/2"


def test_ca_file_is_loaded(tmp_path: Path) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    s = parse(config(providers=[provider(ca_file="ca.pem")]), base_dir=tmp_path)
    assert s.providers[0].keys.ca_file == str(tmp_path / "ca.pem")
    (tmp_path / "bad.pem").write_text("not a certificate")
    assert (
        error_of(config(providers=[provider(ca_file="bad.pem")]), tmp_path).key_path == "providers[0].ca_file"
    )
    insecure = parse(config(providers=[provider(issuer="http://idp.internal/", allow_insecure_http=True)]))
    assert insecure.providers[0].allow_insecure_http


@pytest.mark.parametrize("issuer", ["http://127.0.0.1:8080", "http://localhost/", "http://[::1]:80/"])
def test_http_issuer_on_loopback(issuer: str) -> None:
    assert parse(config(providers=[provider(issuer=issuer)])).providers[0].issuer == issuer


def test_jwks_file_relative_to_config(tmp_path: Path) -> None:
    key = SigningKey("k1", "RS256", generate_key("RS256"))
    (tmp_path / "keys.json").write_text(json.dumps({"keys": [key.jwk()]}))
    s = parse(config(providers=[provider(jwks_file="keys.json")]), base_dir=tmp_path)
    keys = s.providers[0].static_keys
    assert keys is not None and [k.kid for k in keys.keys] == ["k1"]


def test_jwks_file_missing_or_not_json(tmp_path: Path) -> None:
    assert "cannot read" in error_of(config(providers=[provider(jwks_file="nope.json")]), tmp_path).message
    (tmp_path / "bad.json").write_text("{")
    error = error_of(config(providers=[provider(jwks_file="bad.json")]), tmp_path)
    assert error.key_path == "providers[0].jwks_file" and "not valid JSON" in error.message


def test_static_keys_must_fit_algorithms() -> None:
    key = SigningKey("k1", "ES256", generate_key("ES256"))
    error = error_of(config(providers=[provider(jwks={"keys": [key.jwk()]}, algorithms=["RS256"])]))
    assert error.key_path == "providers[0].jwks" and "algorithms" in error.message


def test_load_reports_yaml_errors_with_position(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("providers: [\n  - name: a\n")
    with pytest.raises(ConfigError) as caught:
        load(file)
    assert "not valid YAML at line" in str(caught.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.yaml")


def test_claim_paths() -> None:
    parse_path = parse_claim_path
    assert parse_path("a.b.c", "x") == ("a", "b", "c")
    assert parse_path('["https://x.com/roles"]', "x") == ("https://x.com/roles",)
    assert parse_path("resource_access['my.client'].roles", "x") == ("resource_access", "my.client", "roles")
    assert parse_path("cognito:groups", "x") == ("cognito:groups",)


@pytest.mark.parametrize("bad", ["", ".a", "a.", 'a["b', "a[]"])
def test_bad_claim_paths(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_claim_path(bad, "x")


def test_duplicate_yaml_keys_are_errors(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text(
        "providers:\n  - name: a\n    issuer: https://a/\n    issuer: https://b/\n    audiences: [x]\n"
    )
    with pytest.raises(ConfigError, match=r"duplicate key 'issuer' at line 4"):
        load(file)


# ---- jwks_cache: the shared cache's secret, Redis credentials and TLS ----

SECRET = "0123456789abcdef0123456789abcdef"  # 32 bytes


def redis_cache(**keys: Any) -> dict[str, Any]:
    return config(jwks_cache={"backend": "redis", "url": "redis://cache:6379/0", **keys})


def test_redis_cache_secret_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "secret").write_text(SECRET + "\n")  # one trailing newline is dropped
    from_file = parse(redis_cache(secret_file="secret"), base_dir=tmp_path).jwks_cache
    assert from_file.secret == SECRET.encode()
    monkeypatch.setenv("EXT_AUTHZ_TEST_JWKS_SECRET", SECRET + "x")
    from_env = parse(redis_cache(secret_env="EXT_AUTHZ_TEST_JWKS_SECRET")).jwks_cache
    assert from_env.secret == (SECRET + "x").encode()
    # A changed secret is a changed setting (a reload says it needs a restart).
    assert from_file != from_env
    # Nobody sees it: not in the repr, not in str() of the whole settings.
    everything = parse(redis_cache(secret_file="secret"), base_dir=tmp_path)
    assert SECRET not in repr(from_file) and SECRET not in str(everything)


def test_redis_url_password_is_used_and_never_shown(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET)
    cache = parse(
        config(
            jwks_cache={
                "backend": "redis",
                "url": "rediss://alice:p%40ss-w0rd@cache/1",
                "secret_file": "secret",
            }
        ),
        base_dir=tmp_path,
    ).jwks_cache
    assert cache.password == "p@ss-w0rd"  # percent-decoded
    assert "p%40ss-w0rd" not in repr(cache) and "p@ss-w0rd" not in repr(cache)
    assert "rediss://alice:***@cache/1" in repr(cache)
    (tmp_path / "password").write_text("from-a-file\n")
    cache = parse(redis_cache(secret_file="secret", password_file="password"), base_dir=tmp_path).jwks_cache
    assert cache.password == "from-a-file"
    assert "from-a-file" not in repr(cache)


@pytest.fixture
def secret_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "short").write_text("s" * 31 + "\n")
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "secret").write_text(SECRET)
    (tmp_path / "password").write_text("pw")
    monkeypatch.setenv("EXT_AUTHZ_TEST_EMPTY", "")
    monkeypatch.delenv("EXT_AUTHZ_TEST_UNSET", raising=False)
    return tmp_path


SECRET_PROBLEMS: list[tuple[dict[str, Any], str, str]] = [
    (redis_cache(), "jwks_cache.secret_file", "required for the redis backend"),
    (redis_cache(secret_file="short"), "jwks_cache.secret_file", "at least 32 bytes"),
    (redis_cache(secret_file="empty"), "jwks_cache.secret_file", "empty"),
    (redis_cache(secret_file="missing"), "jwks_cache.secret_file", "cannot read"),
    (redis_cache(secret_env="EXT_AUTHZ_TEST_UNSET"), "jwks_cache.secret_env", "not set or empty"),
    (redis_cache(secret_env="EXT_AUTHZ_TEST_EMPTY"), "jwks_cache.secret_env", "not set or empty"),
    (redis_cache(secret_file="secret", secret_env="X"), "jwks_cache.secret_env", "only one"),
    (redis_cache(secret_file=["secret"]), "jwks_cache.secret_file", "string"),
    (config(jwks_cache={"secret_file": "secret"}), "jwks_cache.secret_file", "only the redis backend"),
    (config(jwks_cache={"password_env": "X"}), "jwks_cache.password_env", "only the redis backend"),
    (
        config(jwks_cache={"backend": "redis", "url": "redis://:pw@h/0", "secret_file": "secret",
                           "password_file": "password"}),
        "jwks_cache.password_file",
        "already contains a password",
    ),
    (redis_cache(secret_file="secret", ca_file="ca.pem"), "jwks_cache.ca_file", "rediss://"),
    (
        config(jwks_cache={"backend": "redis", "url": "rediss://h/0", "secret_file": "secret",
                           "ca_file": "missing.pem"}),
        "jwks_cache.ca_file",
        "cannot load",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("document", "key_path", "message"), SECRET_PROBLEMS)
def test_redis_cache_secret_problems(
    secret_files: Path, document: dict[str, Any], key_path: str, message: str
) -> None:
    error = error_of(document, secret_files)
    assert (error.key_path, message in error.message) == (key_path, True), (document, error)


def test_a_short_secret_is_never_echoed(tmp_path: Path) -> None:
    (tmp_path / "short").write_text("TOPSECRET" * 3)
    assert "TOPSECRET" not in str(error_of(redis_cache(secret_file="short"), tmp_path))


def test_memory_cache_takes_no_secret_and_generates_none() -> None:
    cache = parse(config()).jwks_cache
    assert (cache.backend, cache.secret, cache.password, cache.ca_file) == ("memory", b"", None, None)
