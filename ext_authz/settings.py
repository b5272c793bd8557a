"""The configuration file: loaded, validated completely and given defaults before anything binds.

Every error names the key path (``providers[0].issuer``) and what is wrong; the CLI prefixes the file
name and exits with status 2. Unknown keys are errors: in a security component a typo such as
``audience`` for ``audiences`` must not silently weaken a check.
"""

from __future__ import annotations

import ipaddress
import json
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from ext_authz.configreader import (
    RESERVED_HEADERS,
    ClaimHeader,
    ConfigError,
    boolean,
    claim_header,
    fail,
    header_name,
    header_target,
    listof,
    load_yaml_file,
    mapping,
    number,
    parse_claim_path,
    str_list,
    string,
)
from ext_authz.keys.jwks import SUPPORTED_ALGORITHMS, JWKSError, KeySet, parse_jwks
from ext_authz.policy import DEFAULT_RULE, RuleSettings, parse_rules
from ext_authz.tlsfiles import TlsFileError, read_material

__all__ = ["ClaimHeader", "ConfigError", "RuleSettings", "parse_claim_path"]

DEFAULT_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
DEFAULT_TOKEN_TYPES = ("JWT", "at+jwt")
DEFAULT_LISTEN = "127.0.0.1:9001"
DEFAULT_REALM = "ext-authz"
DEFAULT_MAX_TOKEN_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class HeaderSource:
    name: str
    prefix: str


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """How a provider's keys are fetched, refreshed and trusted when the IdP misbehaves."""

    refresh_interval_seconds: float = 600
    refetch_min_interval_seconds: float = 30
    fetch_timeout_seconds: float = 5
    max_stale_seconds: float = 86400
    # Bounds on an IdP's Cache-Control max-age, which replaces refresh_interval_seconds when sent.
    cache_control_min_seconds: float = 60
    cache_control_max_seconds: float = 3600
    ca_file: str | None = None


@dataclass(frozen=True, slots=True)
class ClaimLocations:
    """Where a provider's tokens carry scopes, roles, groups and the audience (IdPs differ)."""

    scopes: tuple[tuple[str, ...], ...]
    roles: tuple[tuple[str, ...], ...]
    groups: tuple[tuple[str, ...], ...]
    audience: tuple[str, ...] = ("aud",)


# Claim paths per IdP; `scopes_claim`, `roles_claim`, `groups_claim` override them.
PRESETS: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "generic": {"scopes": ("scope", "scp"), "roles": ("roles",), "groups": ("groups",)},
    # Auth0: RBAC permissions beside scopes; roles only as a namespaced custom claim (set roles_claim).
    "auth0": {"scopes": ("scope", "permissions"), "roles": (), "groups": ()},
    "okta": {"scopes": ("scp",), "roles": (), "groups": ("groups",)},
    # Keycloak: client roles sit at resource_access.<client>.roles (add them to roles_claim).
    "keycloak": {"scopes": ("scope",), "roles": ("realm_access.roles",), "groups": ("groups",)},
    # Cognito: access tokens carry client_id instead of aud (set audience_claim: client_id).
    "cognito": {"scopes": ("scope",), "roles": ("cognito:roles",), "groups": ("cognito:groups",)},
    "entra": {"scopes": ("scp",), "roles": ("roles",), "groups": ("groups",)},
    "google": {"scopes": (), "roles": (), "groups": ()},
}


@dataclass(frozen=True, slots=True)
class JwksCacheSettings:
    backend: Literal["memory", "redis"] = "memory"
    url: str | None = None
    timeout_seconds: float = 0.5
    # The HMAC key that authenticates every shared document (`secret_file` or `secret_env`;
    # required for redis). Empty: a random per-process key, so nothing another process stored is
    # ever trusted. Never shown by repr, never logged.
    secret: bytes = field(default=b"", repr=False)
    # The Redis password from `password_file` / `password_env` (else the URL's, if any).
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None  # CA bundle for rediss:// (default: the system's)

    def __repr__(self) -> str:
        # The URL may carry a password (redis://:PASSWORD@host): never print it.
        return (
            f"JwksCacheSettings(backend={self.backend!r}, url={redact_url(self.url)!r}, "
            f"timeout_seconds={self.timeout_seconds!r}, secret=<{len(self.secret)} bytes>, "
            f"password={'<set>' if self.password else None}, ca_file={self.ca_file!r})"
        )


def redact_url(url: str | None) -> str | None:
    """The URL with any password replaced by ``***`` (for logs and reprs)."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    name: str
    issuer: str
    audiences: tuple[str, ...]
    jwks_uri: str | None
    # Keys given in the file itself (`jwks` or `jwks_file`); None means fetch them.
    static_keys: KeySet | None
    algorithms: frozenset[str]
    clock_skew_seconds: float
    token_types: frozenset[str]  # normalised: lower-case, no "application/" prefix
    require_typ: bool
    from_headers: tuple[HeaderSource, ...]
    from_cookies: tuple[str, ...]
    from_params: tuple[str, ...]
    claim_to_headers: tuple[ClaimHeader, ...]
    forward_token: bool
    payload_header: str | None
    allow_insecure_http: bool
    keys: KeyPolicy
    claims: ClaimLocations


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"
    decisions: Literal["all", "deny", "none"] = "all"
    sample_rate: float = 1.0
    subject: Literal["plain", "hash", "omit"] = "hash"


@dataclass(frozen=True, slots=True)
class TracingSettings:
    enabled: bool = False
    service_name: str = "ext-authz"


@dataclass(frozen=True, slots=True)
class ShutdownSettings:
    drain_seconds: float = 5.0  # keep answering after SIGTERM, so Envoy and Kubernetes stop sending
    grace_seconds: float = 10.0  # then wait this long for checks in flight


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """``tls:``: the Check listener serves TLS; with ``client_ca_file``, mutual TLS."""

    cert_file: str  # resolved against the config file's directory
    key_file: str
    client_ca_file: str | None = None  # require and verify client certificates (mTLS)
    admin: bool = False  # the admin listener serves TLS too (same certificate, no client certificates)


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str
    realm: str
    providers: tuple[ProviderSettings, ...]
    rules: tuple[RuleSettings, ...]
    max_token_bytes: int
    readiness: Literal["all", "any"] = "all"
    jwks_cache: JwksCacheSettings = JwksCacheSettings()
    dry_run: bool = False  # top-level `mode: dry_run`: every rule, and requests no rule matches
    max_header_value_bytes: int = 8192  # a longer identity header value is left out (and logged)
    admin: str | None = None  # HOST:PORT of the admin HTTP listener (/healthz, /readyz, /metrics)
    log: LogSettings = LogSettings()
    shutdown: ShutdownSettings = ShutdownSettings()
    tracing: TracingSettings = TracingSettings()
    token_cache_entries: int = 10_000  # verified tokens kept (0: no cache)
    source: str = "<config>"
    tls: TlsSettings | None = None  # None: plaintext listeners
    # "all": a path that backends could read differently (";", "%2F", "%5C", "\\", "%25", "//",
    # "%00") must pick the same rule under every reading; "rfc3986": only the RFC 3986 reading is judged.
    path_readings: Literal["all", "rfc3986"] = "all"


def url_problem(url: str, *, allow_insecure_http: bool) -> str | None:
    """Why ``url`` may not be used to reach an issuer or its keys; None when it may."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "must be an absolute http(s) URL"
    if parts.fragment or parts.username or parts.password:
        return "must not contain a fragment or credentials"
    if parts.scheme == "http" and not allow_insecure_http and not _is_loopback(parts.hostname):
        return "must use https (plain http is allowed for loopback hosts, or with allow_insecure_http)"
    return None


def _url(value: object, path: str, *, allow_insecure_http: bool) -> str:
    url = string(value, path)
    problem = url_problem(url, allow_insecure_http=allow_insecure_http)
    if problem:
        fail(path, problem)
    return url


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalise_token_type(typ: str) -> str:
    """RFC 7515 §4.1.9: compare case-insensitively; "application/" may be omitted."""
    typ = typ.lower()
    return typ[len("application/") :] if typ.startswith("application/") else typ


def listen_address(value: object, path: str) -> str:
    text = string(value, path)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        fail(path, f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9001 or [::1]:9001)")
    if host.startswith("[") != host.endswith("]"):
        fail(path, f"{text!r}: bracket an IPv6 host, e.g. [::1]:9001")
    return text


# ---- sections ----

_PROVIDER_KEYS = (
    "name", "issuer", "audiences", "jwks_uri", "jwks", "jwks_file", "algorithms", "clock_skew_seconds",
    "token_types", "require_typ", "from_headers", "from_cookies", "from_params", "claim_to_headers",
    "forward_token", "payload_header", "allow_insecure_http", "refresh_interval_seconds",
    "refetch_min_interval_seconds", "fetch_timeout_seconds", "max_stale_seconds",
    "cache_control_min_seconds", "cache_control_max_seconds", "ca_file", "preset", "scopes_claim",
    "roles_claim", "groups_claim", "audience_claim",
)  # fmt: skip


def _provider(raw: object, path: str, base_dir: Path) -> ProviderSettings:
    p = mapping(raw, path, _PROVIDER_KEYS)
    for key in ("name", "issuer", "audiences"):
        if key not in p:
            fail(f"{path}.{key}", "is required")
    insecure = boolean(p.get("allow_insecure_http", False), f"{path}.allow_insecure_http")
    name = string(p["name"], f"{path}.name")
    issuer = _url(p["issuer"], f"{path}.issuer", allow_insecure_http=insecure)

    sources = [k for k in ("jwks_uri", "jwks", "jwks_file") if k in p]
    if len(sources) > 1:
        fail(f"{path}.{sources[1]}", f"give only one of jwks_uri, jwks, jwks_file (also set: {sources[0]})")
    jwks_uri = None
    static_keys = None
    if "jwks_uri" in p:
        jwks_uri = _url(p["jwks_uri"], f"{path}.jwks_uri", allow_insecure_http=insecure)
    elif "jwks" in p:
        static_keys = _static_keys(p["jwks"], f"{path}.jwks")
    elif "jwks_file" in p:
        file = base_dir / string(p["jwks_file"], f"{path}.jwks_file")
        try:
            document = json.loads(file.read_text(encoding="utf-8"))
        except OSError as exc:
            fail(f"{path}.jwks_file", f"cannot read {file}: {exc.strerror or exc}")
        except ValueError:
            fail(f"{path}.jwks_file", f"{file} is not valid JSON")
        static_keys = _static_keys(document, f"{path}.jwks_file")

    algorithms = str_list(p.get("algorithms", list(DEFAULT_ALGORITHMS)), f"{path}.algorithms")
    for i, alg in enumerate(algorithms):
        if alg not in SUPPORTED_ALGORITHMS:
            why = (
                "is never accepted (unsigned or symmetric tokens cannot be verified with public keys)"
                if alg.lower() == "none" or alg.upper().startswith("HS")
                else "is not supported"
            )
            fail(f"{path}.algorithms[{i}]", f"{alg!r} {why}; supported: {', '.join(DEFAULT_ALGORITHMS)}")
    if static_keys is not None and not any(k.algorithms & set(algorithms) for k in static_keys.keys):
        fail(f"{path}.{sources[0]}", "no key fits the provider's algorithms")

    headers = p.get("from_headers", [{"name": "authorization", "prefix": "Bearer "}])
    from_headers = tuple(
        _header_source(h, f"{path}.from_headers[{i}]")
        for i, h in enumerate(listof(headers, f"{path}.from_headers", allow_empty=True))
    )
    from_cookies = str_list(p.get("from_cookies", []), f"{path}.from_cookies", allow_empty=True)
    from_params = str_list(p.get("from_params", []), f"{path}.from_params", allow_empty=True)
    if not (from_headers or from_cookies or from_params):
        fail(f"{path}.from_headers", "the provider needs at least one place to find tokens")

    claim_headers = tuple(
        claim_header(c, f"{path}.claim_to_headers[{i}]")
        for i, c in enumerate(
            listof(p.get("claim_to_headers", []), f"{path}.claim_to_headers", allow_empty=True)
        )
    )
    payload_header = None
    if p.get("payload_header") is not None:
        payload_header = header_target(p["payload_header"], f"{path}.payload_header")
    targets = [c.header for c in claim_headers] + ([payload_header] if payload_header else [])
    for i, target in enumerate(targets):
        if target in targets[:i]:
            fail(f"{path}.claim_to_headers", f"header {target!r} is set twice")
        if target in RESERVED_HEADERS:
            fail(f"{path}.claim_to_headers", f"header {target!r} cannot be set by an authorizer")

    token_types = str_list(p.get("token_types", list(DEFAULT_TOKEN_TYPES)), f"{path}.token_types")
    return ProviderSettings(
        name=name,
        issuer=issuer,
        audiences=str_list(p["audiences"], f"{path}.audiences"),
        jwks_uri=jwks_uri,
        static_keys=static_keys,
        algorithms=frozenset(algorithms),
        clock_skew_seconds=number(p.get("clock_skew_seconds", 60), f"{path}.clock_skew_seconds", 0, 3600),
        token_types=frozenset(normalise_token_type(t) for t in token_types),
        require_typ=boolean(p.get("require_typ", False), f"{path}.require_typ"),
        from_headers=from_headers,
        from_cookies=from_cookies,
        from_params=from_params,
        claim_to_headers=claim_headers,
        forward_token=boolean(p.get("forward_token", True), f"{path}.forward_token"),
        payload_header=payload_header,
        allow_insecure_http=insecure,
        keys=_key_policy(p, path, base_dir),
        claims=_claim_locations(p, path),
    )


def _claim_locations(p: Mapping[str, object], path: str) -> ClaimLocations:
    preset_name = p.get("preset", "generic")
    if preset_name not in PRESETS:
        fail(f"{path}.preset", f"must be one of {', '.join(n for n in PRESETS if n != 'generic')}")
    preset = PRESETS[str(preset_name)]

    def paths(kind: str) -> tuple[tuple[str, ...], ...]:
        key = f"{kind}_claim"
        raw = p.get(key, list(preset[kind]))
        names = (
            (string(raw, f"{path}.{key}"),)
            if isinstance(raw, str)
            else str_list(raw, f"{path}.{key}", allow_empty=True)
        )
        return tuple(parse_claim_path(n, f"{path}.{key}") for n in names)

    audience = string(p.get("audience_claim", "aud"), f"{path}.audience_claim")
    return ClaimLocations(
        scopes=paths("scopes"),
        roles=paths("roles"),
        groups=paths("groups"),
        audience=parse_claim_path(audience, f"{path}.audience_claim"),
    )


def _key_policy(p: Mapping[str, object], path: str, base_dir: Path) -> KeyPolicy:
    default = KeyPolicy()

    def seconds(key: str, low: float, high: float) -> float:
        return number(p.get(key, getattr(default, key)), f"{path}.{key}", low, high)

    policy = KeyPolicy(
        refresh_interval_seconds=seconds("refresh_interval_seconds", 1, 86400),
        refetch_min_interval_seconds=seconds("refetch_min_interval_seconds", 0, 86400),
        fetch_timeout_seconds=seconds("fetch_timeout_seconds", 0.05, 60),
        max_stale_seconds=seconds("max_stale_seconds", 1, 30 * 86400),
        cache_control_min_seconds=seconds("cache_control_min_seconds", 1, 86400),
        cache_control_max_seconds=seconds("cache_control_max_seconds", 1, 30 * 86400),
    )
    if policy.cache_control_min_seconds > policy.cache_control_max_seconds:
        fail(f"{path}.cache_control_min_seconds", "must not exceed cache_control_max_seconds")
    if "ca_file" in p:
        ca_file = base_dir / string(p["ca_file"], f"{path}.ca_file")
        try:
            ssl.create_default_context(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            fail(f"{path}.ca_file", f"cannot load CA certificates from {ca_file}: {exc}")
        policy = replace(policy, ca_file=str(ca_file))
    return policy


def _jwks_cache(raw: object, base_dir: Path = Path(".")) -> JwksCacheSettings:
    c = mapping(raw, "jwks_cache", _JWKS_CACHE_KEYS)
    backend = c.get("backend", "memory")
    if backend not in ("memory", "redis"):
        fail("jwks_cache.backend", "must be memory or redis")
    timeout = number(c.get("timeout_seconds", 0.5), "jwks_cache.timeout_seconds", 0.01, 10)
    if backend == "memory":
        for key in ("url", *_REDIS_ONLY_KEYS):
            if key in c:
                fail(f"jwks_cache.{key}", f"only the redis backend takes a {key}")
        return JwksCacheSettings("memory", None, timeout)
    if "url" not in c:
        fail("jwks_cache.url", "is required for the redis backend (redis://host:6379/0)")
    url = string(c["url"], "jwks_cache.url")
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        fail("jwks_cache.url", "must be redis://HOST[:PORT][/DB] or rediss://...")
    try:
        parts.port  # noqa: B018 - raises on a bad port
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(db)
    except ValueError:
        fail("jwks_cache.url", "has a bad port or database number")
    return _jwks_cache_credentials(c, JwksCacheSettings("redis", url, timeout), base_dir)


_REDIS_ONLY_KEYS = ("secret_file", "secret_env", "password_file", "password_env", "ca_file")
_JWKS_CACHE_KEYS = ("backend", "url", "timeout_seconds", *_REDIS_ONLY_KEYS)
MIN_SECRET_BYTES = 32


def _jwks_cache_credentials(
    c: Mapping[str, object], cache: JwksCacheSettings, base_dir: Path
) -> JwksCacheSettings:
    """The redis backend's HMAC secret (required), Redis password and CA file (optional)."""
    secret = _secret_value(c, "secret", base_dir)
    if secret is None:
        fail(
            "jwks_cache.secret_file",
            "is required for the redis backend (or secret_env): a file of at least "
            f"{MIN_SECRET_BYTES} random bytes, e.g. `openssl rand -hex 32`, the same for every replica",
        )
    if len(secret.value) < MIN_SECRET_BYTES:
        fail(secret.path, f"the secret must be at least {MIN_SECRET_BYTES} bytes long")
    password_bytes = _secret_value(c, "password", base_dir)
    password = None
    if password_bytes is not None:
        if urlsplit(cache.url or "").password is not None:
            fail(password_bytes.path, "the url already contains a password: give only one")
        try:
            password = password_bytes.value.decode("utf-8")
        except UnicodeDecodeError:
            fail(password_bytes.path, "the password is not UTF-8 text")
        if not password:
            fail(password_bytes.path, "the password is empty")
    elif (url_password := urlsplit(cache.url or "").password) is not None:
        password = unquote(url_password)
    ca_file = None
    if "ca_file" in c:
        if urlsplit(cache.url or "").scheme != "rediss":
            fail("jwks_cache.ca_file", "only a rediss:// (TLS) url takes a ca_file")
        ca_file = str(base_dir / string(c["ca_file"], "jwks_cache.ca_file"))
        try:
            ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            fail("jwks_cache.ca_file", f"cannot load CA certificates from {ca_file}: {exc}")
    return replace(cache, secret=secret.value, password=password, ca_file=ca_file)


@dataclass(frozen=True, slots=True)
class _Secret:
    path: str  # the key path it came from, for error messages
    value: bytes = field(repr=False)


def _secret_value(c: Mapping[str, object], name: str, base_dir: Path) -> _Secret | None:
    """`NAME_file` (relative to the config file) or `NAME_env`: the bytes, one trailing newline
    dropped. Error messages name the file or variable, never the content."""
    given = [k for k in (f"{name}_file", f"{name}_env") if k in c]
    if not given:
        return None
    if len(given) > 1:
        fail(f"jwks_cache.{given[1]}", f"give only one of {name}_file, {name}_env")
    path = f"jwks_cache.{given[0]}"
    if given[0].endswith("_file"):
        file = base_dir / string(c[given[0]], path)
        try:
            value = file.read_bytes()
        except OSError as exc:
            fail(path, f"cannot read {file}: {exc.strerror or type(exc).__name__}")
    else:
        variable = string(c[given[0]], path)
        text = os.environ.get(variable)
        if not text:
            fail(path, f"the environment variable {variable} is not set or empty")
        value = os.fsencode(text)
    value = value.removesuffix(b"\n").removesuffix(b"\r")
    if not value:
        fail(path, "is empty")
    return _Secret(path, value)


def _static_keys(document: object, path: str) -> KeySet:
    try:
        keys = parse_jwks(document, source=path)
    except JWKSError as exc:
        fail(path, str(exc))
    if not keys.keys:
        fail(path, "contains no usable signature key")
    return keys


def _header_source(raw: object, path: str) -> HeaderSource:
    h = mapping(raw, path, ("name", "prefix"))
    if "name" not in h:
        fail(f"{path}.name", "is required")
    prefix = string(h.get("prefix", ""), f"{path}.prefix", allow_empty=True)
    if prefix.strip() != prefix.rstrip() or "," in prefix:
        fail(f"{path}.prefix", "must not start with white space or contain ','")
    return HeaderSource(name=header_name(h["name"], f"{path}.name"), prefix=prefix)


_TOP_KEYS = (
    "listen", "realm", "providers", "rules", "max_token_bytes", "max_header_value_bytes", "readiness",
    "jwks_cache", "mode", "admin", "log", "shutdown", "tracing", "token_cache", "tls",
    "path_readings",
)  # fmt: skip


def parse(document: object, *, base_dir: Path = Path("."), source: str = "<config>") -> Settings:
    """Validate a decoded YAML document; raise ConfigError naming the first problem."""
    top = mapping(document, "", _TOP_KEYS)
    listen = listen_address(top.get("listen", DEFAULT_LISTEN), "listen")
    realm = string(top.get("realm", DEFAULT_REALM), "realm")
    if any(ch in realm for ch in '"\\') or not realm.isprintable():
        fail("realm", "must be printable and contain no '\"' or '\\'")
    if "providers" not in top:
        fail("providers", "is required (at least one trusted issuer)")
    providers = tuple(
        _provider(p, f"providers[{i}]", base_dir) for i, p in enumerate(listof(top["providers"], "providers"))
    )
    _check_providers_together(providers)
    names = frozenset(p.name for p in providers)
    mode = top.get("mode", "enforce")
    if mode not in ("enforce", "dry_run"):
        fail("mode", "must be enforce or dry_run (decisions are computed and logged, requests allowed)")
    if "rules" in top:
        rules = parse_rules(top["rules"], names, dry_run=mode == "dry_run")
    else:
        # No rules: every request needs a valid token from any provider.
        rules = (replace(DEFAULT_RULE, dry_run=mode == "dry_run"),)
    _check_owned_headers(providers, rules)
    _check_token_header_spellings(providers, rules)
    max_token_bytes = int(
        number(top.get("max_token_bytes", DEFAULT_MAX_TOKEN_BYTES), "max_token_bytes", 256, 1 << 20)
    )
    readiness = top.get("readiness", "all")
    if readiness not in ("all", "any"):
        fail("readiness", "must be all (every provider has keys) or any (at least one has)")
    jwks_cache = _jwks_cache(top.get("jwks_cache", {}), base_dir)
    max_header_value_bytes = int(
        number(top.get("max_header_value_bytes", 8192), "max_header_value_bytes", 64, 60 * 1024)
    )
    admin = listen_address(top["admin"], "admin") if top.get("admin") is not None else None
    return Settings(
        listen,
        realm,
        providers,
        rules,
        max_token_bytes,
        readiness,
        jwks_cache,
        mode == "dry_run",
        max_header_value_bytes,
        admin,
        _log(top.get("log", {})),
        _shutdown(top.get("shutdown", {})),
        _tracing(top.get("tracing", {})),
        _token_cache(top.get("token_cache", {})),
        source,
        tls=_tls(top["tls"], base_dir, admin) if top.get("tls") is not None else None,
        path_readings=_path_readings(top.get("path_readings", "all")),
    )


def _tls(raw: object, base_dir: Path, admin_address: str | None) -> TlsSettings:
    """The files are read and checked now: a listener never starts with a pair that cannot work."""
    c = mapping(raw, "tls", ("cert_file", "key_file", "client_ca_file", "admin"))
    for key in ("cert_file", "key_file"):
        if key not in c:
            fail(f"tls.{key}", "is required")

    def file(key: str) -> str:
        return str(base_dir / string(c[key], f"tls.{key}"))

    client_ca_file = file("client_ca_file") if c.get("client_ca_file") is not None else None
    admin = boolean(c.get("admin", False), "tls.admin")
    if admin and admin_address is None:
        fail("tls.admin", "there is no admin listener (set `admin: HOST:PORT`)")
    tls = TlsSettings(
        cert_file=file("cert_file"),
        key_file=file("key_file"),
        client_ca_file=client_ca_file,
        admin=admin,
    )
    try:
        read_material(tls.cert_file, tls.key_file, tls.client_ca_file)
    except TlsFileError as exc:
        fail(f"tls.{exc.field}", exc.message)
    return tls


def _path_readings(raw: object) -> Literal["all", "rfc3986"]:
    if raw not in ("all", "rfc3986"):
        fail(
            "path_readings",
            "must be all (every way a backend may read the path must pick the same rule) or rfc3986",
        )
    return "all" if raw == "all" else "rfc3986"


def _token_cache(raw: object) -> int:
    c = mapping(raw, "token_cache", ("max_entries",))
    return int(number(c.get("max_entries", 10_000), "token_cache.max_entries", 0, 10_000_000))


def _tracing(raw: object) -> TracingSettings:
    c = mapping(raw, "tracing", ("enabled", "service_name"))
    return TracingSettings(
        enabled=boolean(c.get("enabled", False), "tracing.enabled"),
        service_name=string(c.get("service_name", "ext-authz"), "tracing.service_name"),
    )


def _choice(value: object, path: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        fail(path, f"must be one of {', '.join(choices)}")
    return str(value)


def _log(raw: object) -> LogSettings:
    c = mapping(raw, "log", ("level", "decisions", "sample_rate", "subject"))
    return LogSettings(
        level=_choice(c.get("level", "info"), "log.level", ("debug", "info", "warning", "error")),  # type: ignore[arg-type]
        decisions=_choice(c.get("decisions", "all"), "log.decisions", ("all", "deny", "none")),  # type: ignore[arg-type]
        sample_rate=number(c.get("sample_rate", 1.0), "log.sample_rate", 0, 1),
        subject=_choice(c.get("subject", "hash"), "log.subject", ("plain", "hash", "omit")),  # type: ignore[arg-type]
    )


def _shutdown(raw: object) -> ShutdownSettings:
    c = mapping(raw, "shutdown", ("drain_seconds", "grace_seconds"))
    return ShutdownSettings(
        drain_seconds=number(c.get("drain_seconds", 5), "shutdown.drain_seconds", 0, 600),
        grace_seconds=number(c.get("grace_seconds", 10), "shutdown.grace_seconds", 0, 600),
    )


def _check_providers_together(providers: tuple[ProviderSettings, ...]) -> None:
    seen_names: set[str] = set()
    seen_issuers: set[str] = set()
    for i, p in enumerate(providers):
        if p.name in seen_names:
            fail(f"providers[{i}].name", f"duplicate provider name {p.name!r}")
        if p.issuer in seen_issuers:
            fail(f"providers[{i}].issuer", "another provider has the same issuer (tokens are routed by iss)")
        seen_names.add(p.name)
        seen_issuers.add(p.issuer)


def _check_owned_headers(providers: tuple[ProviderSettings, ...], rules: tuple[RuleSettings, ...]) -> None:
    """Identity headers ext-authz sets must not be headers that carry tokens, nor reserved ones."""
    sources = {h.name for p in providers for h in p.from_headers}
    owners = [
        (
            f"providers[{i}].claim_to_headers",
            [c.header for c in p.claim_to_headers] + [p.payload_header or ""],
        )
        for i, p in enumerate(providers)
    ]
    owners += [
        (f"rules[{i}].claim_to_headers", [c.header for c in r.claim_to_headers]) for i, r in enumerate(rules)
    ]
    provider_set = {c.header: p.name for p in providers for c in p.claim_to_headers}
    for i, rule in enumerate(rules):
        targets = [c.header for c in rule.claim_to_headers]
        for target in targets:
            if targets.count(target) > 1:
                fail(f"rules[{i}].claim_to_headers", f"header {target!r} is set twice")
            if target in provider_set:
                fail(
                    f"rules[{i}].claim_to_headers",
                    f"header {target!r} is already set by provider {provider_set[target]!r}",
                )
    for where, targets in owners:
        for target in filter(None, targets):
            if target in sources:
                fail(where, f"header {target!r} also carries tokens")
            if target in RESERVED_HEADERS:
                fail(where, f"header {target!r} cannot be set by an authorizer")


def _check_token_header_spellings(
    providers: tuple[ProviderSettings, ...], rules: tuple[RuleSettings, ...]
) -> None:
    """Every underscore spelling of an identity header is removed upstream (response.py), and
    backends that fold "_" into "-" read them as one name: none may be a header carrying tokens."""
    sources = {h.name.replace("_", "-"): h.name for p in providers for h in p.from_headers}
    owners = [
        (
            f"providers[{i}].claim_to_headers",
            [c.header for c in p.claim_to_headers] + [p.payload_header or ""],
        )
        for i, p in enumerate(providers)
    ]
    owners += [
        (f"rules[{i}].claim_to_headers", [c.header for c in r.claim_to_headers]) for i, r in enumerate(rules)
    ]
    for where, targets in owners:
        for target in filter(None, targets):
            source = sources.get(target.replace("_", "-"))
            if source is not None:
                fail(
                    where,
                    f"header {target!r} is the token header {source!r} to backends that read '_' as '-'",
                )


def load(file: str | Path) -> Settings:
    """Read and validate a config file. Raises ConfigError (key path '' for file-level problems)."""
    path = Path(file)
    return parse(load_yaml_file(path), base_dir=path.parent, source=str(path))
