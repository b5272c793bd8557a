"""``providers[].login`` and ``sessions:``: browser sign-in, parsed and checked at load.

The session secret is read and checked here (a missing, short or unreadable secret is a config
error with its key path); client secrets likewise. Neither ever appears in an error message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from ext_authz.config.model import LoginSettings, ProviderSettings, RuleSettings, SessionSettings
from ext_authz.config.secrets import client_secret_text, secret_value
from ext_authz.config.values import fail, mapping, number, str_list, string
from ext_authz.sessions.cookies import SecretError, parse_secrets

_LOGIN_KEYS = (
    "client_id", "client_secret_file", "client_secret_env", "token_endpoint_auth", "scopes",
    "forward_access_token",
)  # fmt: skip
_AUTH_METHODS = ("client_secret_basic", "client_secret_post", "none")
_FORWARD = ("none", "authorization", "x-forwarded-access-token")
_COOKIE_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 6265 §4.1.1: a token
_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@/-]*")
# Room for the chunk and transaction suffixes ("-signin-" + 12 characters) within a cookie name.
_MAX_COOKIE_NAME = 64


def login(raw: object, path: str, base_dir: Path) -> LoginSettings:
    c = mapping(raw, path, _LOGIN_KEYS, required=("client_id",))
    client_id = string(c["client_id"], f"{path}.client_id")
    if not client_id.isprintable():
        fail(f"{path}.client_id", "must be printable text")
    client_secret = client_secret_text(c, base_dir, path)
    default_auth = "client_secret_basic" if client_secret is not None else "none"
    auth = c.get("token_endpoint_auth", default_auth)
    if auth not in _AUTH_METHODS:
        fail(f"{path}.token_endpoint_auth", f"must be one of {', '.join(_AUTH_METHODS)}")
    if auth == "none" and client_secret is not None:
        fail(f"{path}.token_endpoint_auth", "none sends no client secret: remove the secret or pick a method")
    if auth != "none" and client_secret is None:
        fail(f"{path}.token_endpoint_auth", f"{auth} needs client_secret_file or client_secret_env")
    scopes = str_list(c.get("scopes", ["openid", "profile", "email"]), f"{path}.scopes")
    for i, scope in enumerate(scopes):
        if not scope.isascii() or not scope.isprintable() or " " in scope or '"' in scope or "\\" in scope:
            fail(f"{path}.scopes[{i}]", "a scope is printable ASCII without blanks, '\"' or '\\'")
    if "openid" not in scopes:
        fail(f"{path}.scopes", "must include openid (the sign-in returns an ID token)")
    forward = c.get("forward_access_token", "none")
    if forward not in _FORWARD:
        fail(f"{path}.forward_access_token", f"must be one of {', '.join(_FORWARD)}")
    return LoginSettings(
        client_id=client_id,
        client_secret=client_secret,
        token_endpoint_auth=auth,  # type: ignore[arg-type]  # checked above
        scopes=tuple(dict.fromkeys(scopes)),
        forward_access_token=forward,  # type: ignore[arg-type]  # checked above
    )


_SESSION_KEYS = (
    "secret_file", "secret_env", "cookie", "store", "redis_url", "callback_path", "logout_path",
    "backchannel_logout_path", "post_logout_redirect", "idle_timeout_seconds", "max_age_seconds",
    "refresh_before_seconds",
)  # fmt: skip


def sessions(raw: object, base_dir: Path) -> SessionSettings:
    c = mapping(raw, "sessions", _SESSION_KEYS)
    secret = secret_value(c, "secret", base_dir, "sessions")
    if secret is None:
        fail(
            "sessions.secret_file",
            "is required (or secret_env): one key per line, each at least 32 random bytes as 64 hex "
            "characters (`openssl rand -hex 32`), the same for every replica",
        )
    try:
        secrets = parse_secrets(secret.value.decode("utf-8", "replace"))
    except SecretError as exc:
        fail(secret.path, str(exc))
    cookie = string(c.get("cookie", "__Host-ext-authz"), "sessions.cookie")
    if not _COOKIE_NAME.fullmatch(cookie) or len(cookie) > _MAX_COOKIE_NAME:
        fail(
            "sessions.cookie",
            f"must be a cookie name (RFC 6265 token) of at most {_MAX_COOKIE_NAME} characters",
        )
    store = _store(c)
    paths = {
        key: _path(c.get(key, default), f"sessions.{key}")
        for key, default in (("callback_path", "/oauth2/callback"), ("logout_path", "/oauth2/logout"))
    }
    backchannel = None
    if c.get("backchannel_logout_path") is not None:
        backchannel = _path(c["backchannel_logout_path"], "sessions.backchannel_logout_path")
        if store != "redis":
            fail(
                "sessions.backchannel_logout_path",
                "needs store: redis (a cookie store cannot end a session the browser still holds)",
            )
        paths["backchannel_logout_path"] = backchannel
    seen: dict[str, str] = {}
    for key, value in paths.items():
        if value in seen:
            fail(f"sessions.{key}", f"is the same path as sessions.{seen[value]}")
        seen[value] = key
    idle = number(c.get("idle_timeout_seconds", 3600), "sessions.idle_timeout_seconds", 60, 30 * 86400)
    max_age = number(c.get("max_age_seconds", 86400), "sessions.max_age_seconds", 60, 365 * 86400)
    if idle > max_age:
        fail("sessions.idle_timeout_seconds", "must not exceed max_age_seconds")
    return SessionSettings(
        secrets=secrets,
        cookie=cookie,
        store=store,
        redis_url=_redis_url(c) if store == "redis" else None,
        callback_path=paths["callback_path"],
        logout_path=paths["logout_path"],
        backchannel_logout_path=backchannel,
        post_logout_redirect=_post_logout(c.get("post_logout_redirect", "/")),
        idle_timeout_seconds=idle,
        max_age_seconds=max_age,
        refresh_before_seconds=number(
            c.get("refresh_before_seconds", 60), "sessions.refresh_before_seconds", 0, 3600
        ),
    )


def _store(c: Mapping[str, object]) -> Literal["cookie", "redis"]:
    store = c.get("store", "cookie")
    if store not in ("cookie", "redis"):
        fail("sessions.store", "must be cookie (tokens sealed in the cookie) or redis")
    if store == "cookie" and "redis_url" in c:
        fail("sessions.redis_url", "only store: redis takes a redis_url")
    return "redis" if store == "redis" else "cookie"


def _redis_url(c: Mapping[str, object]) -> str:
    if "redis_url" not in c:
        fail("sessions.redis_url", "is required for store: redis (redis://host:6379/1)")
    url = string(c["redis_url"], "sessions.redis_url")
    if urlsplit(url).scheme not in ("redis", "rediss") or not urlsplit(url).hostname:
        fail("sessions.redis_url", "must be redis://HOST[:PORT][/DB] or rediss://...")
    return url


def _path(value: object, path: str) -> str:
    text = string(value, path)
    if not _PATH.fullmatch(text) or text.startswith("//") or "/../" in f"{text}/" or "/./" in f"{text}/":
        fail(path, "must be a plain absolute path (e.g. /oauth2/callback): no query, '//', '.' or '..'")
    return text


def _post_logout(value: object) -> str:
    text = string(value, "sessions.post_logout_redirect")
    plain = text.isascii() and text.isprintable() and " " not in text and "\\" not in text
    local = text.startswith("/") and not text.startswith("//")
    parts = urlsplit(text)
    if plain and (local or (parts.scheme in ("http", "https") and parts.hostname)):
        return text
    fail(
        "sessions.post_logout_redirect",
        "must be a path on this host (/signed-out) or an absolute http(s) URL",
    )


def check_logins(
    providers: tuple[ProviderSettings, ...],
    rules: tuple[RuleSettings, ...],
    session_settings: SessionSettings | None,
) -> None:
    """``login:`` on a rule names a provider with ``login``; sessions exist exactly when needed."""
    logins = {p.name for p in providers if p.login is not None}
    for i, rule in enumerate(rules):
        if rule.login is not None and rule.login not in logins:
            fail(
                f"rules[{i}].login",
                f"provider {rule.login!r} has no login: section (it cannot sign browsers in)",
            )
    if logins and session_settings is None:
        first = next(i for i, p in enumerate(providers) if p.login is not None)
        fail("sessions", f"is required: providers[{first}].login signs browsers in")
    if session_settings is not None and not logins:
        fail("sessions", "no provider has a login: section (nothing signs browsers in)")
