"""The provider keys for credentials beyond one issuer's bearer JWT: issuer templates with
``tenants``, ``introspection`` (RFC 7662), ``dpop`` (RFC 9449) and ``mtls_bound`` (RFC 8705)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from ext_authz.config.model import (
    DEFAULT_DPOP_ALGORITHMS,
    CertificateSource,
    DPoPSettings,
    IntrospectionSettings,
    IssuerTemplate,
    MtlsBindingSettings,
    Settings,
)
from ext_authz.config.secrets import client_secret_text
from ext_authz.config.urls import url_problem
from ext_authz.config.values import boolean, fail, mapping, number, str_list, string

TENANT = "{tenant}"
# One non-empty path segment (RFC 3986 pchar without percent-encoding's ambiguity): a tenant is an
# id or a domain name, and it travels into headers and CEL as it is.
_SEGMENT = r"[A-Za-z0-9._~!$&'()*+,;=:@-]+"
_SEGMENT_TEXT = re.compile(_SEGMENT)


def checked_url(value: object, path: str, *, allow_insecure_http: bool) -> str:
    """The URL at key path ``path``, or a config error saying why it may not reach an IdP."""
    url = string(value, path)
    problem = url_problem(url, allow_insecure_http=allow_insecure_http)
    if problem:
        fail(path, problem)
    return url


PROVIDER_KEYS = (
    "tenants", "discovery_issuer", "introspection", "introspect_jwts", "dpop", "dpop_algorithms",
    "dpop_proof_max_age_seconds", "dpop_nonce", "dpop_public_origin", "mtls_bound",
    "client_certificate_from",
)  # fmt: skip


def issuer_template(
    issuer: str, p: Mapping[str, object], path: str, *, allow_insecure_http: bool
) -> IssuerTemplate | None:
    """The template when ``issuer`` names ``{tenant}`` (with its ``tenants`` and
    ``discovery_issuer``), else None (and neither key may be given)."""
    if TENANT not in issuer:
        if "{" in issuer or "}" in issuer:
            fail(f"{path}.issuer", "an issuer template names {tenant} (and no other {...})")
        for key in ("tenants", "discovery_issuer"):
            if key in p:
                fail(f"{path}.{key}", "only for an issuer template: an issuer with {tenant} in its path")
        return None
    if issuer.count(TENANT) > 1 or "{" in issuer.replace(TENANT, "") or "}" in issuer.replace(TENANT, ""):
        fail(f"{path}.issuer", "a template names {tenant} once and no other {...}")
    example = issuer.replace(TENANT, "tenant")
    parts = urlsplit(example)
    if parts.query or parts.fragment:
        fail(f"{path}.issuer", "an issuer has no query or fragment")
    start = issuer.index(TENANT)
    prefix = issuer[:start]
    if not (prefix.endswith("/") and len(prefix) > len(f"{parts.scheme}://{parts.netloc}")):
        fail(f"{path}.issuer", "{tenant} is a whole path segment: .../{tenant}/... or .../{tenant}")
    rest = issuer[start + len(TENANT) :]
    if rest and not rest.startswith("/"):
        fail(f"{path}.issuer", "{tenant} is a whole path segment: .../{tenant}/... or .../{tenant}")
    if "tenants" not in p:
        fail(f"{path}.tenants", "an issuer template needs tenants: a list of tenant ids, or any")
    raw = p["tenants"]
    tenants: frozenset[str] | None
    if raw == "any":
        tenants = None
    else:
        listed = str_list(raw, f"{path}.tenants")
        for i, tenant in enumerate(listed):
            if not _SEGMENT_TEXT.fullmatch(tenant):
                fail(f"{path}.tenants[{i}]", "a tenant is one path segment (letters, digits, . _ ~ - ...)")
        tenants = frozenset(listed)
    discovery = None
    if "discovery_issuer" in p:
        discovery = checked_url(
            p["discovery_issuer"], f"{path}.discovery_issuer", allow_insecure_http=allow_insecure_http
        )
    if discovery is None and not any(k in p for k in ("jwks_uri", "jwks", "jwks_file")):
        fail(
            f"{path}.discovery_issuer",
            "a template cannot be discovered: give jwks_uri, or discovery_issuer (e.g. the "
            "IdP's common or organizations issuer)",
        )
    if "login" in p:
        fail(f"{path}.login", "browser sign-in needs one issuer, not an issuer template")
    pattern = re.compile(re.escape(prefix) + f"({_SEGMENT})" + re.escape(rest))
    return IssuerTemplate(pattern=pattern, tenants=tenants, discovery_issuer=discovery)


_INTROSPECTION_KEYS = (
    "endpoint", "client_id", "client_secret_file", "client_secret_env", "auth_method", "cache_seconds",
    "negative_cache_seconds",
)  # fmt: skip
_INTROSPECTION_AUTH = ("client_secret_basic", "client_secret_post")


def introspection(
    raw: object, path: str, base_dir: Path, *, allow_insecure_http: bool
) -> IntrospectionSettings:
    c = mapping(raw, path, _INTROSPECTION_KEYS, required=("client_id",))
    endpoint = None
    if "endpoint" in c:
        endpoint = checked_url(c["endpoint"], f"{path}.endpoint", allow_insecure_http=allow_insecure_http)
    client_id = string(c["client_id"], f"{path}.client_id")
    if not client_id.isprintable():
        fail(f"{path}.client_id", "must be printable text")
    client_secret = client_secret_text(c, base_dir, path)
    if client_secret is None:
        fail(f"{path}.client_secret_file", "introspection needs client_secret_file or client_secret_env")
    auth = c.get("auth_method", "client_secret_basic")
    if auth not in _INTROSPECTION_AUTH:
        fail(f"{path}.auth_method", f"must be one of {', '.join(_INTROSPECTION_AUTH)}")
    return IntrospectionSettings(
        endpoint=endpoint,
        client_id=client_id,
        client_secret=client_secret,
        auth_method=auth,  # type: ignore[arg-type]  # checked above
        cache_seconds=number(c.get("cache_seconds", 60), f"{path}.cache_seconds", 0, 3600),
        negative_cache_seconds=number(
            c.get("negative_cache_seconds", 5), f"{path}.negative_cache_seconds", 0, 300
        ),
    )


_MODES = ("required", "allowed")
_CERTIFICATE_SOURCES: tuple[CertificateSource, ...] = ("peer", "xfcc", "client-cert")


def _mode(value: object, path: str) -> str:
    if value not in _MODES:
        fail(path, "must be required or allowed (leave it out for off)")
    assert isinstance(value, str)
    return value


def dpop(p: Mapping[str, object], path: str) -> DPoPSettings | None:
    if "dpop" not in p:
        for key in PROVIDER_KEYS:
            if key.startswith("dpop_") and key in p:
                fail(f"{path}.{key}", "only with dpop: required or allowed")
        return None
    mode = _mode(p["dpop"], f"{path}.dpop")
    algorithms = str_list(p.get("dpop_algorithms", list(DEFAULT_DPOP_ALGORITHMS)), f"{path}.dpop_algorithms")
    for i, alg in enumerate(algorithms):
        if alg not in DEFAULT_DPOP_ALGORITHMS:
            fail(
                f"{path}.dpop_algorithms[{i}]",
                f"{alg!r} is not an asymmetric algorithm we verify; supported: "
                + ", ".join(DEFAULT_DPOP_ALGORITHMS),
            )
    origin = None
    if p.get("dpop_public_origin") is not None:
        origin = string(p["dpop_public_origin"], f"{path}.dpop_public_origin")
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            fail(f"{path}.dpop_public_origin", "an origin: scheme://host[:port], without a path")
        if parts.query or parts.fragment or parts.username is not None:
            fail(f"{path}.dpop_public_origin", "an origin: scheme://host[:port], without a path")
        origin = f"{parts.scheme}://{parts.netloc}".lower()
    return DPoPSettings(
        mode=mode,  # type: ignore[arg-type]  # checked by _mode
        algorithms=frozenset(algorithms),
        proof_max_age_seconds=number(
            p.get("dpop_proof_max_age_seconds", 60), f"{path}.dpop_proof_max_age_seconds", 1, 600
        ),
        nonce=boolean(p.get("dpop_nonce", False), f"{path}.dpop_nonce"),
        public_origin=origin,
    )


def mtls_bound(p: Mapping[str, object], path: str) -> MtlsBindingSettings | None:
    if "mtls_bound" not in p:
        if "client_certificate_from" in p:
            fail(f"{path}.client_certificate_from", "only with mtls_bound: required or allowed")
        return None
    mode = _mode(p["mtls_bound"], f"{path}.mtls_bound")
    sources = str_list(p.get("client_certificate_from", ["peer"]), f"{path}.client_certificate_from")
    for i, source in enumerate(sources):
        if source not in _CERTIFICATE_SOURCES:
            fail(f"{path}.client_certificate_from[{i}]", f"must be one of {', '.join(_CERTIFICATE_SOURCES)}")
    if len(set(sources)) != len(sources):
        fail(f"{path}.client_certificate_from", "names a source twice")
    return MtlsBindingSettings(
        mode=mode,  # type: ignore[arg-type]  # checked by _mode
        certificate_from=tuple(sources),  # type: ignore[arg-type]  # checked above
    )


def check_workers(settings: Settings, workers: int) -> None:
    """What several worker processes (``serve --workers``) cannot do without a shared store: check
    a DPoP proof for replay (and accept each other's nonces). Raises ConfigError."""
    if workers <= 1 or settings.jwks_cache.backend == "redis":
        return
    for i, p in enumerate(settings.providers):
        if p.dpop is not None:
            fail(
                f"providers[{i}].dpop",
                "with --workers above 1, a DPoP proof replayed at another worker would pass: "
                "set jwks_cache.backend: redis (the workers share the proofs seen there)",
            )
