"""Sealed cookies: what a browser session, or a sign-in under way, carries through the browser.

A sealed value is ``v1.`` + base64url(key id ‖ nonce ‖ AES-256-GCM ciphertext and tag):
- Keys: ``sessions.secret_file`` holds one secret per line (at least 32 random bytes, as hex);
  each gives an AES-256 key through HKDF-SHA256. The first seals; every one opens, so a new
  secret is put first and the old one kept below it until the cookies it sealed have expired.
- The key id (4 bytes of a hash of the derived key) says which key to try; it is not secret.
- The associated data binds a value to its purpose and cookie name (``session:__Host-ext-authz``):
  a sign-in's transaction cookie cannot be replayed as a session, nor a value under another name.
- Inside: ``{"iat": …, "exp": …, "d": …}``; a value is opened only before ``exp`` and not when
  ``iat`` lies in the future beyond the allowed skew.

Opening never raises: a tampered, truncated, re-ordered, foreign-key, expired or malformed value
is None, which the caller treats as no session (and logs as such, never the value).

Browsers keep about 4 KB per cookie: a longer sealed value is split into ``name`` (``N~`` + the
first part, N parts in all) and ``name.1`` … ``name.{N-1}``. A sealed value starts with ``v``,
never with a digit, so the two forms cannot be confused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION = "v1."
MIN_SECRET_BYTES = 32
KEY_ID_BYTES = 4
NONCE_BYTES = 12
CHUNK_CHARS = 3800  # per cookie, leaving room for the name and attributes within ~4 KB
MAX_CHUNKS = 8  # a session never needs more: a larger one is refused when sealed
CLOCK_SKEW_SECONDS = 60
_HKDF_INFO = b"ext-authz sealed cookie v1"
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


class SecretError(ValueError):
    """A secrets file that cannot be used; the message says which line and why (never the secret)."""


def parse_secrets(text: str) -> tuple[bytes, ...]:
    """The secrets of a ``sessions.secret_file``: one per line, hex, at least 32 bytes each; blank
    lines and lines starting with ``#`` are skipped. Raises SecretError."""
    secrets: list[bytes] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            secret = bytes.fromhex(line)
        except ValueError:
            raise SecretError(f"line {number}: not hex (write `openssl rand -hex 32`)") from None
        if len(secret) < MIN_SECRET_BYTES:
            raise SecretError(f"line {number}: {len(secret)} bytes; at least {MIN_SECRET_BYTES} are needed")
        secrets.append(secret)
    if not secrets:
        raise SecretError(f"no secret (one line of at least {MIN_SECRET_BYTES} bytes as hex)")
    return tuple(secrets)


@dataclass(frozen=True, slots=True)
class _Key:
    key_id: bytes
    aead: AESGCM


def _derive(secret: bytes) -> _Key:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(secret)
    return _Key(hashlib.sha256(b"key id:" + key).digest()[:KEY_ID_BYTES], AESGCM(key))


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes | None:
    """Strict: the base64url alphabet, no padding, and the one encoding of its bytes (so one
    sealed value has one spelling)."""
    if len(text) % 4 == 1 or not _BASE64URL.fullmatch(text):
        return None
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return data if _b64encode(data) == text else None


class Sealer:
    """Seals and opens values with the configured secrets (the first seals, all open)."""

    def __init__(self, secrets: Sequence[bytes]) -> None:
        if not secrets or any(len(s) < MIN_SECRET_BYTES for s in secrets):
            raise SecretError(f"at least one secret of at least {MIN_SECRET_BYTES} bytes is needed")
        self._keys = tuple(_derive(secret) for secret in secrets)

    def seal(self, purpose: str, name: str, data: object, *, now: float, lifetime_seconds: float) -> str:
        """``data`` (JSON values, not None: None is what :meth:`open` answers for no value) sealed
        for ``purpose`` under cookie ``name``, valid for ``lifetime_seconds`` from ``now``."""
        if data is None:
            raise ValueError("None cannot be sealed: it would open as no value")
        key = self._keys[0]
        plaintext = json.dumps(
            {"iat": int(now), "exp": int(now + lifetime_seconds), "d": data},
            separators=(",", ":"),
            allow_nan=False,
        ).encode("utf-8")
        nonce = os.urandom(NONCE_BYTES)
        sealed = key.aead.encrypt(nonce, plaintext, _associated(purpose, name))
        return VERSION + _b64encode(key.key_id + nonce + sealed)

    def open(self, purpose: str, name: str, value: str, *, now: float) -> object | None:
        """The data ``value`` was sealed with, or None: for any value that is not one this sealer
        made for this purpose and name, still unexpired."""
        if not value.startswith(VERSION):
            return None
        raw = _b64decode(value[len(VERSION) :])
        if raw is None or len(raw) < KEY_ID_BYTES + NONCE_BYTES + 16:
            return None
        key_id, nonce, sealed = (
            raw[:KEY_ID_BYTES],
            raw[KEY_ID_BYTES : KEY_ID_BYTES + NONCE_BYTES],
            raw[KEY_ID_BYTES + NONCE_BYTES :],
        )
        associated = _associated(purpose, name)
        for key in self._keys:
            if key.key_id != key_id:
                continue
            try:
                plaintext = key.aead.decrypt(nonce, sealed, associated)
            except InvalidTag:
                continue
            return _unexpired(plaintext, now)
        return None


def _associated(purpose: str, name: str) -> bytes:
    # Length-prefixed: ("session:a", "b") and ("session", "a:b") are different associated data.
    return f"{len(purpose)}:{purpose}:{name}".encode("utf-8", "surrogatepass")


def _unexpired(plaintext: bytes, now: float) -> object | None:
    try:
        content = json.loads(plaintext)
    except (ValueError, RecursionError):
        return None
    if not isinstance(content, dict) or set(content) != {"iat", "exp", "d"}:
        return None
    iat, exp = content["iat"], content["exp"]
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in (iat, exp)):
        return None
    if now >= exp or iat > now + CLOCK_SKEW_SECONDS:
        return None
    data: object = content["d"]
    return data


# ---- one value across several cookies ----


def split(name: str, sealed: str) -> list[tuple[str, str]]:
    """The cookies (name, value) that carry ``sealed``: one, or ``MAX_CHUNKS`` at most. Raises
    ValueError for a value too large for that (a session must stay small: the caller decides)."""
    if len(sealed) <= CHUNK_CHARS:
        return [(name, sealed)]
    parts = [sealed[i : i + CHUNK_CHARS] for i in range(0, len(sealed), CHUNK_CHARS)]
    if len(parts) > MAX_CHUNKS:
        raise ValueError(f"a sealed value of {len(sealed)} characters needs more than {MAX_CHUNKS} cookies")
    return [
        (name, f"{len(parts)}~{parts[0]}"),
        *((f"{name}.{i}", part) for i, part in enumerate(parts[1:], 1)),
    ]


def chunk_names(name: str) -> tuple[str, ...]:
    """Every cookie name a split value under ``name`` may use (to expire the ones left over)."""
    return (name, *(f"{name}.{i}" for i in range(1, MAX_CHUNKS)))


def join(name: str, cookies: Mapping[str, str]) -> str | None:
    """The sealed value the request's cookies carry under ``name`` (split or not), None when it
    has none or its parts do not add up."""
    first = cookies.get(name)
    if first is None:
        return None
    count, tilde, head = first.partition("~")
    if not tilde:
        return first if not first[:1].isdigit() else None
    if len(count) != 1 or count not in "0123456789":  # at most MAX_CHUNKS parts: one digit
        return None
    n = int(count)
    if not 2 <= n <= MAX_CHUNKS:
        return None
    parts = [head]
    for i in range(1, n):
        part = cookies.get(f"{name}.{i}")
        if part is None:
            return None
        parts.append(part)
    return "".join(parts)


# ---- Set-Cookie ----

# Always: a browser sends these cookies back to this host only, over TLS (or to a local
# development host, which browsers treat as secure), never to scripts, and on top-level
# navigations from elsewhere but not on cross-site subrequests.
_ATTRIBUTES = "Path=/; Secure; HttpOnly; SameSite=Lax"
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_COOKIE_OCTETS = re.compile(r"[\x21\x23-\x2B\x2D-\x3A\x3C-\x5B\x5D-\x7E]*")


def set_cookie(name: str, value: str, *, max_age_seconds: int) -> str:
    """A ``Set-Cookie`` value (the header's, without the name ``Set-Cookie``). Raises ValueError
    for a name that is not an RFC 6265 token or a value with other than cookie-octets."""
    if not _TOKEN.fullmatch(name) or not _COOKIE_OCTETS.fullmatch(value):
        raise ValueError("not a cookie name and value (RFC 6265 §4.1.1)")
    return f"{name}={value}; Max-Age={max(0, int(max_age_seconds))}; {_ATTRIBUTES}"


def expire_cookie(name: str) -> str:
    if not _TOKEN.fullmatch(name):
        raise ValueError("not a cookie name (RFC 6265 §4.1.1)")
    return f"{name}=; Max-Age=0; {_ATTRIBUTES}"


def set_cookies(name: str, sealed: str, *, max_age_seconds: int, present: Mapping[str, str]) -> list[str]:
    """The ``Set-Cookie`` values that carry ``sealed`` under ``name`` and expire the parts of an
    earlier, longer value that the request still ``present``s."""
    carried = split(name, sealed)
    names = {n for n, _ in carried}
    values = [set_cookie(n, v, max_age_seconds=max_age_seconds) for n, v in carried]
    return values + [expire_cookie(n) for n in chunk_names(name) if n not in names and n in present]


def expire_cookies(name: str, present: Mapping[str, str]) -> list[str]:
    """The ``Set-Cookie`` values that end every part of ``name`` the request presents (logout)."""
    return [expire_cookie(n) for n in chunk_names(name) if n in present]


def secure_context(scheme: str, host: str) -> bool:
    """Whether a browser keeps a ``Secure`` cookie for this origin: https, or a local development
    host over http (``localhost``, ``*.localhost``, ``127.0.0.1``, ``[::1]``). ``host`` is the
    canonical host (hosts.canonical_host: lower-case, no port)."""
    if scheme.lower() == "https":
        return True
    return scheme.lower() == "http" and (host in _LOCAL_HOSTS or host.endswith(".localhost"))
