"""`providers[].login`, `sessions:` and rule `login:`: defaults, and every error with its key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ext_authz.config.model import owned_headers
from ext_authz.config.parse import parse
from ext_authz.config.values import ConfigError

SECRET = "cd" * 32


def document(tmp_path: Path, *, login: Any = None, sessions: Any = None, rules: Any = None) -> dict[str, Any]:
    (tmp_path / "keys").write_text(f"# session keys\n{SECRET}\n")
    provider: dict[str, Any] = {
        "name": "corp",
        "issuer": "https://idp.example.com/",
        "audiences": ["orders-web"],
        "login": {"client_id": "orders-web"} if login is None else login,
    }
    if login is False:
        del provider["login"]
    doc: dict[str, Any] = {
        "providers": [provider],
        "sessions": {"secret_file": "keys"} if sessions is None else sessions,
        "rules": rules
        if rules is not None
        else [{"match": {"paths": ["/app/*"]}, "login": "corp", "require": {"groups": ["staff"]}}],
    }
    if sessions is False:
        del doc["sessions"]
    return doc


def test_defaults(tmp_path: Path) -> None:
    settings = parse(document(tmp_path), base_dir=tmp_path)
    login = settings.providers[0].login
    assert login is not None
    assert (login.client_id, login.client_secret, login.token_endpoint_auth) == ("orders-web", None, "none")
    assert login.scopes == ("openid", "profile", "email")
    assert login.forward_access_token == "none"
    sessions = settings.sessions
    assert sessions is not None
    assert sessions.secrets == (bytes.fromhex(SECRET),)
    assert (sessions.cookie, sessions.store) == ("__Host-ext-authz", "cookie")
    assert (sessions.callback_path, sessions.logout_path) == ("/oauth2/callback", "/oauth2/logout")
    assert sessions.post_logout_redirect == "/"
    assert (sessions.idle_timeout_seconds, sessions.max_age_seconds, sessions.refresh_before_seconds) == (
        3600,
        86400,
        60,
    )
    assert settings.rules[0].login == "corp"
    assert "secret" not in repr(sessions).lower() or SECRET not in repr(sessions)
    assert SECRET not in repr(settings)


def test_client_secret_from_file_defaults_to_basic(tmp_path: Path) -> None:
    (tmp_path / "client").write_text("s3cret\n")
    settings = parse(
        document(tmp_path, login={"client_id": "c", "client_secret_file": "client"}), base_dir=tmp_path
    )
    login = settings.providers[0].login
    assert login is not None
    assert (login.client_secret, login.token_endpoint_auth) == ("s3cret", "client_secret_basic")
    assert "s3cret" not in repr(settings)


def test_forwarded_access_token_header_is_owned(tmp_path: Path) -> None:
    doc = document(tmp_path, login={"client_id": "c", "forward_access_token": "x-forwarded-access-token"})
    assert "x-forwarded-access-token" in owned_headers(parse(doc, base_dir=tmp_path))


ERRORS = [
    (
        {"login": {"client_id": "c", "token_endpoint_auth": "client_secret_post"}},
        "providers[0].login.token_endpoint_auth",
        "needs client_secret_file",
    ),
    (
        {"login": {"client_id": "c", "token_endpoint_auth": "private_key_jwt"}},
        "providers[0].login.token_endpoint_auth",
        "must be one of",
    ),
    (
        {"login": {"client_id": "c", "scopes": ["profile"]}},
        "providers[0].login.scopes",
        "must include openid",
    ),
    (
        {"login": {"client_id": "c", "scopes": ["openid", "a b"]}},
        "providers[0].login.scopes[1]",
        "without blanks",
    ),
    (
        {"login": {"client_id": "c", "forward_access_token": "cookie"}},
        "providers[0].login.forward_access_token",
        "must be one of",
    ),
    (
        {"login": {"client_id": "c", "client_secret_file": "missing"}},
        "providers[0].login.client_secret_file",
        "cannot read",
    ),
    (
        {"login": {"client_id": "c", "client_secret_env": "EXT_AUTHZ_TEST_UNSET_VAR"}},
        "providers[0].login.client_secret_env",
        "not set",
    ),
    ({"login": {"client": "c"}}, "providers[0].login.client", "unknown key"),
    ({"login": {}}, "providers[0].login.client_id", "is required"),
    ({"sessions": False}, "sessions", "is required: providers[0].login"),
    ({"login": False, "rules": [{"match": {}, "require": {}}]}, "sessions", "no provider has a login"),
    (
        {"login": False, "sessions": False, "rules": [{"match": {}, "login": "corp", "require": {}}]},
        "rules[0].login",
        "has no login",
    ),
    ({"rules": [{"match": {}, "login": "other", "require": {}}]}, "rules[0].login", "unknown provider"),
    ({"rules": [{"match": {}, "login": "corp", "allow": "anonymous"}]}, "rules[0].login", "anonymous"),
    ({"sessions": {}}, "sessions.secret_file", "is required"),
    ({"sessions": {"secret_file": "nope"}}, "sessions.secret_file", "cannot read"),
    ({"sessions": {"secret_env": "EXT_AUTHZ_TEST_UNSET_VAR"}}, "sessions.secret_env", "not set"),
    ({"sessions": {"secret_file": "keys", "secret_env": "X"}}, "sessions.secret_env", "give only one"),
    ({"sessions": {"secret_file": "keys", "cookie": "a b"}}, "sessions.cookie", "cookie name"),
    ({"sessions": {"secret_file": "keys", "store": "memcached"}}, "sessions.store", "must be cookie"),
    (
        {"sessions": {"secret_file": "keys", "redis_url": "redis://x"}},
        "sessions.redis_url",
        "only store: redis",
    ),
    (
        {"sessions": {"secret_file": "keys", "backchannel_logout_path": "/bc"}},
        "sessions.backchannel_logout_path",
        "store: redis",
    ),
    (
        {"sessions": {"secret_file": "keys", "callback_path": "oauth2/cb"}},
        "sessions.callback_path",
        "plain absolute path",
    ),
    (
        {"sessions": {"secret_file": "keys", "callback_path": "/cb?x=1"}},
        "sessions.callback_path",
        "plain absolute path",
    ),
    (
        {"sessions": {"secret_file": "keys", "logout_path": "/oauth2/callback"}},
        "sessions.logout_path",
        "same path",
    ),
    (
        {"sessions": {"secret_file": "keys", "post_logout_redirect": "//evil.example"}},
        "sessions.post_logout_redirect",
        "path on this host",
    ),
    (
        {"sessions": {"secret_file": "keys", "post_logout_redirect": "javascript:alert(1)"}},
        "sessions.post_logout_redirect",
        "path on this host",
    ),
    (
        {"sessions": {"secret_file": "keys", "idle_timeout_seconds": 7200, "max_age_seconds": 3600}},
        "sessions.idle_timeout_seconds",
        "must not exceed",
    ),
    (
        {"sessions": {"secret_file": "keys", "refresh_before_seconds": -1}},
        "sessions.refresh_before_seconds",
        "",
    ),
    ({"sessions": {"secret_file": "keys", "colour": "blue"}}, "sessions.colour", "unknown key"),
]


@pytest.mark.parametrize(("change", "key_path", "message"), ERRORS)
def test_errors_name_the_key_path(
    tmp_path: Path, change: dict[str, Any], key_path: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(document(tmp_path, **change), base_dir=tmp_path)
    assert caught.value.key_path == key_path, str(caught.value)
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("content", "line"),
    [("ab" * 16, "line 1"), (f"{SECRET}\nnot-hex\n", "line 2"), ("", "")],
)
def test_short_or_bad_session_secrets(tmp_path: Path, content: str, line: str) -> None:
    doc = document(tmp_path)
    (tmp_path / "keys").write_text(content)
    with pytest.raises(ConfigError) as caught:
        parse(doc, base_dir=tmp_path)
    assert caught.value.key_path == "sessions.secret_file"
    assert line in caught.value.message
    assert "ab" * 16 not in str(caught.value)


def test_the_redis_store(tmp_path: Path) -> None:
    url = "redis://:pw@127.0.0.1:6380/1"
    doc = document(
        tmp_path,
        sessions={
            "secret_file": "keys",
            "store": "redis",
            "redis_url": url,
            "backchannel_logout_path": "/bc",
        },
    )
    sessions = parse(doc, base_dir=tmp_path).sessions
    assert sessions is not None
    assert (sessions.store, sessions.redis_url, sessions.backchannel_logout_path) == ("redis", url, "/bc")
    assert "pw" not in repr(sessions)


@pytest.mark.parametrize("url", ["http://127.0.0.1", "redis://", "127.0.0.1:6379"])
def test_a_bad_redis_url(tmp_path: Path, url: str) -> None:
    doc = document(tmp_path, sessions={"secret_file": "keys", "store": "redis", "redis_url": url})
    with pytest.raises(ConfigError) as caught:
        parse(doc, base_dir=tmp_path)
    assert caught.value.key_path == "sessions.redis_url"


def test_the_redis_store_needs_a_url(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(document(tmp_path, sessions={"secret_file": "keys", "store": "redis"}), base_dir=tmp_path)
    assert caught.value.key_path == "sessions.redis_url"
