"""The pieces of starting a browser sign-in that need no I/O (OIDC authorization code with PKCE).

- :func:`is_navigation`: only a browser navigating gets sent to sign in; an XHR, a fetch, an API
  client or a non-GET gets the 401 it gets today (a redirect would break it, not help it).
- :func:`return_path`: where to send the browser back after the callback. It is the path (and
  query) of the request that needed a sign-in, and only ever a path on the same host: anything a
  browser could read as another host (``//evil.example``, ``/\\evil.example``, a tab or newline the
  URL parser drops, a scheme) becomes ``/``. So the flow is no open redirect.
- :func:`new_transaction`: the state, nonce and PKCE verifier of one sign-in (fresh random values),
  and :func:`authorization_url`: the redirect to the IdP's ``authorization_endpoint``.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

STATE_BYTES = 24
NONCE_BYTES = 24
VERIFIER_BYTES = 32  # 43 characters of base64url: RFC 7636 §4.1 wants 43 to 128
MAX_RETURN_CHARS = 2048


def is_navigation(method: str, headers: Mapping[str, str]) -> bool:
    """A browser navigating to the page (not a script fetching it). ``Sec-Fetch-Mode``, which
    every current browser sends, decides when present; otherwise an ``Accept`` naming HTML."""
    if method.upper() not in ("GET", "HEAD"):
        return False
    mode = headers.get("sec-fetch-mode")
    if mode is not None:
        return mode.strip().lower() == "navigate"
    return "text/html" in headers.get("accept", "").lower()


def return_path(path: str, query: str = "") -> str:
    """The same-host path to return to after signing in: ``path`` (and ``query``) when a browser
    can only read it as a path on this host, else ``/``."""
    target = f"{path}?{query}" if query else path
    if len(target) > MAX_RETURN_CHARS or not target.startswith("/"):
        return "/"
    if len(target) > 1 and target[1] in "/\\":
        return "/"  # //host or /\host: a browser reads another host
    if any(ord(ch) <= 0x20 or ord(ch) == 0x7F or ch == "\\" for ch in target) or not target.isascii():
        return "/"  # the URL parser drops tabs and newlines, and reads \ as /: judged after that, too risky
    return target


@dataclass(frozen=True, slots=True)
class Transaction:
    """One sign-in under way: what the transaction cookie carries (sealed) and the IdP sees."""

    state: str
    nonce: str
    verifier: str  # the PKCE code_verifier (secret until the token request)
    return_to: str

    @property
    def challenge(self) -> str:
        """The PKCE code_challenge (S256) for ``verifier``."""
        return _b64(hashlib.sha256(self.verifier.encode("ascii")).digest())


def new_transaction(return_to: str) -> Transaction:
    return Transaction(
        state=_b64(secrets.token_bytes(STATE_BYTES)),
        nonce=_b64(secrets.token_bytes(NONCE_BYTES)),
        verifier=_b64(secrets.token_bytes(VERIFIER_BYTES)),
        return_to=return_path(return_to),
    )


def authorization_url(
    endpoint: str, *, client_id: str, redirect_uri: str, scopes: Sequence[str], transaction: Transaction
) -> str:
    """The IdP's authorization endpoint with the code-flow parameters added (parameters the
    endpoint URL already has, an Entra ID policy say, are kept; ours replace any of the same name)."""
    parts = urlsplit(endpoint)
    ours = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": " ".join(scopes),
        "state": transaction.state,
        "nonce": transaction.nonce,
        "code_challenge": transaction.challenge,
        "code_challenge_method": "S256",
    }
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in ours]
    return urlunsplit(parts._replace(query=urlencode([*kept, *ours.items()])))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
