"""The configuration file: loaded, validated completely and given defaults before anything binds.

Every error names the key path (``providers[0].issuer``) and what is wrong; the CLI prefixes the file
name and exits with status 2. Unknown keys are errors: in a security component a typo such as
``audience`` for ``audiences`` must not silently weaken a check. YAML → ``config.model`` values.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

from ext_authz.config.http import http_settings
from ext_authz.config.model import (
    DEFAULT_LISTEN,
    DEFAULT_MAX_TOKEN_BYTES,
    DEFAULT_REALM,
    DEFAULT_RULE,
    LogSettings,
    Settings,
    ShutdownSettings,
    TracingSettings,
)
from ext_authz.config.providers import check_identity_headers, check_providers_together, provider
from ext_authz.config.rules import parse_rules
from ext_authz.config.secrets import jwks_cache, tls
from ext_authz.config.sessions import check_logins, sessions
from ext_authz.config.values import boolean, fail, listof, load_yaml_file, mapping, number, string


def listen_address(value: object, path: str) -> str:
    text = string(value, path)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        fail(path, f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9001 or [::1]:9001)")
    if host.startswith("[") != host.endswith("]"):
        fail(path, f"{text!r}: bracket an IPv6 host, e.g. [::1]:9001")
    return text


_TOP_KEYS = (
    "listen", "realm", "providers", "rules", "max_token_bytes", "max_header_value_bytes", "readiness",
    "jwks_cache", "mode", "admin", "log", "shutdown", "tracing", "token_cache", "tls",
    "path_readings", "sessions", "listen_http", "http",
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
        provider(p, f"providers[{i}]", base_dir) for i, p in enumerate(listof(top["providers"], "providers"))
    )
    check_providers_together(providers)
    names = frozenset(p.name for p in providers)
    mode = top.get("mode", "enforce")
    if mode not in ("enforce", "dry_run"):
        fail("mode", "must be enforce or dry_run (decisions are computed and logged, requests allowed)")
    if "rules" in top:
        rules = parse_rules(top["rules"], names, dry_run=mode == "dry_run")
    else:
        # No rules: every request needs a valid token from any provider.
        rules = (replace(DEFAULT_RULE, dry_run=mode == "dry_run"),)
    check_identity_headers(providers, rules)
    session_settings = sessions(top["sessions"], base_dir) if top.get("sessions") is not None else None
    check_logins(providers, rules, session_settings)
    max_token_bytes = int(
        number(top.get("max_token_bytes", DEFAULT_MAX_TOKEN_BYTES), "max_token_bytes", 256, 1 << 20)
    )
    readiness = top.get("readiness", "all")
    if readiness not in ("all", "any"):
        fail("readiness", "must be all (every provider has keys) or any (at least one has)")
    cache = jwks_cache(top.get("jwks_cache", {}), base_dir)
    max_header_value_bytes = int(
        number(top.get("max_header_value_bytes", 8192), "max_header_value_bytes", 64, 60 * 1024)
    )
    admin = listen_address(top["admin"], "admin") if top.get("admin") is not None else None
    tls_settings = tls(top["tls"], base_dir, admin) if top.get("tls") is not None else None
    listen_http = (
        listen_address(top["listen_http"], "listen_http") if top.get("listen_http") is not None else None
    )
    http = http_settings(top.get("http", {}), listen_http, tls_settings)
    if listen_http is not None:
        for i, p in enumerate(providers):
            if p.from_params and not p.forward_token:
                fail(
                    f"providers[{i}].forward_token",
                    "false with from_params: the HTTP listener's gateways cannot remove a query "
                    "parameter, so the token would reach the backend (use headers or cookies)",
                )
    return Settings(
        listen=listen,
        realm=realm,
        providers=providers,
        rules=rules,
        max_token_bytes=max_token_bytes,
        readiness=readiness,
        jwks_cache=cache,
        dry_run=mode == "dry_run",
        max_header_value_bytes=max_header_value_bytes,
        admin=admin,
        log=_log(top.get("log", {})),
        shutdown=_shutdown(top.get("shutdown", {})),
        tracing=_tracing(top.get("tracing", {})),
        token_cache_entries=_token_cache(top.get("token_cache", {})),
        source=source,
        tls=tls_settings,
        path_readings=_path_readings(top.get("path_readings", "all")),
        sessions=session_settings,
        listen_http=listen_http,
        http=http,
    )


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


def load(file: str | Path) -> Settings:
    """Read and validate a config file. Raises ConfigError (key path '' for file-level problems)."""
    path = Path(file)
    return parse(load_yaml_file(path), base_dir=path.parent, source=str(path))
