"""The development issuer's browser sign-in: the OAuth 2.0 authorization code flow with PKCE (RFC 6749
§4.1, RFC 7636) under OpenID Connect, its refresh tokens and its sessions. DEVELOPMENT ONLY.

Everything lives in memory, in one process: pending authorization requests, single-use codes,
refresh tokens (rotated, one family per sign-in session) and the sessions. Each store is bounded
and swept of what expired, so a loop of requests cannot exhaust memory. The clock is injected, so
tests move time instead of sleeping. Nothing here does I/O or signs; issuer.py does both.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar
from urllib.parse import unquote_plus, urlencode, urlsplit, urlunsplit

Clock = Callable[[], float]

MAX_ENTRIES = 10_000
CODE_TTL = 60  # RFC 6749 §4.1.2: "a maximum authorization code lifetime of 10 minutes is RECOMMENDED"
PENDING_TTL = 600  # how long a login page stays usable
SWEEP_INTERVAL = 30.0
SCOPES_SUPPORTED = ("openid", "profile", "email", "offline_access")
OFFLINE_ACCESS = "offline_access"
BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"
MAX_FIELD = 255

# RFC 7636 §4.1: code_verifier = 43*128unreserved; §4.2: an S256 challenge is base64url (no padding).
_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
_CHALLENGE = re.compile(r"[A-Za-z0-9\-_]{43,128}")
# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ).
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
# A redirect URI's host as it may appear in a CSP source expression: a name, IPv4 or [IPv6].
_HOST = re.compile(r"[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\]")

K = TypeVar("K")
V = TypeVar("V")


class BoundedStore(Generic[K, V]):
    """A dict whose entries expire; at most `limit` of them (the oldest goes first when full)."""

    def __init__(self, clock: Clock, limit: int = MAX_ENTRIES) -> None:
        self._clock = clock
        self._limit = limit
        self._entries: dict[K, tuple[V, float]] = {}
        self._next_sweep = 0.0

    def put(self, key: K, value: V, ttl: float) -> None:
        now = self._clock()
        if now >= self._next_sweep or len(self._entries) >= self._limit:
            self.sweep(now)
        while len(self._entries) >= self._limit:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (value, now + ttl)

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]

    def pop(self, key: K) -> V | None:
        value = self.get(key)
        self._entries.pop(key, None)
        return value

    def remove_where(self, predicate: Callable[[V], bool]) -> int:
        doomed = [key for key, (value, _) in self._entries.items() if predicate(value)]
        for key in doomed:
            del self._entries[key]
        return len(doomed)

    def sweep(self, now: float) -> None:
        self._next_sweep = now + SWEEP_INTERVAL
        for key in [key for key, (_, expires) in self._entries.items() if expires <= now]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._entries))


class AuthorizeError(Exception):
    """An authorization request refused (RFC 6749 §4.1.2.1). Without a usable redirect URI (or client)
    the user is told on a page; otherwise the client is told through its redirect URI."""

    def __init__(self, error: str, description: str, *, redirectable: bool = True) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.redirectable = redirectable


class TokenError(Exception):
    """A token request refused (RFC 6749 §5.2): 400, or 401 for invalid_client."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description

    @property
    def status(self) -> int:
        return 401 if self.error == "invalid_client" else 400


@dataclass(frozen=True, slots=True)
class AuthorizeRequest:
    client_id: str
    redirect_uri: str
    scopes: tuple[str, ...]
    state: str | None
    nonce: str | None
    code_challenge: str


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the developer said they are on the login page (no password: development only)."""

    sub: str
    groups: tuple[str, ...]
    email: str

    @classmethod
    def from_form(cls, sub: str, groups: str, email: str) -> Identity:
        sub = sub.strip()
        if not sub or len(sub) > MAX_FIELD:
            raise ValueError(f"sub: 1 to {MAX_FIELD} characters")
        names = tuple(dict.fromkeys(g.strip() for g in groups.split(",") if g.strip()))
        if len(names) > 50 or any(len(g) > MAX_FIELD for g in names):
            raise ValueError(f"groups: at most 50, each at most {MAX_FIELD} characters")
        email = email.strip() or f"{sub}@example.com"
        if len(email) > MAX_FIELD:
            raise ValueError(f"email: at most {MAX_FIELD} characters")
        return cls(sub, names, email)


@dataclass(frozen=True, slots=True)
class Grant:
    """What a code or a refresh token stands for: one sign-in, to one client, with its scopes."""

    client_id: str
    redirect_uri: str
    scopes: tuple[str, ...]
    nonce: str | None
    code_challenge: str
    identity: Identity
    sid: str
    auth_time: int


@dataclass(frozen=True, slots=True)
class Session:
    sid: str
    sub: str
    client_id: str
    redirect_uri: str


@dataclass(frozen=True, slots=True)
class ClientAuth:
    """Who a token request says it comes from, and how (RFC 6749 §2.3.1)."""

    client_id: str
    secret: str | None
    method: str  # client_secret_basic, client_secret_post or none


@dataclass(frozen=True, slots=True)
class LoginSettings:
    token_lifetime: int = 300
    refresh_lifetime: int = 86400
    client_secret: str | None = None  # set: every token request authenticates with it
    max_entries: int = MAX_ENTRIES


def is_absolute_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a malformed port
    except ValueError:
        return False
    host = parts.netloc.rpartition(":")[0] if parts.port is not None else parts.netloc
    return (
        parts.scheme in ("http", "https")
        and bool(_HOST.fullmatch(host))
        and not parts.fragment  # RFC 6749 §3.1.2: "MUST NOT include a fragment component"
        and "@" not in parts.netloc
    )


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def with_params(url: str, params: Mapping[str, str | None]) -> str:
    """`url` with `params` added to its own query (RFC 6749 §3.1.2: the query "MUST be retained")."""
    parts = urlsplit(url)
    added = urlencode({k: v for k, v in params.items() if v is not None})
    query = f"{parts.query}&{added}" if parts.query and added else parts.query or added
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def parse_authorize(params: Mapping[str, str], repeated: Collection[str] = ()) -> AuthorizeRequest:
    """Validate an authorization request; the client and redirect URI first, as errors about them
    must not be redirected (RFC 6749 §4.1.2.1). `repeated`: parameters sent more than once."""
    client_id = params.get("client_id", "")
    redirect_uri = params.get("redirect_uri", "")
    if not client_id or len(client_id) > MAX_FIELD or "client_id" in repeated:
        raise AuthorizeError(
            "invalid_request", "client_id: missing, repeated or too long", redirectable=False
        )
    if not is_absolute_http_url(redirect_uri) or "redirect_uri" in repeated:
        raise AuthorizeError(
            "invalid_request", "redirect_uri: one absolute http(s) URL is required", redirectable=False
        )
    if repeated:
        # RFC 6749 §3.1: request parameters "MUST NOT be included more than once".
        raise AuthorizeError("invalid_request", f"parameter repeated: {sorted(repeated)[0]}")
    if params.get("response_type") != "code":
        raise AuthorizeError("unsupported_response_type", "response_type must be code")
    challenge = params.get("code_challenge", "")
    if not _CHALLENGE.fullmatch(challenge):
        raise AuthorizeError("invalid_request", "code_challenge: 43 to 128 base64url characters (PKCE)")
    if params.get("code_challenge_method") != "S256":
        raise AuthorizeError("invalid_request", "code_challenge_method must be S256")
    scopes = tuple(dict.fromkeys(params.get("scope", "").split()))
    if len(scopes) > 50 or not all(_SCOPE_TOKEN.fullmatch(s) and len(s) <= MAX_FIELD for s in scopes):
        raise AuthorizeError("invalid_scope", "scope: space-separated scope tokens (RFC 6749 §3.3)")
    return AuthorizeRequest(
        client_id, redirect_uri, scopes, params.get("state"), params.get("nonce"), challenge
    )


def s256(verifier: str) -> str:
    """RFC 7636 §4.2: BASE64URL-ENCODE(SHA256(ASCII(code_verifier)))."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def client_auth(authorization: str | None, form: Mapping[str, str]) -> ClientAuth:
    """The client of a token request: HTTP Basic, or client_id (+ client_secret) in the body."""
    body_id, body_secret = form.get("client_id"), form.get("client_secret")
    if authorization is None:
        if not body_id:
            raise TokenError("invalid_client", "no client authentication and no client_id")
        method = "none" if body_secret is None else "client_secret_post"
        return ClientAuth(body_id, body_secret, method)
    if body_secret is not None:
        # RFC 6749 §2.3: "MUST NOT use more than one authentication method in each request".
        raise TokenError("invalid_request", "client authentication both by Basic and in the body")
    client_id, secret = _basic(authorization)
    if body_id is not None and body_id != client_id:
        raise TokenError("invalid_request", "client_id differs from the Basic credentials")
    return ClientAuth(client_id, secret, "client_secret_basic")


def _basic(authorization: str) -> tuple[str, str]:
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "basic":
        raise TokenError("invalid_client", "only Basic client authentication is supported")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except ValueError:
        raise TokenError("invalid_client", "malformed Basic credentials") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep or not client_id:
        raise TokenError("invalid_client", "malformed Basic credentials")
    # RFC 6749 §2.3.1: both are application/x-www-form-urlencoded before they are joined.
    return unquote_plus(client_id), unquote_plus(secret)


def check_client(auth: ClientAuth, configured_secret: str | None) -> None:
    """With a configured secret every client is confidential and must present it; without, every
    client is public and a secret, if sent, is ignored."""
    if configured_secret is None:
        return
    if auth.secret is None or not hmac.compare_digest(auth.secret.encode(), configured_secret.encode()):
        raise TokenError("invalid_client", "client authentication failed")


@dataclass
class LoginState:
    """Pending requests, codes, refresh tokens and sessions, all in memory and all bounded."""

    settings: LoginSettings = field(default_factory=LoginSettings)
    clock: Clock = time.time
    _pending: BoundedStore[str, AuthorizeRequest] = field(init=False)
    _codes: BoundedStore[str, Grant] = field(init=False)
    _used_codes: BoundedStore[str, str] = field(init=False)  # code -> sid, for RFC 6749 §4.1.2
    _refresh: BoundedStore[str, Grant] = field(init=False)
    _used_refresh: BoundedStore[str, str] = field(init=False)  # token -> sid, for reuse detection
    _sessions: BoundedStore[str, Session] = field(init=False)

    def __post_init__(self) -> None:
        limit = self.settings.max_entries
        self._pending = BoundedStore(self.clock, limit)
        self._codes = BoundedStore(self.clock, limit)
        self._used_codes = BoundedStore(self.clock, limit)
        self._refresh = BoundedStore(self.clock, limit)
        self._used_refresh = BoundedStore(self.clock, limit)
        self._sessions = BoundedStore(self.clock, limit)

    def now(self) -> int:
        return int(self.clock())

    def begin(self, request: AuthorizeRequest) -> str:
        """Keep the request server-side; the login form carries only this id, so it cannot alter it."""
        pending_id = secrets.token_urlsafe(24)
        self._pending.put(pending_id, request, PENDING_TTL)
        return pending_id

    def pending(self, pending_id: str) -> AuthorizeRequest | None:
        return self._pending.get(pending_id)

    def deny(self, pending_id: str) -> AuthorizeRequest | None:
        return self._pending.pop(pending_id)

    def approve(self, pending_id: str, identity: Identity, scopes: tuple[str, ...]) -> tuple[str, str] | None:
        """A single-use code for the sign-in, and the redirect URI it goes to; None: no such request."""
        request = self._pending.pop(pending_id)
        if request is None:
            return None
        granted = tuple(s for s in request.scopes if s in scopes)
        grant = Grant(
            request.client_id, request.redirect_uri, granted, request.nonce, request.code_challenge,
            identity, secrets.token_urlsafe(16), self.now(),
        )  # fmt: skip
        session = Session(grant.sid, identity.sub, request.client_id, request.redirect_uri)
        self._sessions.put(grant.sid, session, self.settings.refresh_lifetime)
        code = secrets.token_urlsafe(32)
        self._codes.put(code, grant, CODE_TTL)
        return code, request.redirect_uri

    def redeem_code(self, code: str, client_id: str, redirect_uri: str | None, verifier: str | None) -> Grant:
        """RFC 6749 §4.1.3 and RFC 7636 §4.6; a code is spent by its first presentation, right or wrong."""
        grant = self._codes.pop(code)
        if grant is None:
            sid = self._used_codes.get(code)
            if sid is not None:
                # RFC 6749 §4.1.2: a code used twice "SHOULD revoke ... all tokens previously issued".
                self.end_session(sid)
                raise TokenError("invalid_grant", "the code was already used; its tokens are revoked")
            raise TokenError("invalid_grant", "unknown or expired code")
        self._used_codes.put(code, grant.sid, CODE_TTL)
        if grant.client_id != client_id:
            raise TokenError("invalid_grant", "the code was issued to another client")
        if redirect_uri != grant.redirect_uri:
            raise TokenError("invalid_grant", "redirect_uri differs from the authorization request's")
        if verifier is None or not _VERIFIER.fullmatch(verifier):
            raise TokenError("invalid_grant", "code_verifier: 43 to 128 unreserved characters (RFC 7636)")
        if not hmac.compare_digest(s256(verifier), grant.code_challenge):
            raise TokenError("invalid_grant", "code_verifier does not match the code_challenge")
        return grant

    def issue_refresh(self, grant: Grant) -> str | None:
        """An opaque refresh token, only when offline_access was granted (OIDC Core §11)."""
        if OFFLINE_ACCESS not in grant.scopes or self._sessions.get(grant.sid) is None:
            return None
        token = secrets.token_urlsafe(32)
        self._refresh.put(token, grant, self.settings.refresh_lifetime)
        return token

    def rotate_refresh(self, token: str, client_id: str, scope: str | None) -> Grant:
        """Spend a refresh token (RFC 9700 §4.14.2: rotation); presenting a spent one revokes its whole
        family, the sign-in session, as a thief and the client cannot be told apart."""
        grant = self._refresh.pop(token)
        if grant is None:
            sid = self._used_refresh.get(token)
            if sid is not None:
                self.end_session(sid)
                raise TokenError(
                    "invalid_grant", "the refresh token was already used; its session is revoked"
                )
            raise TokenError("invalid_grant", "unknown, revoked or expired refresh token")
        self._used_refresh.put(token, grant.sid, self.settings.refresh_lifetime)
        if grant.client_id != client_id:
            raise TokenError("invalid_grant", "the refresh token was issued to another client")
        if scope is None:
            return replace(grant, nonce=None)
        narrowed = tuple(dict.fromkeys(scope.split()))
        if not set(narrowed) <= set(grant.scopes):
            # RFC 6749 §6: the scope "MUST NOT include any scope not originally granted".
            raise TokenError("invalid_scope", "scope exceeds what was granted")
        return replace(grant, nonce=None, scopes=narrowed)

    def session(self, sid: str) -> Session | None:
        return self._sessions.get(sid)

    def end_session(self, sid: str) -> Session | None:
        """Revoke the session's refresh tokens; the session, if it was still there."""
        self._refresh.remove_where(lambda grant: grant.sid == sid)
        self._codes.remove_where(lambda grant: grant.sid == sid)
        return self._sessions.pop(sid)

    def revoke(self, sub: str | None) -> int:
        """The dev-only test hook: drop refresh tokens of `sub` (None: everyone's); how many went."""
        return self._refresh.remove_where(lambda grant: sub is None or grant.identity.sub == sub)

    def sizes(self) -> dict[str, int]:
        return {
            "pending": len(self._pending),
            "codes": len(self._codes),
            "refresh_tokens": len(self._refresh),
            "sessions": len(self._sessions),
        }


def access_claims(grant: Grant, *, issuer: str, audience: str, now: int, lifetime: int) -> dict[str, object]:
    return {
        "iss": issuer,
        "sub": grant.identity.sub,
        "aud": audience,
        "scope": " ".join(grant.scopes),
        "groups": list(grant.identity.groups),
        "email": grant.identity.email,
        "client_id": grant.client_id,
        "iat": now,
        "exp": now + lifetime,
        "jti": secrets.token_urlsafe(12),
    }


def id_claims(grant: Grant, *, issuer: str, now: int, lifetime: int) -> dict[str, object]:
    """OIDC Core §2; nonce only when the authorization request had one (and never on refresh, §12.2)."""
    claims: dict[str, object] = {
        "iss": issuer,
        "sub": grant.identity.sub,
        "aud": grant.client_id,
        "groups": list(grant.identity.groups),
        "email": grant.identity.email,
        "name": grant.identity.sub,
        "sid": grant.sid,
        "auth_time": grant.auth_time,
        "iat": now,
        "exp": now + lifetime,
    }
    if grant.nonce is not None:
        claims["nonce"] = grant.nonce
    return claims


def logout_claims(session: Session, *, issuer: str, now: int) -> dict[str, object]:
    """OIDC Back-Channel Logout 1.0 §2.4: no nonce, the logout event, a short life."""
    return {
        "iss": issuer,
        "aud": session.client_id,
        "iat": now,
        "exp": now + 120,
        "jti": secrets.token_urlsafe(12),
        "sid": session.sid,
        "sub": session.sub,
        "events": {BACKCHANNEL_EVENT: {}},
    }
