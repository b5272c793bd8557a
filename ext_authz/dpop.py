"""DPoP proofs checked at the resource server (RFC 9449 §4.3, §7), and what they need beside.

Pure apart from :class:`RedisReplayCache`, which talks to a Redis client it is given (this module
imports no Redis library: network clients live in keys/ and sessions.redisstore).

Security notes:
- The proof is parsed by identity's strict JWS parser (compact only, no duplicate members, no
  NaN); every failure of any kind becomes :class:`errors.InvalidDPoPProof` with a fixed
  description, never the proof's or the token's content.
- ``alg`` must be in the configured list AND be an asymmetric algorithm this module knows: the
  key comes from the proof itself, so ``none`` or HMAC would let anyone sign (RFC 9449 §4.3 point
  6), whatever the configuration says.
- The ``jwk`` is parsed by keys.jwks.parse_key, the same checks as an issuer's published keys:
  public members only, RSA of at least 2048 bits, curves that fit the algorithm.
- The signature is verified before any claim is looked at (as identity does for tokens).
- Binding the proof to the access token (``cnf.jkt``), the replay check and the nonce are the
  caller's: :func:`check_proof` returns the key thumbprint, ``jti``, ``iat`` and ``nonce`` for that.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import inspect
import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from jwt.algorithms import Algorithm, get_default_algorithms

# The module, not its names: identity may import this module (a cycle resolved at call time).
from ext_authz import errors, identity
from ext_authz.config.model import normalise_token_type
from ext_authz.keys.jwks import SUPPORTED_ALGORITHMS, VerificationKey, parse_key
from ext_authz.paths import normalise_path

_ESCAPE = re.compile(r"%[0-9a-fA-F]{2}")

_ALGORITHMS: Mapping[str, Algorithm] = get_default_algorithms()
# Asymmetric signature algorithms only, whatever the configuration lists (RFC 9449 §4.3 point 6:
# "not none", and a MAC with a key the sender chose proves nothing).
ASYMMETRIC_ALGORITHMS = SUPPORTED_ALGORITHMS & frozenset(_ALGORITHMS)
DPOP_TYPE = "dpop+jwt"  # RFC 9449 §4.2
MAX_JTI_CHARS = 256
MIN_RSA_BITS = 2048

# RFC 7638 §3.2: the members a thumbprint covers, per key type (RFC 8037 §2 for OKP).
_THUMBPRINT_MEMBERS: Mapping[str, tuple[str, ...]] = {
    "RSA": ("e", "kty", "n"),
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
}
# RFC 7518 §6.2.2, §6.3.2, §6.4.1; RFC 8037 §2.
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
_JWE = re.compile(r"[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*){4}")  # RFC 7516 §7.1: five segments


class ReplayCacheUnavailable(Exception):
    """The replay cache cannot be asked now: whether a proof is a replay is unknown, so the
    caller refuses it (fail closed)."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_thumbprint(jwk: Mapping[str, object]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a JWK, base64url without padding (RFC 9449 §6.1 ``jkt``).

    Only the required members, in lexicographic order, as JSON without white space (§3.2-§3.3).
    Raises ValueError for an unsupported ``kty`` or a required member missing or not a string.
    """
    kty = jwk.get("kty")
    members = _THUMBPRINT_MEMBERS.get(kty) if isinstance(kty, str) else None
    if members is None:
        raise ValueError("unsupported key type for a thumbprint")
    values: dict[str, str] = {}
    for name in members:
        value = jwk.get(name)
        if not isinstance(value, str):
            raise ValueError(f"member {name!r} missing or not a string")
        values[name] = value
    # `members` is in lexicographic order already; §3.3: UTF-8 of the JSON text.
    text = json.dumps(values, separators=(",", ":"), ensure_ascii=False)
    return _b64url(hashlib.sha256(text.encode("utf-8")).digest())


def access_token_hash(token: str) -> str:
    """RFC 9449 §4.2 ``ath``: base64url(SHA-256(ASCII(token))) without padding.

    Raises ValueError (UnicodeEncodeError) for a token that is not ASCII, which no access token
    is (RFC 6750 §2.1 b64token).
    """
    return _b64url(hashlib.sha256(token.encode("ascii")).digest())


def normalise_htu(url: str) -> str | None:
    """The form in which ``htu`` and the request URL are compared (RFC 9449 §4.3 point 9).

    Scheme and host lower-cased, the scheme's default port dropped (RFC 3986 §6.2.2.1, §6.2.3),
    query and fragment removed (RFC 9449 §4.2), the path normalised (RFC 3986 §6.2.2.2, §6.2.2.3;
    "" becomes "/"). None for
    anything that is not an absolute http(s) URL with a host, and for one with user information,
    white space or control characters (urlsplit would silently drop tabs and newlines).
    """
    if not url.isascii() or any(c <= " " or c == "\x7f" for c in url):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a port that is not a number, or out of range; a bad IPv6 literal
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in _DEFAULT_PORTS or not host or "@" in parts.netloc:
        return None
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal (hostname strips the brackets)
    authority = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    # RFC 3986 §6.2.2: escapes of unreserved characters decoded, dot segments removed, the hex of
    # other escapes in upper case; Envoy normalises the request's path the same way before we see it.
    path = _ESCAPE.sub(lambda m: m.group(0).upper(), normalise_path(parts.path, merge_slashes=False))
    return f"{scheme}://{authority}{path or '/'}"


@dataclass(frozen=True, slots=True)
class Proof:
    """A DPoP proof that verified and fits the request: what binding, replay and nonce need."""

    jkt: str  # RFC 7638 thumbprint of the proof's key, to compare with the token's cnf.jkt
    jti: str
    iat: float
    nonce: str | None


def _refuse(description: str) -> errors.InvalidDPoPProof:
    return errors.InvalidDPoPProof(description)


def check_proof(
    proof: str,
    *,
    method: str,
    url: str,
    access_token: str,
    algorithms: frozenset[str],
    now: float,
    max_age_seconds: float,
    max_bytes: int = 8192,
) -> Proof:
    """Check one DPoP proof against the request and its access token (RFC 9449 §4.3, §7.1).

    ``url`` is the request's URL as the client addressed it (scheme, host, port, path); query and
    fragment are ignored on both sides. ``algorithms`` is the configured list; only its asymmetric
    members are ever accepted. Raises errors.InvalidDPoPProof; returns the proof's key thumbprint,
    ``jti``, ``iat`` and ``nonce`` (the caller checks ``cnf.jkt``, replays and the nonce).
    """
    token = _parse(proof, max_bytes)
    header, claims = token.header, token.claims
    alg = _check_header(header, algorithms)
    jwk, key = _check_key(header.get("jwk"), alg)
    if not _signature_valid(alg, key, token):
        raise _refuse("the DPoP proof signature is invalid")
    try:
        jkt = jwk_thumbprint(jwk)
    except ValueError:  # parse_key accepted it, so this is not expected
        raise _refuse("the DPoP proof jwk is not a usable public key") from None
    jti = _check_jti(claims.get("jti"))
    _check_request(claims, method, url)
    iat = _check_iat(claims.get("iat"), now, max_age_seconds)
    _check_ath(claims.get("ath"), access_token)
    nonce = claims.get("nonce")
    if nonce is not None and not isinstance(nonce, str):
        raise _refuse("the DPoP proof nonce is not a string")
    return Proof(jkt=jkt, jti=jti, iat=iat, nonce=nonce)


def _parse(proof: str, max_bytes: int) -> identity.ParsedToken:
    """RFC 9449 §4.3 points 1-2: exactly one well-formed compact JWS."""
    if not isinstance(proof, str):
        raise _refuse("the DPoP proof is not a compact JWS")
    if len(proof) > max_bytes:
        raise _refuse("the DPoP proof is too large")
    if _JWE.fullmatch(proof):
        raise _refuse("encrypted DPoP proofs (JWE) are not accepted")
    try:
        return identity.parse_token(proof, max_bytes, cache_header=False)
    except errors.AuthError:
        raise _refuse("the DPoP proof is not a compact JWS") from None


def _check_header(header: Mapping[str, object], algorithms: frozenset[str]) -> str:
    """RFC 9449 §4.3 points 4-6 (and RFC 7515 §4.1.11, RFC 7797 as identity refuses them)."""
    typ = header.get("typ")
    # RFC 7515 §4.1.9: compared case-insensitively, "application/" may be omitted.
    if not isinstance(typ, str) or normalise_token_type(typ) != DPOP_TYPE:
        raise _refuse("the DPoP proof typ is not dpop+jwt")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in algorithms or alg not in ASYMMETRIC_ALGORITHMS:
        raise _refuse("the DPoP proof algorithm is not allowed")
    if "b64" in header:
        # Before crit, as identity: `crit: ["b64"]` gets the precise answer, and so does b64 alone.
        raise _refuse("the DPoP proof b64 header parameter of RFC 7797 is not supported")
    if "crit" in header:
        raise _refuse("the DPoP proof requires an unsupported critical header extension")
    return alg


def _check_key(jwk: object, alg: str) -> tuple[Mapping[str, object], VerificationKey]:
    """RFC 9449 §4.3 point 7: the header's ``jwk``, a public key that fits ``alg``."""
    if not isinstance(jwk, Mapping):
        raise _refuse("the DPoP proof header has no jwk object")
    # Before parse_key, which refuses these too, for the precise answer: a client that sends its
    # private key has given it away.
    if any(member in jwk for member in _PRIVATE_MEMBERS):
        raise _refuse("the DPoP proof jwk holds private key material")
    if jwk.get("kty") == "oct":
        raise _refuse("the DPoP proof jwk is a symmetric key")
    if jwk.get("kty") == "RSA" and _rsa_modulus_bits(jwk.get("n")) < MIN_RSA_BITS:
        raise _refuse("the DPoP proof jwk is an RSA key shorter than 2048 bits")
    try:
        key = parse_key(jwk)
    except ValueError:
        raise _refuse("the DPoP proof jwk is not a usable public key") from None
    if alg not in key.algorithms:
        raise _refuse("the DPoP proof jwk does not fit its alg")
    return jwk, key


def _rsa_modulus_bits(n: object) -> int:
    """The modulus length of a base64url ``n``; a malformed one counts as long enough here
    (parse_key refuses it with its own answer)."""
    if not isinstance(n, str) or len(n) > 4096 or not _BASE64URL.fullmatch(n):
        return MIN_RSA_BITS
    try:
        raw = base64.urlsafe_b64decode(n + "=" * (-len(n) % 4))
    except (binascii.Error, ValueError):
        return MIN_RSA_BITS
    return int.from_bytes(raw, "big").bit_length()


def _signature_valid(alg: str, key: VerificationKey, token: identity.ParsedToken) -> bool:
    """RFC 9449 §4.3 point 8."""
    try:
        return bool(_ALGORITHMS[alg].verify(token.signing_input, key.key, token.signature))
    except Exception:  # malformed signatures may raise inside cryptography: still just invalid
        return False


def _check_jti(jti: object) -> str:
    if not isinstance(jti, str) or not jti:
        raise _refuse("the DPoP proof jti is missing or not a string")
    if len(jti) > MAX_JTI_CHARS:
        raise _refuse("the DPoP proof jti is too long")
    return jti


def _check_request(claims: Mapping[str, object], method: str, url: str) -> None:
    """RFC 9449 §4.3 points 9-10: ``htm`` is the method (case-sensitive, RFC 9110 §9.1) and
    ``htu`` the URL, both in their §4.3 comparison form."""
    if claims.get("htm") != method:
        raise _refuse("the DPoP proof htm does not match the request method")
    htu = claims.get("htu")
    if not isinstance(htu, str):
        raise _refuse("the DPoP proof htu is missing or not a string")
    expected = normalise_htu(url)
    if expected is None or normalise_htu(htu) != expected:
        raise _refuse("the DPoP proof htu does not match the request URL")


def _check_iat(iat: object, now: float, max_age_seconds: float) -> float:
    """RFC 9449 §4.3 point 11 and §11.1: created within the acceptable window around now."""
    if not isinstance(iat, int | float) or isinstance(iat, bool) or not math.isfinite(iat):
        raise _refuse("the DPoP proof iat is missing or not a number")
    if iat < now - max_age_seconds:
        raise _refuse("the DPoP proof is too old")
    if iat > now + max_age_seconds:
        raise _refuse("the DPoP proof iat is in the future")
    return float(iat)


def _check_ath(ath: object, access_token: str) -> None:
    """RFC 9449 §4.3 point 12: the proof names this access token."""
    if ath is None:
        raise _refuse("the DPoP proof has no ath")
    try:
        expected = access_token_hash(access_token)
    except ValueError:  # a token that is not ASCII matches no ath
        expected = ""
    # compare_digest takes only ASCII str: a non-ASCII ath is a mismatch, not a TypeError.
    if not (isinstance(ath, str) and ath.isascii() and expected and hmac.compare_digest(ath, expected)):
        raise _refuse("the DPoP proof ath does not match the access token")


def replay_key(proof: Proof) -> str:
    """The replay cache's key for a proof: a digest of (jkt, jti).

    The ``jti`` is unique per key (RFC 9449 §11.1), so it is scoped by the key's thumbprint: a
    client choosing another client's ``jti`` values under its own key blocks nothing. No provider
    name: a proof seen under one provider (or under a name a reload has since changed) stays seen.
    A digest keeps the stored keys short and free of client-chosen text; the JSON array keeps the
    parts apart.
    """
    text = json.dumps([proof.jkt, proof.jti], separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def replay_ttl_seconds(proof: Proof, *, now: float, max_age_seconds: float) -> float:
    """How long a proof's ``jti`` must be remembered: while check_proof would still accept its
    ``iat`` (until iat + max_age, which is up to 2 x max_age away for a proof from the future)."""
    return max(proof.iat + max_age_seconds - now, 0.0) + 1.0


class ReplayCache:
    """The ``jti`` values seen (RFC 9449 §11.1), in this process's memory. Thread-safe; one per
    server, kept across reloads.

    Bounded, and never by forgetting someone else's proofs: when full, the oldest entry of the
    holder (a proof key's thumbprint) with the most entries goes. A client that floods the cache
    with fresh proofs of its own key evicts only its own; everyone else's stay refused.

    It also remembers the replay windows of the configs in force (``note_window``): a proof is
    remembered only as long as the window of the config that saw it, so after a reload that
    widens the window, a proof older than the narrowest window in force since its ``iat`` might
    have been forgotten already and is refused (``window_since``).
    """

    def __init__(self, max_entries: int = 200_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._count = 0
        # holder -> {key: expiry}, each in insertion order (its front expires first: one ttl rule).
        self._by_holder: dict[str, OrderedDict[str, float]] = {}
        self._windows: list[tuple[float, float]] = []  # (since, window) of each config, in order
        self._lock = threading.Lock()

    def note_window(self, window_seconds: float, since: float) -> None:
        """A config whose proofs are remembered ``window_seconds`` comes into force at ``since``."""
        with self._lock:
            self._windows.append((since, window_seconds))
            # Only the last hour matters (windows are at most 600 s); the latest always stays.
            while len(self._windows) > 1 and self._windows[1][0] < since - 3600:
                del self._windows[0]

    def window_since(self, t: float) -> float:
        """The narrowest replay window of the configs in force from ``t`` until now."""
        with self._lock:
            windows = self._windows
            narrowest = float("inf")
            for i, (_since, window) in enumerate(windows):
                until = windows[i + 1][0] if i + 1 < len(windows) else float("inf")
                if until > t:
                    narrowest = min(narrowest, window)
            return narrowest

    def first_use(self, key: str, now: float, ttl: float, holder: str = "") -> bool:
        """True the first time ``key`` is seen within its ttl (and records it), False for a replay."""
        with self._lock:
            entries = self._by_holder.get(holder)
            if entries is None:
                entries = self._by_holder[holder] = OrderedDict()
            expiry = entries.get(key)
            if expiry is not None and expiry > now:
                return False
            if expiry is not None:
                del entries[key]
                self._count -= 1
            self._prune(entries, now)
            if self._count >= self._max_entries:
                self._evict(now)
            entries[key] = now + ttl
            self._count += 1
            return True

    def _prune(self, entries: OrderedDict[str, float], now: float) -> None:
        while entries:
            oldest, expiry = next(iter(entries.items()))
            if expiry > now:
                return
            del entries[oldest]
            self._count -= 1

    def _evict(self, now: float) -> None:
        """Room for one: expired entries first, else the oldest of the largest holder's."""
        for holder, entries in list(self._by_holder.items()):
            self._prune(entries, now)
            if not entries:
                del self._by_holder[holder]
        if self._count < self._max_entries:
            return
        largest = max(self._by_holder.values(), key=len)
        largest.popitem(last=False)
        self._count -= 1

    def __len__(self) -> int:
        with self._lock:
            return self._count


class RedisSetNx(Protocol):
    """The one command RedisReplayCache needs of a redis.asyncio client."""

    def set(self, name: str, value: str, *, nx: bool, px: int) -> object: ...


REDIS_PREFIX = "ext-authz:dpop:jti:"


class RedisReplayCache:
    """The ``jti`` values seen, shared by replicas through Redis: one ``SET key 1 NX PX ttl``.

    The expiry is Redis's own (PX counts on its clock), so replicas' clocks need not agree. Any
    failure or a reply slower than ``timeout_seconds`` raises ReplayCacheUnavailable.
    """

    def __init__(
        self, client: RedisSetNx, *, timeout_seconds: float = 0.5, prefix: str = REDIS_PREFIX
    ) -> None:
        self._client = client
        self._timeout = timeout_seconds
        self._prefix = prefix

    async def first_use(self, key: str, now: float, ttl: float) -> bool:
        """True the first time ``key`` is seen within its ttl (and records it), False for a replay.
        ``now`` is unused (Redis keeps the time); it keeps the signature of ReplayCache's."""
        del now
        px = max(1, math.ceil(ttl * 1000))
        try:
            async with asyncio.timeout(self._timeout):
                reply = self._client.set(f"{self._prefix}{key}", "1", nx=True, px=px)
                if inspect.isawaitable(reply):
                    reply = await reply
        except Exception as exc:  # redis errors, OSError, TimeoutError: this module names no redis type
            raise ReplayCacheUnavailable(f"redis set: {type(exc).__name__}") from None
        # SET NX answers OK when it stored the key and nil when the key was there.
        return bool(reply)


_NONCE_PURPOSE = b"ext-authz/dpop-nonce/v1\x00"
_BUCKET_BYTES = 8
_NONCE_BYTES = _BUCKET_BYTES + hashlib.sha256().digest_size
_NONCE_CHARS = len(_b64url(bytes(_NONCE_BYTES)))


class NonceIssuer:
    """Server nonces for DPoP proofs (RFC 9449 §8): stateless, so replicas that share ``secret``
    accept each other's nonces.

    A nonce is base64url(bucket || HMAC-SHA256(secret, purpose || bucket)), bucket =
    floor(now / lifetime) as 8 signed big-endian bytes. The current and the previous bucket are
    valid: a nonce lives between one and two lifetimes, so a client that just got one never finds
    it expired at once.
    """

    def __init__(self, secret: bytes, lifetime_seconds: float, clock: Callable[[], float]) -> None:
        if len(secret) < 16:
            raise ValueError("the nonce secret must be at least 16 bytes")
        if not (math.isfinite(lifetime_seconds) and lifetime_seconds > 0):
            raise ValueError("the nonce lifetime must be a positive number of seconds")
        self._secret = secret
        self._lifetime = lifetime_seconds
        self._clock = clock

    def _bucket(self) -> int:
        return math.floor(self._clock() / self._lifetime)

    def _mac(self, bucket: bytes) -> bytes:
        return hmac.new(self._secret, _NONCE_PURPOSE + bucket, hashlib.sha256).digest()

    def current(self) -> str:
        """The nonce to send now (the DPoP-Nonce header, RFC 9449 §8.1)."""
        bucket = self._bucket().to_bytes(_BUCKET_BYTES, "big", signed=True)
        return _b64url(bucket + self._mac(bucket))

    def valid(self, nonce: object) -> bool:
        """Whether ``nonce`` is one this issuer (or a replica with its secret) gave out in the
        current or the previous bucket. Never raises."""
        if not isinstance(nonce, str) or len(nonce) != _NONCE_CHARS or not nonce.isascii():
            return False
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (binascii.Error, ValueError):
            return False
        if len(raw) != _NONCE_BYTES or _b64url(raw) != nonce:  # one spelling per nonce
            return False
        bucket, mac = raw[:_BUCKET_BYTES], raw[_BUCKET_BYTES:]
        if int.from_bytes(bucket, "big", signed=True) not in (now := self._bucket(), now - 1):
            return False
        return hmac.compare_digest(mac, self._mac(bucket))
