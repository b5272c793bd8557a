"""``providers:``: each trusted issuer, parsed and checked, and the checks across providers and rules."""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from ext_authz.config import credentials
from ext_authz.config.model import (
    DEFAULT_ALGORITHMS,
    DEFAULT_TOKEN_TYPES,
    ClaimLocations,
    HeaderSource,
    KeyPolicy,
    ProviderSettings,
    RuleSettings,
    identity_header_owners,
    normalise_token_type,
)
from ext_authz.config.sessions import login
from ext_authz.config.values import (
    RESERVED_HEADERS,
    boolean,
    claim_header,
    fail,
    header_name,
    header_target,
    listof,
    mapping,
    number,
    parse_claim_path,
    str_list,
    string,
)
from ext_authz.keys.jwks import SUPPORTED_ALGORITHMS, JWKSError, KeySet, parse_jwks

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


_PROVIDER_KEYS = (
    "name", "issuer", "audiences", "jwks_uri", "jwks", "jwks_file", "algorithms", "clock_skew_seconds",
    "token_types", "require_typ", "from_headers", "from_cookies", "from_params", "claim_to_headers",
    "forward_token", "payload_header", "allow_insecure_http", "refresh_interval_seconds",
    "refetch_min_interval_seconds", "fetch_timeout_seconds", "max_stale_seconds",
    "cache_control_min_seconds", "cache_control_max_seconds", "ca_file", "preset", "scopes_claim",
    "roles_claim", "groups_claim", "audience_claim", "login", *credentials.PROVIDER_KEYS,
)  # fmt: skip


def provider(raw: object, path: str, base_dir: Path) -> ProviderSettings:
    p = mapping(raw, path, _PROVIDER_KEYS, required=("name", "issuer", "audiences"))
    insecure = boolean(p.get("allow_insecure_http", False), f"{path}.allow_insecure_http")
    name = string(p["name"], f"{path}.name")
    raw_issuer = string(p["issuer"], f"{path}.issuer")
    template = credentials.issuer_template(raw_issuer, p, path, allow_insecure_http=insecure)
    # A template is checked as the URL one of its tenants has.
    credentials.checked_url(
        raw_issuer.replace(credentials.TENANT, "tenant"), f"{path}.issuer", allow_insecure_http=insecure
    )
    issuer = raw_issuer

    sources = [k for k in ("jwks_uri", "jwks", "jwks_file") if k in p]
    if len(sources) > 1:
        fail(f"{path}.{sources[1]}", f"give only one of jwks_uri, jwks, jwks_file (also set: {sources[0]})")
    jwks_uri = None
    static_keys = None
    if "jwks_uri" in p:
        jwks_uri = credentials.checked_url(p["jwks_uri"], f"{path}.jwks_uri", allow_insecure_http=insecure)
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
    introspection = None
    if p.get("introspection") is not None:
        introspection = credentials.introspection(
            p["introspection"], f"{path}.introspection", base_dir, allow_insecure_http=insecure
        )
    if (
        introspection is not None
        and introspection.endpoint is None
        and template is not None
        and template.discovery_issuer is None
    ):
        fail(f"{path}.introspection.endpoint", "an issuer template cannot be discovered: give the endpoint")
    introspect_jwts = boolean(p.get("introspect_jwts", False), f"{path}.introspect_jwts")
    if introspect_jwts and introspection is None:
        fail(f"{path}.introspect_jwts", "needs introspection: (the endpoint JWTs are checked at)")
    for key in ("dpop", "mtls_bound"):
        if p.get(key) == "required" and p.get("login") is not None:
            # A browser session is a cookie: no DPoP proof or client certificate binds it.
            fail(f"{path}.{key}", "required binds every token, and a login provider's sessions are not")
    if "dpop" in targets:
        fail(f"{path}.claim_to_headers", "header 'dpop' carries DPoP proofs: it is removed upstream")
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
        login=login(p["login"], f"{path}.login", base_dir) if p.get("login") is not None else None,
        issuer_template=template,
        introspection=introspection,
        introspect_jwts=introspect_jwts,
        dpop=credentials.dpop(p, path),
        mtls_bound=credentials.mtls_bound(p, path),
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


def _static_keys(document: object, path: str) -> KeySet:
    try:
        keys = parse_jwks(document, source=path)
    except JWKSError as exc:
        fail(path, str(exc))
    if not keys.keys:
        fail(path, "contains no usable signature key")
    return keys


def _header_source(raw: object, path: str) -> HeaderSource:
    h = mapping(raw, path, ("name", "prefix"), required=("name",))
    prefix = string(h.get("prefix", ""), f"{path}.prefix", allow_empty=True)
    if prefix.strip() != prefix.rstrip() or "," in prefix:
        fail(f"{path}.prefix", "must not start with white space or contain ','")
    return HeaderSource(name=header_name(h["name"], f"{path}.name"), prefix=prefix)


def check_providers_together(providers: tuple[ProviderSettings, ...]) -> None:
    seen_names: set[str] = set()
    seen_issuers: set[str] = set()
    for i, p in enumerate(providers):
        if p.name in seen_names:
            fail(f"providers[{i}].name", f"duplicate provider name {p.name!r}")
        if p.issuer in seen_issuers:
            fail(f"providers[{i}].issuer", "another provider has the same issuer (tokens are routed by iss)")
        seen_names.add(p.name)
        seen_issuers.add(p.issuer)
    for i, p in enumerate(providers):
        for j, other in enumerate(providers):
            template = other.issuer_template
            if template is not None and i != j and template.tenant_of(p.issuer.replace("{tenant}", "x")):
                fail(
                    f"providers[{i}].issuer",
                    f"provider {other.name!r}'s issuer template also matches it (tokens are routed by iss)",
                )


def check_identity_headers(providers: tuple[ProviderSettings, ...], rules: tuple[RuleSettings, ...]) -> None:
    """Identity headers ext-authz sets must not be headers that carry tokens, nor reserved ones, nor
    set twice. Every underscore spelling of an identity header is removed upstream (response.py), and
    backends that fold "_" into "-" read them as one name: none may be a header carrying tokens."""
    sources = {h.name for p in providers for h in p.from_headers}
    owners = identity_header_owners(providers, rules)
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
        for target in targets:
            if target in sources:
                fail(where, f"header {target!r} also carries tokens")
            if target in RESERVED_HEADERS:
                fail(where, f"header {target!r} cannot be set by an authorizer")
    folded = {name.replace("_", "-"): name for name in sources}
    for where, targets in owners:
        for target in targets:
            source = folded.get(target.replace("_", "-"))
            if source is not None:
                fail(
                    where,
                    f"header {target!r} is the token header {source!r} to backends that read '_' as '-'",
                )
