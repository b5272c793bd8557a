"""``jwks_cache:`` and ``tls:``: the sections that name secrets and key files, read and checked at load."""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ext_authz.config.model import JwksCacheSettings, TlsSettings
from ext_authz.config.values import boolean, fail, mapping, number, string
from ext_authz.tlsfiles import TlsFileError, read_material


def jwks_cache(raw: object, base_dir: Path = Path(".")) -> JwksCacheSettings:
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
    secret = secret_value(c, "secret", base_dir)
    if secret is None:
        fail(
            "jwks_cache.secret_file",
            "is required for the redis backend (or secret_env): a file of at least "
            f"{MIN_SECRET_BYTES} random bytes, e.g. `openssl rand -hex 32`, the same for every replica",
        )
    if len(secret.value) < MIN_SECRET_BYTES:
        fail(secret.path, f"the secret must be at least {MIN_SECRET_BYTES} bytes long")
    password_bytes = secret_value(c, "password", base_dir)
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
class Secret:
    path: str  # the key path it came from, for error messages
    value: bytes = field(repr=False)


def secret_value(
    c: Mapping[str, object], name: str, base_dir: Path, section: str = "jwks_cache"
) -> Secret | None:
    """`NAME_file` (relative to the config file) or `NAME_env` of the mapping at key path
    ``section``: the bytes, one trailing newline dropped. Error messages name the file or
    variable, never the content."""
    given = [k for k in (f"{name}_file", f"{name}_env") if k in c]
    if not given:
        return None
    if len(given) > 1:
        fail(f"{section}.{given[1]}", f"give only one of {name}_file, {name}_env")
    path = f"{section}.{given[0]}"
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
    return Secret(path, value)


def tls(raw: object, base_dir: Path, admin_address: str | None) -> TlsSettings:
    """The files are read and checked now: a listener never starts with a pair that cannot work."""
    c = mapping(
        raw, "tls", ("cert_file", "key_file", "client_ca_file", "admin"), required=("cert_file", "key_file")
    )

    def file(key: str) -> str:
        return str(base_dir / string(c[key], f"tls.{key}"))

    client_ca_file = file("client_ca_file") if c.get("client_ca_file") is not None else None
    admin = boolean(c.get("admin", False), "tls.admin")
    if admin and admin_address is None:
        fail("tls.admin", "there is no admin listener (set `admin: HOST:PORT`)")
    settings = TlsSettings(
        cert_file=file("cert_file"),
        key_file=file("key_file"),
        client_ca_file=client_ca_file,
        admin=admin,
    )
    try:
        read_material(settings.cert_file, settings.key_file, settings.client_ca_file)
    except TlsFileError as exc:
        fail(f"tls.{exc.field}", exc.message)
    return settings


def client_secret_text(c: Mapping[str, object], base_dir: Path, section: str) -> str | None:
    """An OAuth client's secret (`client_secret_file` / `client_secret_env`) as text, None when
    neither is given."""
    secret = secret_value(c, "client_secret", base_dir, section)
    if secret is None:
        return None
    try:
        return secret.value.decode("utf-8")
    except UnicodeDecodeError:
        fail(secret.path, "the client secret is not UTF-8 text")
