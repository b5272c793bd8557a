"""A test OIDC issuer: signing keys, OIDC discovery and a JWKS over real HTTP on 127.0.0.1.

The issuer identifier is its base URL WITHOUT a trailing slash, e.g. `http://127.0.0.1:41234`.
The discovery document at `{url}/.well-known/openid-configuration` states exactly that string
as `issuer` (OIDC Discovery 1.0 §4.3: the `issuer` value must be identical to the URL the
configuration was fetched from, minus the well-known suffix), and tokens minted here carry it as
`iss`. The JWKS lives at `{url}/jwks.json` and holds public keys only.

Key lifecycle for rotation tests: `add_key()` publishes a new key (optionally making it the
signing default), `rotate()` adds a fresh RSA key and signs with it from then on while the old
key stays published, `remove_key(kid)` unpublishes a key. Requests are counted per path so tests
can assert how often the server fetched discovery or keys (`wait_for_count` waits for a fetch).

Every answer is under the test's control, per path: `fail_path` (an HTTP error status),
`override` (any status, body and content type: HTML, not JSON, too large, ...), `serve_html`,
`serve_empty_keys` (a valid but empty JWKS), `delay_path` (the answer starts only after a
delay; other requests are served meanwhile, and `stop()` wakes every delayed handler at once),
and `cache_control` (the `Cache-Control` header sent with the JWKS).

Token introspection (RFC 7662) at `{url}/introspect` (`introspection_endpoint`, also in
discovery): `issue_opaque()` hands out a random opaque token and remembers its claims,
`revoke_opaque()` forgets it. The endpoint answers only the client set by
`set_introspection_client()` (client_secret_basic or client_secret_post; 401 `invalid_client`
to everyone until one is set): `{"active": true, **claims}` for a known unexpired token, else
`{"active": false}`. Its requests are counted, failed, overridden and delayed like any path.
`introspect_as_active(jwt)` makes the endpoint call a JWT active (with its own claims) until
`revoke_opaque(jwt)`; any other JWT is inactive there.

A multi-tenant IdP (Entra's `common` endpoint): `publish_discovery(path, issuer=...)` serves a
second discovery document at `{url}{path}/.well-known/openid-configuration` that names `issuer`
(e.g. the template `{url}/{tenantid}/v2.0`) with this issuer's JWKS and introspection endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import itertools
import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import parse_qs, unquote_plus

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from ext_authz.jws import b64url as b64url
from tests.support.httpserver import LoopbackHTTPServer

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/jwks.json"
INTROSPECTION_PATH = "/introspect"
DEFAULT_AUDIENCE = "api"
DEFAULT_SUBJECT = "alice"

_kid_counter = itertools.count(1)


def b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _json_segment(value: Mapping[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode("utf-8"))


def generate_key(alg: str) -> PrivateKey:
    """A fresh private key for one of RS256, ES256 or EdDSA (Ed25519)."""
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unsupported test key algorithm: {alg}")


def public_jwk(public: PublicKey, *, kid: str, alg: str) -> dict[str, Any]:
    """The public JWK (RFC 7517) for `public`, with kid, use=sig and alg."""
    jwk: dict[str, Any]
    if isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    # RFC 7517 §4.3: "use" and "key_ops" should not both be present; PyJWT adds key_ops.
    jwk.pop("key_ops", None)
    jwk.update({"kid": kid, "use": "sig", "alg": alg})
    return jwk


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    alg: str
    private_key: PrivateKey

    @property
    def public_key(self) -> PublicKey:
        return self.private_key.public_key()

    def jwk(self) -> dict[str, Any]:
        return public_jwk(self.public_key, kid=self.kid, alg=self.alg)


def unsigned_token(payload: Mapping[str, Any], *, headers: Mapping[str, Any] | None = None) -> str:
    """An `alg: none` JWT (RFC 7519 §6): header {"alg":"none","typ":"JWT"}, empty signature."""
    header: dict[str, Any] = {"alg": "none", "typ": "JWT"}
    if headers:
        header.update(headers)
    return f"{_json_segment(header)}.{_json_segment(payload)}."


def hmac_token(header: Mapping[str, Any], payload: Mapping[str, Any], secret: bytes) -> str:
    """A JWT signed with HMAC-SHA256 under `secret`, built by hand.

    PyJWT refuses to use a PEM public key as an HMAC secret, which is exactly the algorithm
    confusion attack a verifier must reject (a server that takes `alg` from the token and feeds
    it the RSA public key would accept this).
    """
    signing_input = f"{_json_segment(header)}.{_json_segment(payload)}"
    signature = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def decode_unverified_payload(token: str) -> dict[str, Any]:
    payload = json.loads(b64url_decode(token.split(".")[1]))
    assert isinstance(payload, dict)
    return payload


def tamper_signature(token: str) -> str:
    """Flip one character in the middle of the signature segment (never the last one, whose
    low bits may be ignored by base64 decoders)."""
    head, payload, signature = token.split(".")
    middle = len(signature) // 2
    flipped = "A" if signature[middle] != "A" else "B"
    return f"{head}.{payload}.{signature[:middle]}{flipped}{signature[middle + 1 :]}"


class TestIssuer(LoopbackHTTPServer):
    """An OIDC issuer on 127.0.0.1 with an ephemeral port, for tests only.

    Its issuer identifier is its ``url``: ``http://127.0.0.1:PORT``, no trailing slash.
    """

    __test__ = False  # not a pytest test class despite its name

    name = "test-issuer"

    def __init__(self, *, audience: str = DEFAULT_AUDIENCE, alg: str = "RS256") -> None:
        super().__init__()
        self.audience = audience
        self._lock = threading.Lock()
        self._keys: dict[str, SigningKey] = {}
        self._default_kid = self.add_key(alg)
        self._counts: Counter[str] = Counter()
        self._counted = threading.Condition(self._lock)  # notified on every request
        self._status_overrides: dict[str, int] = {}
        self._overrides: dict[str, Answer] = {}
        self._delays: dict[str, float] = {}
        self._empty_keys = False
        self._cache_control: str | None = None
        # Set by stop(): a delayed handler sleeps on it and gives up at once when it is set.
        self._stopping = threading.Event()
        self._dropping = threading.Event()  # set by stop(drop_connections=True)
        self._introspection_client: tuple[str, str] | None = None
        self._opaque: dict[str, dict[str, Any]] = {}  # token -> its claims
        self._extra_discovery: dict[str, str] = {}  # discovery path -> the issuer it names

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        return _make_handler(self)

    def start(self) -> Self:
        self._stopping.clear()
        self._dropping.clear()
        return super().start()

    def stop(self, *, drop_connections: bool = False) -> None:
        """Stop listening. Connections a client keeps alive are still served on their handler
        threads unless `drop_connections`: then each is closed at its next request, unanswered
        (an IdP that is really gone, for clients that pool connections)."""
        if drop_connections:
            self._dropping.set()
        self._stopping.set()  # first: no handler may still be asleep in a delay
        super().stop()

    @property
    def jwks_uri(self) -> str:
        return f"{self.url}{JWKS_PATH}"

    introspection_path = INTROSPECTION_PATH

    @property
    def introspection_endpoint(self) -> str:
        return f"{self.url}{INTROSPECTION_PATH}"

    # ---- keys ------------------------------------------------------------------------------

    @property
    def default_kid(self) -> str:
        return self._default_kid

    @property
    def kids(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._keys)

    def key(self, kid: str | None = None) -> SigningKey:
        with self._lock:
            return self._keys[kid or self._default_kid]

    def add_key(
        self,
        alg: str = "RS256",
        *,
        kid: str | None = None,
        private_key: PrivateKey | None = None,
        make_default: bool = False,
    ) -> str:
        """Publish a new key in the JWKS; return its kid."""
        if kid is None:
            kid = f"{alg.lower()}-{next(_kid_counter)}"
        signing = SigningKey(kid=kid, alg=alg, private_key=private_key or generate_key(alg))
        with self._lock:
            self._keys[kid] = signing
            if make_default:
                self._default_kid = kid
        return kid

    def rotate(self, alg: str = "RS256") -> str:
        """Add a fresh key and sign with it from now on; the previous key stays published."""
        return self.add_key(alg, make_default=True)

    def remove_key(self, kid: str) -> None:
        with self._lock:
            del self._keys[kid]
            if kid == self._default_kid and self._keys:
                self._default_kid = next(reversed(self._keys))

    def public_pem(self, kid: str | None = None) -> bytes:
        """The public key as SubjectPublicKeyInfo PEM (for the HS256-with-public-key attack)."""
        return self.key(kid).public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwks(self) -> dict[str, Any]:
        with self._lock:
            keys = list(self._keys.values())
        return {"keys": [k.jwk() for k in keys]}

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.url,
            "jwks_uri": self.jwks_uri,
            "id_token_signing_alg_values_supported": sorted({k.alg for k in self._snapshot()}),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "introspection_endpoint": self.introspection_endpoint,
        }

    def publish_discovery(self, base_path: str, *, issuer: str) -> str:
        """Serve a discovery document at `{url}{base_path}` + the well-known path, naming `issuer`
        (verbatim: a template such as `.../{tenantid}/v2.0` too); return `{url}{base_path}`."""
        if not base_path.startswith("/") or base_path.endswith("/"):
            raise ValueError("base_path starts with '/' and does not end with one")
        with self._lock:
            self._extra_discovery[base_path + DISCOVERY_PATH] = issuer
        return f"{self.url}{base_path}"

    def _snapshot(self) -> list[SigningKey]:
        with self._lock:
            return list(self._keys.values())

    # ---- tokens ----------------------------------------------------------------------------

    def claims(self, claims: Mapping[str, Any] | None = None, *, ttl: int = 300) -> dict[str, Any]:
        """Default claims (iss, aud, sub, iat, exp) overridden by `claims`.

        A key mapped to None in `claims` is removed, e.g. `{"aud": None}` for a token without aud.
        """
        now = int(time.time())
        merged: dict[str, Any] = {
            "iss": self.url,
            "aud": self.audience,
            "sub": DEFAULT_SUBJECT,
            "iat": now,
            "exp": now + ttl,
        }
        for name, value in (claims or {}).items():
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = value
        return merged

    def mint(
        self,
        claims: Mapping[str, Any] | None = None,
        *,
        kid: str | None = None,
        alg: str | None = None,
        headers: Mapping[str, Any] | None = None,
        ttl: int = 300,
        key: PrivateKey | None = None,
    ) -> str:
        """A signed JWT. `ttl` may be negative for an already expired token.

        `kid` picks the published key (and is put in the header); `key` signs with a different
        private key while still claiming `kid`, i.e. a forged signature for a known kid.
        """
        signing = self.key(kid)
        payload = self.claims(claims, ttl=ttl)
        header: dict[str, Any] = {"kid": signing.kid, "typ": "JWT"}
        if headers:
            header.update(headers)
        return jwt.encode(payload, key or signing.private_key, algorithm=alg or signing.alg, headers=header)

    def mint_unsigned(self, claims: Mapping[str, Any] | None = None, *, ttl: int = 300) -> str:
        return unsigned_token(self.claims(claims, ttl=ttl))

    # ---- opaque tokens and introspection (RFC 7662) -----------------------------------------

    def set_introspection_client(self, client_id: str | None, secret: str | None = None) -> None:
        """The one client the introspection endpoint answers (None: nobody, the default)."""
        with self._lock:
            self._introspection_client = None if client_id is None else (client_id, secret or "")

    def issue_opaque(self, claims: Mapping[str, Any] | None = None, *, ttl: int = 300) -> str:
        """A random opaque token (no dots: never mistaken for a JWT) whose introspection answer
        carries `claims` over the defaults (iss, aud, sub, iat, exp, scope "read", client_id);
        a key mapped to None is left out. `ttl` may be negative for an expired token."""
        defaults: dict[str, Any] = {"scope": "read", "client_id": "test-client"}
        merged = self.claims({**defaults, **(claims or {})}, ttl=ttl)
        token = secrets.token_urlsafe(32)  # the URL-safe alphabet has no "."
        with self._lock:
            self._opaque[token] = merged
        return token

    def introspect_as_active(self, token: str) -> None:
        """Answer `token` (a JWT minted here) as active, with its own claims, until revoked."""
        claims = decode_unverified_payload(token)
        with self._lock:
            self._opaque[token] = claims

    def revoke_opaque(self, token: str) -> None:
        with self._lock:
            self._opaque.pop(token, None)

    def _introspection(self, headers: Mapping[str, str], body: bytes) -> Answer:
        form = {name: values[0] for name, values in parse_qs(body.decode("utf-8", "replace")).items()}
        with self._lock:
            client = self._introspection_client
            claims = self._opaque.get(form.get("token", ""))
        if client is None or _client_of(headers, form) != client:
            return _json_answer(401, {"error": "invalid_client"}, (("WWW-Authenticate", "Basic"),))
        if claims is None or (isinstance(claims.get("exp"), int) and claims["exp"] <= time.time()):
            return _json_answer(200, {"active": False})
        return _json_answer(200, {"active": True, **claims})

    # ---- HTTP ------------------------------------------------------------------------------

    def request_count(self, path: str) -> int:
        with self._lock:
            return self._counts[path]

    @property
    def request_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()

    def wait_for_count(self, path: str, n: int, timeout: float) -> int:
        """Wait until `path` has been requested at least `n` times; return the count.

        Raises TimeoutError (with the count reached) when the deadline passes first. A request is
        counted when it arrives, and its answer is decided at that moment, so once this returns
        the answer to the n-th request is fixed even if it has not been sent yet.
        """
        deadline = time.monotonic() + timeout
        with self._counted:
            while self._counts[path] < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{path} requested {self._counts[path]} times, not {n}, within {timeout:g}s"
                    )
                self._counted.wait(remaining)
            return self._counts[path]

    def fail_path(self, path: str, status: int | None) -> None:
        """Answer `path` with `status` (e.g. 500) until called again with None."""
        with self._lock:
            if status is None:
                self._status_overrides.pop(path, None)
            else:
                self._status_overrides[path] = status

    def override(
        self,
        path: str,
        status: int | None,
        body: bytes = b"",
        content_type: str = "application/json",
    ) -> None:
        """Answer `path` with exactly this status, body and content type until called with None.

        `fail_path` takes precedence over an override of the same path.
        """
        with self._lock:
            if status is None:
                self._overrides.pop(path, None)
            else:
                self._overrides[path] = Answer(status, body, content_type)

    def serve_html(self, path: str, on: bool) -> None:
        """A 200 with an HTML page instead of JSON (a login page or proxy error page, say)."""
        self.override(path, 200 if on else None, HTML_PAGE, "text/html; charset=utf-8")

    def serve_empty_keys(self, on: bool) -> None:
        """Publish a well-formed JWKS with no keys at all (`{"keys": []}`) while `on`."""
        with self._lock:
            self._empty_keys = on

    def delay_path(self, path: str, seconds: float | None) -> None:
        """Start answering `path` only after `seconds` (None: no delay) from its arrival.

        The delay is per request, on that request's own thread: other requests, to this or any
        path, are served meanwhile. Stopping the issuer cuts every pending delay short (the
        connection is then closed without an answer).
        """
        with self._lock:
            if seconds is None:
                self._delays.pop(path, None)
            else:
                self._delays[path] = seconds

    @property
    def cache_control(self) -> str | None:
        """The `Cache-Control` header value sent with every 200 JWKS answer (None: no header)."""
        with self._lock:
            return self._cache_control

    @cache_control.setter
    def cache_control(self, value: str | None) -> None:
        with self._lock:
            self._cache_control = value

    def heal(self) -> None:
        """Undo every injected failure, override, delay and the empty key set."""
        with self._lock:
            self._status_overrides.clear()
            self._overrides.clear()
            self._delays.clear()
            self._empty_keys = False

    def _answer(self, path: str, post: tuple[Mapping[str, str], bytes] | None = None) -> tuple[Answer, float]:
        """Count the request and decide its answer (and the delay before it), atomically.

        `post`: a POST's headers and body (the introspection endpoint reads them)."""
        with self._lock:
            self._counts[path] += 1
            self._counted.notify_all()
            status = self._status_overrides.get(path)
            override = self._overrides.get(path)
            delay = self._delays.get(path, 0.0)
            empty_keys = self._empty_keys
            cache_control = self._cache_control
            extra_issuer = self._extra_discovery.get(path)
        if status is not None:
            return _json_answer(status, {"error": "injected failure"}), delay
        if override is not None:
            return override, delay
        if path == DISCOVERY_PATH:
            return _json_answer(200, self.discovery()), delay
        if extra_issuer is not None:
            return _json_answer(200, {**self.discovery(), "issuer": extra_issuer}), delay
        if path == JWKS_PATH:
            document = {"keys": []} if empty_keys else self.jwks()
            headers = () if cache_control is None else (("Cache-Control", cache_control),)
            return _json_answer(200, document, headers), delay
        if path == INTROSPECTION_PATH and post is not None:
            return self._introspection(*post), delay
        return _json_answer(404, {"error": "not found"}), delay

    def _sleep(self, seconds: float) -> bool:
        """Sleep for a delayed answer; False if the issuer is stopping (do not answer)."""
        return not self._stopping.wait(seconds)


HTML_PAGE = b"<!doctype html><html><head><title>Sign in</title></head><body>Sign in</body></html>\n"


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def _json_answer(status: int, document: object, headers: tuple[tuple[str, str], ...] = ()) -> Answer:
    return Answer(status, json.dumps(document).encode("utf-8"), "application/json", headers)


def _client_of(headers: Mapping[str, str], form: Mapping[str, str]) -> tuple[str, str] | None:
    """The client credentials a request presents: client_secret_basic (RFC 6749 §2.3.1: each
    part form-urlencoded, then Base64) or client_secret_post; None for neither or both."""
    authorization = headers.get("authorization", "")
    in_form = "client_secret" in form
    if authorization[:6].lower() == "basic " and not in_form:
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
        except ValueError:
            return None
        client_id, colon, secret = decoded.partition(":")
        return (unquote_plus(client_id), unquote_plus(secret)) if colon else None
    if in_form and not authorization:
        return form.get("client_id", ""), form["client_secret"]
    return None


def _make_handler(issuer: TestIssuer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            self._respond(*issuer._answer(path))

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0]
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length > 0 else b""
            headers = {name.lower(): value for name, value in self.headers.items()}
            self._respond(*issuer._answer(path, (headers, body)))

        def _respond(self, answer: Answer, delay: float) -> None:
            if issuer._dropping.is_set() or (delay > 0 and not issuer._sleep(delay)):
                self.close_connection = True
                return
            try:
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.content_type)
                self.send_header("Content-Length", str(len(answer.body)))
                for name, value in answer.headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(answer.body)
            except (BrokenPipeError, ConnectionResetError):
                # The client gave up (e.g. its fetch timed out during a delay): nothing to do.
                self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output clean; counts are available via request_count()

    return Handler
