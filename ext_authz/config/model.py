"""The configuration model: frozen values, built by ``config.parse`` and read by everything else.

Nothing here reads a file or validates a document, and nothing here imports the rest of the package
at run time, so any module (the key store included) may import the model without loading the
parser, PyYAML or the CEL runtime. Constructed with keywords: ``Settings(listen=..., ...)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urlsplit

if TYPE_CHECKING:  # types only: the parser builds key sets, ext_authz.sources the token sources
    from ext_authz.keys.jwks import KeySet
    from ext_authz.sources import TokenSource

DEFAULT_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
DEFAULT_TOKEN_TYPES = ("JWT", "at+jwt")
DEFAULT_LISTEN = "127.0.0.1:9001"
DEFAULT_REALM = "ext-authz"
DEFAULT_MAX_TOKEN_BYTES = 16 * 1024
# The header a session's access token goes to the backend in (`forward_access_token`): set on
# the requests of such sessions, removed from every other.
FORWARDED_ACCESS_TOKEN = "x-forwarded-access-token"  # noqa: S105 - a header name


@dataclass(frozen=True, slots=True)
class HeaderSource:
    """A header that carries tokens after ``prefix`` (``from_headers``)."""

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
class ClaimHeader:
    header: str
    claim: str  # as written, for logs
    path: tuple[str, ...]  # parsed claim path


@dataclass(frozen=True, slots=True)
class LoginSettings:
    """``providers[].login``: this provider signs browsers in (OIDC authorization code with PKCE)."""

    client_id: str
    # From `client_secret_file` / `client_secret_env`; None: a public client (PKCE only).
    client_secret: str | None = field(repr=False)
    token_endpoint_auth: Literal["client_secret_basic", "client_secret_post", "none"]
    scopes: tuple[str, ...] = ("openid", "profile", "email")
    forward_access_token: Literal["none", "authorization", "x-forwarded-access-token"] = "none"  # noqa: S105


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """``sessions:``: the browser sessions of providers with ``login`` (README: Browser sign-in)."""

    # One key per line of `secret_file`: the first seals, every one opens (rotation). Never shown.
    secrets: tuple[bytes, ...] = field(repr=False)
    cookie: str = "__Host-ext-authz"
    store: Literal["cookie", "redis"] = "cookie"
    redis_url: str | None = field(default=None, repr=False)
    callback_path: str = "/oauth2/callback"
    logout_path: str = "/oauth2/logout"
    backchannel_logout_path: str | None = None
    post_logout_redirect: str = "/"
    idle_timeout_seconds: float = 3600
    max_age_seconds: float = 86400
    refresh_before_seconds: float = 60


@dataclass(frozen=True, slots=True)
class IssuerTemplate:
    """``issuer`` with ``{tenant}`` (a multi-tenant IdP: one key set, an issuer per tenant)."""

    pattern: re.Pattern[str]  # the issuer with ``{tenant}`` as one non-empty path segment
    tenants: frozenset[str] | None  # the allow-list; None: `tenants: any`
    # Where the shared keys are discovered (`discovery_issuer`, e.g. Entra's `common`); None: jwks_uri.
    discovery_issuer: str | None = None

    def tenant_of(self, issuer: str) -> str | None:
        """The tenant an issuer names when it fits the template (allowed or not), else None."""
        found = self.pattern.fullmatch(issuer)
        return found.group(1) if found else None


@dataclass(frozen=True, slots=True)
class IntrospectionSettings:
    """``providers[].introspection``: opaque tokens checked at the IdP (RFC 7662)."""

    endpoint: str | None  # None: the discovery document's introspection_endpoint
    client_id: str
    client_secret: str = field(repr=False)
    auth_method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    cache_seconds: float = 60  # an active answer: at most this long, never past its exp
    negative_cache_seconds: float = 5  # an inactive answer


DEFAULT_DPOP_ALGORITHMS = ("ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "RS256", "EdDSA")


@dataclass(frozen=True, slots=True)
class DPoPSettings:
    """``providers[].dpop``: sender-constrained tokens proven by a DPoP proof (RFC 9449)."""

    mode: Literal["required", "allowed"]
    algorithms: frozenset[str] = frozenset(DEFAULT_DPOP_ALGORITHMS)
    # A proof's iat may be this far from now either way; its jti is remembered this long.
    proof_max_age_seconds: float = 60
    nonce: bool = False  # `dpop_nonce`: demand a server nonce (use_dpop_nonce, DPoP-Nonce)
    # The origin clients address (scheme://host[:port]) when a TLS-terminating balancer sits in
    # front; None: the scheme and host of the request as Envoy saw it.
    public_origin: str | None = None


CertificateSource = Literal["peer", "xfcc", "client-cert"]


@dataclass(frozen=True, slots=True)
class MtlsBindingSettings:
    """``providers[].mtls_bound``: certificate-bound tokens (RFC 8705 §3)."""

    mode: Literal["required", "allowed"]
    # Where the client certificate is read, in order: the TLS peer Envoy saw (`peer`), and only
    # when a sanitising proxy sets them: `x-forwarded-client-cert` (Hash=) or `client-cert`
    # (RFC 9440).
    certificate_from: tuple[CertificateSource, ...] = ("peer",)


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
    login: LoginSettings | None = None
    issuer_template: IssuerTemplate | None = None  # `issuer` names `{tenant}`
    introspection: IntrospectionSettings | None = None
    introspect_jwts: bool = False  # a verified JWT is introspected too (revocation)
    dpop: DPoPSettings | None = None
    mtls_bound: MtlsBindingSettings | None = None

    def accepts(self, source: TokenSource) -> bool:
        """Whether this provider reads tokens at ``source`` (a token found elsewhere is refused)."""
        return source.accepted_by(self)


def normalise_token_type(typ: str) -> str:
    """RFC 7515 §4.1.9: compare case-insensitively; "application/" may be omitted."""
    typ = typ.lower()
    return typ[len("application/") :] if typ.startswith("application/") else typ


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


DIALECTS = ("envoy", "nginx", "forward_auth")


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """``http:``: the HTTP authorization listener's dialects (README: Gateways)."""

    # (dialect, path prefix): which dialect a request speaks is the listener path it came to.
    dialects: tuple[tuple[str, str], ...] = (
        ("envoy", "/envoy"),
        ("nginx", "/nginx"),
        ("forward_auth", "/forward-auth"),
    )
    allow_plaintext: bool = False  # a non-loopback listen_http without tls
    original_method_header: str = "x-original-method"  # nginx: the client request's method
    original_uri_header: str = "x-original-uri"  # nginx: the client request's URI


@dataclass(frozen=True, slots=True, kw_only=True)
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
    sessions: SessionSettings | None = None  # required when a provider has `login`
    listen_http: str | None = None  # HOST:PORT of the HTTP authorization listener (None: off)
    http: HttpSettings = HttpSettings()


# ---- rules ----


@dataclass(frozen=True, slots=True)
class PathPattern:
    """``/exact``, ``/prefix/*``, or a template with ``{name}`` segments (``/users/{id}/*``)."""

    text: str
    exact: str | None = None
    prefix: str | None = None
    template: re.Pattern[str] | None = None

    def match(self, path: str) -> dict[str, str] | None:
        """The template parameters (empty for exact and prefix patterns), None if no match."""
        if self.exact is not None:
            return {} if path == self.exact else None
        if self.prefix is not None:
            return {} if path.startswith(self.prefix) else None
        assert self.template is not None
        m = self.template.fullmatch(path)
        return m.groupdict() if m else None


class Regex(Protocol):
    """A compiled header pattern (RE2: matching time is linear in the value's length)."""

    def fullmatch(self, text: str) -> object: ...


@dataclass(frozen=True, slots=True)
class HeaderCondition:
    name: str
    kind: Literal["equals", "present", "absent", "regex"]
    value: str | None = None
    regex: Regex | None = None

    def describe(self) -> str:
        if self.kind == "equals":
            return f"header {self.name} = {self.value!r}"
        if self.kind == "regex":
            return f"header {self.name} ~ {self.value!r}"
        return f"header {self.name} {self.kind}"


@dataclass(frozen=True, slots=True)
class Match:
    paths: tuple[PathPattern, ...] | None = None
    methods: frozenset[str] | None = None
    hosts: frozenset[str] | None = None  # exact host names, lower-case, no port
    host_suffixes: tuple[str, ...] = ()  # from "*.example.com": ".example.com"
    headers: tuple[HeaderCondition, ...] = ()
    context: tuple[tuple[str, str], ...] = ()


# ---- require ----


@dataclass(frozen=True, slots=True)
class Providers:
    """The token comes from one of these providers (``require.providers``)."""

    names: frozenset[str]


@dataclass(frozen=True, slots=True)
class Scopes:
    """Every one of these OAuth scopes is granted (a denial names them: insufficient_scope)."""

    scopes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Claim:
    """A claim equals a value (or, when it is an array, contains it); any_of / all_of of values."""

    claim: str
    path: tuple[str, ...]
    mode: Literal["equals", "any_of", "all_of"]
    values: tuple[object, ...]


@dataclass(frozen=True, slots=True)
class Roles:
    """Any of these roles or groups, read at the token provider's claim locations."""

    kind: Literal["roles", "groups"]
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Tenants:
    """The token's tenant (of an issuer template) is one of these (``require.tenants``)."""

    values: frozenset[str]


@dataclass(frozen=True, slots=True)
class Authentication:
    """How the user authenticated (RFC 9470): ``acr`` one of these, ``auth_time`` at most
    ``max_age_seconds`` ago. A denial tells the client what to sign in with again."""

    acr: tuple[str, ...] = ()  # empty: any
    max_age_seconds: int | None = None


@dataclass(frozen=True, slots=True)
class Expression:
    """A CEL expression over ``claims``, ``request`` and ``params``, compiled at load."""

    text: str
    program: Any  # a compiled cel_expr_python Expression
    # The top-level claims the expression reads (None: it may read any), so that evaluation
    # converts only those to CEL values: the cost does not grow with unrelated claims.
    claims_used: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class AllOf:
    """Every child holds (a rule's ``require`` is one; empty: a valid token suffices)."""

    children: tuple[Requirement, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    """At least one child holds."""

    children: tuple[Requirement, ...]


@dataclass(frozen=True, slots=True)
class Not:
    """The child does not hold; an unknown child stays unknown (never an allow)."""

    child: Requirement


Requirement = Providers | Scopes | Claim | Roles | Tenants | Authentication | Expression | AllOf | AnyOf | Not


@dataclass(frozen=True, slots=True)
class DenySettings:
    status: int
    message: str


@dataclass(frozen=True, slots=True)
class RuleSettings:
    name: str  # the rule's `name`, else "rules[2]"
    match: Match
    anonymous: bool
    require: AllOf  # empty for anonymous rules and `require: {}`
    claim_to_headers: tuple[ClaimHeader, ...] = ()
    deny: DenySettings | None = None
    dry_run: bool = False
    # `login: PROVIDER`: a browser without a session is sent to sign in there.
    login: str | None = None

    @property
    def scopes(self) -> tuple[str, ...]:
        """Scopes required at the top level (the ones an insufficient_scope answer names)."""
        return tuple(s for child in self.require.children if isinstance(child, Scopes) for s in child.scopes)


DEFAULT_RULE = RuleSettings("default", Match(), anonymous=False, require=AllOf(()))


def forwards_access_token_header(provider: ProviderSettings) -> bool:
    login = provider.login
    return login is not None and login.forward_access_token == FORWARDED_ACCESS_TOKEN


def identity_header_owners(
    providers: tuple[ProviderSettings, ...], rules: tuple[RuleSettings, ...]
) -> list[tuple[str, list[str]]]:
    """Each place that sets identity headers (its key path) with the headers it sets."""
    owners = [
        (
            f"providers[{i}].claim_to_headers",
            [c.header for c in p.claim_to_headers]
            + ([p.payload_header] if p.payload_header else [])
            + ([FORWARDED_ACCESS_TOKEN] if forwards_access_token_header(p) else []),
        )
        for i, p in enumerate(providers)
    ]
    owners += [
        (f"rules[{i}].claim_to_headers", [c.header for c in r.claim_to_headers]) for i, r in enumerate(rules)
    ]
    return owners


def owned_headers(settings: Settings) -> frozenset[str]:
    """Every identity header the config sets: removed from each request a client sends."""
    return frozenset(
        h for _, headers in identity_header_owners(settings.providers, settings.rules) for h in headers
    )
