"""The configuration file: loaded, validated completely and given defaults before anything binds.

Every error names the key path (``providers[0].issuer``) and what is wrong; the CLI prefixes the file
name and exits with status 2. Unknown keys are errors: in a security component a typo such as
``audience`` for ``audiences`` must not silently weaken a check.
"""

from __future__ import annotations

import ipaddress
import json
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, NoReturn
from urllib.parse import urlsplit

import yaml

from ext_authz.keys.jwks import SUPPORTED_ALGORITHMS, JWKSError, KeySet, parse_jwks

DEFAULT_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
DEFAULT_TOKEN_TYPES = ("JWT", "at+jwt")
DEFAULT_LISTEN = "127.0.0.1:9001"
DEFAULT_REALM = "ext-authz"
DEFAULT_MAX_TOKEN_BYTES = 16 * 1024

# RFC 9110 §5.6.2 token characters, lower-case (Envoy lower-cases header names).
_HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
_METHOD = re.compile(r"^[A-Z][A-Z0-9_-]*$")
# Headers an authorizer must never set or remove on the upstream request.
_RESERVED_HEADERS = frozenset(
    {"host", "connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade",
     "content-length", "trailer"}
)  # fmt: skip
_CLAIM_SEGMENT = re.compile(r"""\[(?:"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)')\]|([^.\[\]]+)""")


class ConfigError(Exception):
    """A configuration problem at ``key_path``."""

    def __init__(self, key_path: str, message: str) -> None:
        super().__init__(f"{key_path}: {message}" if key_path else message)
        self.key_path = key_path
        self.message = message


@dataclass(frozen=True, slots=True)
class HeaderSource:
    name: str
    prefix: str


@dataclass(frozen=True, slots=True)
class ClaimHeader:
    header: str
    claim: str  # as written, for logs
    path: tuple[str, ...]  # parsed claim path


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
class JwksCacheSettings:
    backend: Literal["memory", "redis"] = "memory"
    url: str | None = None
    timeout_seconds: float = 0.5


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


@dataclass(frozen=True, slots=True)
class RuleSettings:
    name: str  # "rules[2]", for logs and metadata
    paths: tuple[str, ...] | None  # None: every path
    methods: frozenset[str] | None  # None: every method
    anonymous: bool
    scopes: tuple[str, ...]
    providers: frozenset[str] | None  # None: any provider


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str
    realm: str
    providers: tuple[ProviderSettings, ...]
    rules: tuple[RuleSettings, ...]
    max_token_bytes: int
    readiness: Literal["all", "any"] = "all"
    jwks_cache: JwksCacheSettings = JwksCacheSettings()
    source: str = "<config>"


# ---- small typed readers; each raises ConfigError naming the key path ----


def _fail(path: str, message: str) -> NoReturn:
    raise ConfigError(path, message)


def _type_name(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )


def _mapping(value: object, path: str, known: Sequence[str]) -> Mapping[str, object]:
    if not isinstance(value, dict):
        _fail(path, f"must be a mapping, not {_type_name(value)}")
    for key in value:
        if not isinstance(key, str) or key not in known:
            _fail(f"{path}.{key}" if path else str(key), f"unknown key (known keys: {', '.join(known)})")
    return value


def _str(value: object, path: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        _fail(path, f"must be a string, not {_type_name(value)}")
    if not allow_empty and not value.strip():
        _fail(path, "must not be empty")
    return value


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        _fail(path, f"must be true or false, not {_type_name(value)}")
    return value


def _number(value: object, path: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(path, f"must be a number, not {_type_name(value)}")
    if not low <= value <= high:
        _fail(path, f"must be between {low:g} and {high:g}")
    return float(value)


def _list(value: object, path: str, *, allow_empty: bool = False) -> list[object]:
    if not isinstance(value, list):
        _fail(path, f"must be a list, not {_type_name(value)}")
    if not value and not allow_empty:
        _fail(path, "must not be empty")
    return value


def _str_list(value: object, path: str, *, allow_empty: bool = False) -> tuple[str, ...]:
    items = tuple(_str(v, f"{path}[{i}]") for i, v in enumerate(_list(value, path, allow_empty=allow_empty)))
    for i, item in enumerate(items):
        if item in items[:i]:
            _fail(f"{path}[{i}]", f"duplicate value {item!r}")
    return items


def header_name(value: object, path: str) -> str:
    name = _str(value, path).lower()
    if name.startswith(":"):
        _fail(path, "pseudo-headers cannot be used")
    if not _HEADER_NAME.match(name):
        _fail(path, f"{name!r} is not a valid HTTP header name")
    return name


def parse_claim_path(text: str, path: str) -> tuple[str, ...]:
    """``a.b`` or ``["https://example.com/roles"]`` (a bracketed, quoted segment may hold dots)."""
    segments: list[str] = []
    pos = 0
    while pos < len(text):
        if segments and text[pos] == ".":
            pos += 1
        m = _CLAIM_SEGMENT.match(text, pos)
        if not m or m.end() == pos:
            _fail(path, f"invalid claim path {text!r}")
        quoted = m.group(1) if m.group(1) is not None else m.group(2)
        segments.append(re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else m.group(3))
        pos = m.end()
    if not segments or any(s == "" for s in segments):
        _fail(path, f"invalid claim path {text!r}")
    return tuple(segments)


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
    url = _str(value, path)
    problem = url_problem(url, allow_insecure_http=allow_insecure_http)
    if problem:
        _fail(path, problem)
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
    text = _str(value, path)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        _fail(path, f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9001 or [::1]:9001)")
    if host.startswith("[") != host.endswith("]"):
        _fail(path, f"{text!r}: bracket an IPv6 host, e.g. [::1]:9001")
    return text


# ---- sections ----

_PROVIDER_KEYS = (
    "name", "issuer", "audiences", "jwks_uri", "jwks", "jwks_file", "algorithms", "clock_skew_seconds",
    "token_types", "require_typ", "from_headers", "from_cookies", "from_params", "claim_to_headers",
    "forward_token", "payload_header", "allow_insecure_http", "refresh_interval_seconds",
    "refetch_min_interval_seconds", "fetch_timeout_seconds", "max_stale_seconds",
    "cache_control_min_seconds", "cache_control_max_seconds", "ca_file",
)  # fmt: skip


def _provider(raw: object, path: str, base_dir: Path) -> ProviderSettings:
    p = _mapping(raw, path, _PROVIDER_KEYS)
    for key in ("name", "issuer", "audiences"):
        if key not in p:
            _fail(f"{path}.{key}", "is required")
    insecure = _bool(p.get("allow_insecure_http", False), f"{path}.allow_insecure_http")
    name = _str(p["name"], f"{path}.name")
    issuer = _url(p["issuer"], f"{path}.issuer", allow_insecure_http=insecure)

    sources = [k for k in ("jwks_uri", "jwks", "jwks_file") if k in p]
    if len(sources) > 1:
        _fail(f"{path}.{sources[1]}", f"give only one of jwks_uri, jwks, jwks_file (also set: {sources[0]})")
    jwks_uri = None
    static_keys = None
    if "jwks_uri" in p:
        jwks_uri = _url(p["jwks_uri"], f"{path}.jwks_uri", allow_insecure_http=insecure)
    elif "jwks" in p:
        static_keys = _static_keys(p["jwks"], f"{path}.jwks")
    elif "jwks_file" in p:
        file = base_dir / _str(p["jwks_file"], f"{path}.jwks_file")
        try:
            document = json.loads(file.read_text(encoding="utf-8"))
        except OSError as exc:
            _fail(f"{path}.jwks_file", f"cannot read {file}: {exc.strerror or exc}")
        except ValueError:
            _fail(f"{path}.jwks_file", f"{file} is not valid JSON")
        static_keys = _static_keys(document, f"{path}.jwks_file")

    algorithms = _str_list(p.get("algorithms", list(DEFAULT_ALGORITHMS)), f"{path}.algorithms")
    for i, alg in enumerate(algorithms):
        if alg not in SUPPORTED_ALGORITHMS:
            why = (
                "is never accepted (unsigned or symmetric tokens cannot be verified with public keys)"
                if alg.lower() == "none" or alg.upper().startswith("HS")
                else "is not supported"
            )
            _fail(f"{path}.algorithms[{i}]", f"{alg!r} {why}; supported: {', '.join(DEFAULT_ALGORITHMS)}")
    if static_keys is not None and not any(k.algorithms & set(algorithms) for k in static_keys.keys):
        _fail(f"{path}.{sources[0]}", "no key fits the provider's algorithms")

    headers = p.get("from_headers", [{"name": "authorization", "prefix": "Bearer "}])
    from_headers = tuple(
        _header_source(h, f"{path}.from_headers[{i}]")
        for i, h in enumerate(_list(headers, f"{path}.from_headers", allow_empty=True))
    )
    from_cookies = _str_list(p.get("from_cookies", []), f"{path}.from_cookies", allow_empty=True)
    from_params = _str_list(p.get("from_params", []), f"{path}.from_params", allow_empty=True)
    if not (from_headers or from_cookies or from_params):
        _fail(f"{path}.from_headers", "the provider needs at least one place to find tokens")

    claim_headers = tuple(
        _claim_header(c, f"{path}.claim_to_headers[{i}]")
        for i, c in enumerate(
            _list(p.get("claim_to_headers", []), f"{path}.claim_to_headers", allow_empty=True)
        )
    )
    payload_header = None
    if p.get("payload_header") is not None:
        payload_header = header_name(p["payload_header"], f"{path}.payload_header")
    targets = [c.header for c in claim_headers] + ([payload_header] if payload_header else [])
    for i, target in enumerate(targets):
        if target in targets[:i]:
            _fail(f"{path}.claim_to_headers", f"header {target!r} is set twice")
        if target in _RESERVED_HEADERS:
            _fail(f"{path}.claim_to_headers", f"header {target!r} cannot be set by an authorizer")

    token_types = _str_list(p.get("token_types", list(DEFAULT_TOKEN_TYPES)), f"{path}.token_types")
    return ProviderSettings(
        name=name,
        issuer=issuer,
        audiences=_str_list(p["audiences"], f"{path}.audiences"),
        jwks_uri=jwks_uri,
        static_keys=static_keys,
        algorithms=frozenset(algorithms),
        clock_skew_seconds=_number(p.get("clock_skew_seconds", 60), f"{path}.clock_skew_seconds", 0, 3600),
        token_types=frozenset(normalise_token_type(t) for t in token_types),
        require_typ=_bool(p.get("require_typ", False), f"{path}.require_typ"),
        from_headers=from_headers,
        from_cookies=from_cookies,
        from_params=from_params,
        claim_to_headers=claim_headers,
        forward_token=_bool(p.get("forward_token", True), f"{path}.forward_token"),
        payload_header=payload_header,
        allow_insecure_http=insecure,
        keys=_key_policy(p, path, base_dir),
    )


def _key_policy(p: Mapping[str, object], path: str, base_dir: Path) -> KeyPolicy:
    default = KeyPolicy()

    def seconds(key: str, low: float, high: float) -> float:
        return _number(p.get(key, getattr(default, key)), f"{path}.{key}", low, high)

    policy = KeyPolicy(
        refresh_interval_seconds=seconds("refresh_interval_seconds", 1, 86400),
        refetch_min_interval_seconds=seconds("refetch_min_interval_seconds", 0, 86400),
        fetch_timeout_seconds=seconds("fetch_timeout_seconds", 0.05, 60),
        max_stale_seconds=seconds("max_stale_seconds", 1, 30 * 86400),
        cache_control_min_seconds=seconds("cache_control_min_seconds", 1, 86400),
        cache_control_max_seconds=seconds("cache_control_max_seconds", 1, 30 * 86400),
    )
    if policy.cache_control_min_seconds > policy.cache_control_max_seconds:
        _fail(f"{path}.cache_control_min_seconds", "must not exceed cache_control_max_seconds")
    if "ca_file" in p:
        ca_file = base_dir / _str(p["ca_file"], f"{path}.ca_file")
        try:
            ssl.create_default_context(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            _fail(f"{path}.ca_file", f"cannot load CA certificates from {ca_file}: {exc}")
        policy = replace(policy, ca_file=str(ca_file))
    return policy


def _jwks_cache(raw: object) -> JwksCacheSettings:
    c = _mapping(raw, "jwks_cache", ("backend", "url", "timeout_seconds"))
    backend = c.get("backend", "memory")
    if backend not in ("memory", "redis"):
        _fail("jwks_cache.backend", "must be memory or redis")
    timeout = _number(c.get("timeout_seconds", 0.5), "jwks_cache.timeout_seconds", 0.01, 10)
    if backend == "memory":
        if "url" in c:
            _fail("jwks_cache.url", "only the redis backend takes a url")
        return JwksCacheSettings("memory", None, timeout)
    if "url" not in c:
        _fail("jwks_cache.url", "is required for the redis backend (redis://host:6379/0)")
    url = _str(c["url"], "jwks_cache.url")
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        _fail("jwks_cache.url", "must be redis://HOST[:PORT][/DB] or rediss://...")
    try:
        parts.port  # noqa: B018 - raises on a bad port
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(db)
    except ValueError:
        _fail("jwks_cache.url", "has a bad port or database number")
    return JwksCacheSettings("redis", url, timeout)


def _static_keys(document: object, path: str) -> KeySet:
    try:
        keys = parse_jwks(document, source=path)
    except JWKSError as exc:
        _fail(path, str(exc))
    if not keys.keys:
        _fail(path, "contains no usable signature key")
    return keys


def _header_source(raw: object, path: str) -> HeaderSource:
    h = _mapping(raw, path, ("name", "prefix"))
    if "name" not in h:
        _fail(f"{path}.name", "is required")
    prefix = _str(h.get("prefix", ""), f"{path}.prefix", allow_empty=True)
    if prefix.strip() != prefix.rstrip() or "," in prefix:
        _fail(f"{path}.prefix", "must not start with white space or contain ','")
    return HeaderSource(name=header_name(h["name"], f"{path}.name"), prefix=prefix)


def _claim_header(raw: object, path: str) -> ClaimHeader:
    c = _mapping(raw, path, ("header", "claim"))
    for key in ("header", "claim"):
        if key not in c:
            _fail(f"{path}.{key}", "is required")
    claim = _str(c["claim"], f"{path}.claim")
    return ClaimHeader(
        header=header_name(c["header"], f"{path}.header"),
        claim=claim,
        path=parse_claim_path(claim, f"{path}.claim"),
    )


def _path_pattern(value: object, path: str) -> str:
    pattern = _str(value, path)
    if not pattern.startswith("/"):
        _fail(path, f"{pattern!r} must start with '/'")
    if "*" in pattern[:-1]:
        _fail(path, f"{pattern!r}: '*' is only allowed at the end (a prefix match)")
    if "?" in pattern or "#" in pattern:
        _fail(path, f"{pattern!r}: the query string is not part of the path")
    return pattern


def _rule(raw: object, path: str, provider_names: frozenset[str]) -> RuleSettings:
    r = _mapping(raw, path, ("match", "allow", "require"))
    if ("allow" in r) == ("require" in r):
        _fail(path, "give exactly one of 'allow: anonymous' or 'require: {...}'")
    m = _mapping(r.get("match", {}), f"{path}.match", ("paths", "methods"))
    paths = None
    if "paths" in m:
        paths = tuple(
            _path_pattern(v, f"{path}.match.paths[{i}]")
            for i, v in enumerate(_list(m["paths"], f"{path}.match.paths"))
        )
    methods = None
    if "methods" in m:
        names = _str_list(m["methods"], f"{path}.match.methods")
        for i, method in enumerate(names):
            if not _METHOD.match(method.upper()):
                _fail(f"{path}.match.methods[{i}]", f"{method!r} is not an HTTP method")
        methods = frozenset(n.upper() for n in names)
    if "allow" in r:
        if r["allow"] != "anonymous":
            _fail(f"{path}.allow", "the only value is 'anonymous' (use 'require' for token rules)")
        return RuleSettings(path, paths, methods, anonymous=True, scopes=(), providers=None)
    req = _mapping(
        r["require"] if r["require"] is not None else {}, f"{path}.require", ("scopes", "providers")
    )
    scopes = _str_list(req.get("scopes", []), f"{path}.require.scopes", allow_empty=True)
    for i, scope in enumerate(scopes):
        if any(ch.isspace() or ch in '"\\' for ch in scope):
            _fail(f"{path}.require.scopes[{i}]", "a scope contains no white space, '\"' or '\\'")
    providers = None
    if "providers" in req:
        listed = _str_list(req["providers"], f"{path}.require.providers")
        for i, name in enumerate(listed):
            if name not in provider_names:
                _fail(f"{path}.require.providers[{i}]", f"no provider is named {name!r}")
        providers = frozenset(listed)
    return RuleSettings(path, paths, methods, anonymous=False, scopes=scopes, providers=providers)


_TOP_KEYS = ("listen", "realm", "providers", "rules", "max_token_bytes", "readiness", "jwks_cache")


def parse(document: object, *, base_dir: Path = Path("."), source: str = "<config>") -> Settings:
    """Validate a decoded YAML document; raise ConfigError naming the first problem."""
    top = _mapping(document, "", _TOP_KEYS)
    listen = listen_address(top.get("listen", DEFAULT_LISTEN), "listen")
    realm = _str(top.get("realm", DEFAULT_REALM), "realm")
    if any(ch in realm for ch in '"\\') or not realm.isprintable():
        _fail("realm", "must be printable and contain no '\"' or '\\'")
    if "providers" not in top:
        _fail("providers", "is required (at least one trusted issuer)")
    providers = tuple(
        _provider(p, f"providers[{i}]", base_dir) for i, p in enumerate(_list(top["providers"], "providers"))
    )
    _check_providers_together(providers)
    names = frozenset(p.name for p in providers)
    if "rules" in top:
        rules = tuple(_rule(r, f"rules[{i}]", names) for i, r in enumerate(_list(top["rules"], "rules")))
    else:
        # No rules: every request needs a valid token from any provider.
        rules = (RuleSettings("default", None, None, anonymous=False, scopes=(), providers=None),)
    max_token_bytes = int(
        _number(top.get("max_token_bytes", DEFAULT_MAX_TOKEN_BYTES), "max_token_bytes", 256, 1 << 20)
    )
    readiness = top.get("readiness", "all")
    if readiness not in ("all", "any"):
        _fail("readiness", "must be all (every provider has keys) or any (at least one has)")
    jwks_cache = _jwks_cache(top.get("jwks_cache", {}))
    return Settings(listen, realm, providers, rules, max_token_bytes, readiness, jwks_cache, source)


def _check_providers_together(providers: tuple[ProviderSettings, ...]) -> None:
    seen_names: set[str] = set()
    seen_issuers: set[str] = set()
    for i, p in enumerate(providers):
        if p.name in seen_names:
            _fail(f"providers[{i}].name", f"duplicate provider name {p.name!r}")
        if p.issuer in seen_issuers:
            _fail(f"providers[{i}].issuer", "another provider has the same issuer (tokens are routed by iss)")
        seen_names.add(p.name)
        seen_issuers.add(p.issuer)
    sources = {h.name for p in providers for h in p.from_headers}
    for i, p in enumerate(providers):
        for target in [c.header for c in p.claim_to_headers] + (
            [p.payload_header] if p.payload_header else []
        ):
            if target in sources:
                _fail(f"providers[{i}].claim_to_headers", f"header {target!r} also carries tokens")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[object, object]:
    loader.flatten_mapping(node)
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            mark = key_node.start_mark
            raise ConfigError("", f"duplicate key {key!r} at line {mark.line + 1}, column {mark.column + 1}")
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load(file: str | Path) -> Settings:
    """Read and validate a config file. Raises ConfigError (key path '' for file-level problems)."""
    path = Path(file)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read the file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError("", "the file is not UTF-8 text") from None
    try:
        document = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("", f"not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    return parse(document, base_dir=path.parent, source=str(path))
