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
import hmac
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote_plus, urlencode, urlsplit, urlunsplit

STATE_BYTES = 24
NONCE_BYTES = 24
VERIFIER_BYTES = 32  # 43 characters of base64url: RFC 7636 §4.1 wants 43 to 128
# A longer path returns to "/": each transaction cookie carries its path, and a page elsewhere
# can start sign-ins (top-level navigations set Lax cookies): kept small, and few of them.
MAX_RETURN_CHARS = 512
MAX_TRANSACTIONS = 4  # sign-ins under way in one browser (tabs); starting one more ends them
TRANSACTION_SECONDS = 600  # a transaction cookie's Max-Age: time to sign in at the IdP


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
    provider: str = ""  # the provider signing in (a rule's `login`)
    redirect_uri: str = ""  # as sent to the authorization endpoint: the token request repeats it

    @property
    def challenge(self) -> str:
        """The PKCE code_challenge (S256) for ``verifier``."""
        return _b64(hashlib.sha256(self.verifier.encode("ascii")).digest())


def new_transaction(return_to: str, *, provider: str = "", redirect_uri: str = "") -> Transaction:
    return Transaction(
        state=_b64(secrets.token_bytes(STATE_BYTES)),
        nonce=_b64(secrets.token_bytes(NONCE_BYTES)),
        verifier=_b64(secrets.token_bytes(VERIFIER_BYTES)),
        return_to=return_path(return_to),
        provider=provider,
        redirect_uri=redirect_uri,
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
    # The endpoint's own parameters stay exactly as written, but for any of ours.
    kept = [p for p in parts.query.split("&") if p and unquote_plus(p.partition("=")[0]) not in ours]
    return urlunsplit(parts._replace(query="&".join([*kept, urlencode(list(ours.items()))])))


def _same(given: str, expected: str) -> bool:
    """Constant-time comparison (a state is compared to the one its cookie holds)."""
    return bool(given) and hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# ---- the transaction cookie ----


def transactions_to_expire(session_cookie: str, present: Mapping[str, str]) -> list[str]:
    """Starting a sign-in: the transaction cookies to end first. None while fewer than
    ``MAX_TRANSACTIONS`` are under way; all of them once that many are (their callbacks then
    answer "start again"), so a browser never holds more than that many plus the new one."""
    prefix = f"{session_cookie}-signin-"
    names = sorted(name for name in present if name.startswith(prefix))
    return names if len(names) >= MAX_TRANSACTIONS else []


def transaction_cookie(session_cookie: str, state: str) -> str:
    """The cookie one sign-in's transaction travels in, named after its state: two sign-ins in
    one browser (two tabs) keep two cookies, and the callback finds its own by the state."""
    return (
        f"{session_cookie}-signin-{_b64(hashlib.sha256(state.encode('utf-8', 'surrogatepass')).digest()[:9])}"
    )


def to_data(transaction: Transaction) -> dict[str, str]:
    """What the sealed transaction cookie holds."""
    return {
        "s": transaction.state,
        "n": transaction.nonce,
        "v": transaction.verifier,
        "r": transaction.return_to,
        "p": transaction.provider,
        "u": transaction.redirect_uri,
    }


def from_data(data: object) -> Transaction | None:
    """The transaction a sealed cookie held, None if it is not one."""
    if not isinstance(data, dict) or set(data) != {"s", "n", "v", "r", "p", "u"}:
        return None
    if not all(isinstance(data[k], str) and data[k] for k in "snvr") or not all(
        isinstance(data[k], str) for k in "pu"
    ):
        return None
    return Transaction(
        state=data["s"],
        nonce=data["n"],
        verifier=data["v"],
        return_to=return_path(data["r"]),
        provider=data["p"],
        redirect_uri=data["u"],
    )


# ---- the callback ----

MAX_CODE_CHARS = 4096


@dataclass(frozen=True, slots=True)
class CallbackRefused:
    """The callback cannot go on: answered with this status (a page, never a redirect)."""

    status: int
    code: str
    description: str


@dataclass(frozen=True, slots=True)
class CallbackCode:
    """The callback carries an authorization code for this transaction: exchange it."""

    code: str
    transaction: Transaction


def callback_state(query: str) -> str | None:
    """The one ``state`` of a callback's query (to find its transaction cookie), None if not one."""
    states = parse_qs(query, keep_blank_values=True).get("state", [])
    return states[0] if len(states) == 1 and states[0] else None


def read_callback(
    query: str, transaction: Transaction | None, *, issuer: str, iss_required: bool
) -> CallbackCode | CallbackRefused:
    """Judge ``GET callback_path?query`` (with ``transaction`` opened from the cookie
    :func:`transaction_cookie` names for its ``state``). Blank values count: ``error=`` is an
    error and ``iss=`` a wrong issuer.

    The state is judged first: an answer for no sign-in of this browser (forged, replayed after
    its cookie went, another browser's) is 400 whatever else it says. Then the IdP's own error
    (403: the user or the IdP said no; never a redirect, which would loop), the RFC 9207 ``iss``
    (it must name the provider's issuer when sent, and be sent when the IdP says it sends it:
    the mix-up defence), and exactly one code.
    """
    params = parse_qs(query, keep_blank_values=True)
    states = params.get("state", ())
    if len(states) != 1 or transaction is None or not _same(states[0], transaction.state):
        return CallbackRefused(400, "invalid_state", "this sign-in is unknown or has expired: start again")
    if "error" in params:
        error = params["error"][0] if len(params["error"]) == 1 else ""
        shown = (
            error if error.isascii() and error.replace("_", "").isalpha() and len(error) <= 64 else "error"
        )
        return CallbackRefused(403, "sign_in_refused", f"the identity provider refused the sign-in ({shown})")
    issued_by = params.get("iss", ())
    if len(issued_by) > 1 or (issued_by and issued_by[0] != issuer) or (not issued_by and iss_required):
        return CallbackRefused(400, "wrong_issuer", "the answer does not come from this provider")
    codes = params.get("code", ())
    if len(codes) != 1 or not codes[0] or len(codes[0]) > MAX_CODE_CHARS:
        return CallbackRefused(400, "invalid_request", "the answer carries no single authorization code")
    return CallbackCode(codes[0], transaction)
