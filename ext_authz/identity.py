"""Stage 2: token → issuer → key → verified claims (a Principal).

Parsing is strict and our own (RFC 7515 compact serialisation only: three base64url segments, JSON
objects without duplicate members); the signature is checked with PyJWT's algorithm objects over
keys from the provider's own JWKS; claims are checked one by one, each failure its own error.

Security notes:
- The provider is chosen by the token's ``iss``, but nothing else is trusted before the signature
  verifies: ``alg`` must be in the provider's allow-list AND fit the key's type, so ``none`` and
  HMAC-with-a-public-key can never verify.
- Keys are never taken from the token: ``jku``, ``x5u``, ``jwk`` and ``x5c`` are ignored.
- ``crit`` names extensions we would have to understand (RFC 7515 §4.1.11); we understand none.
- ``b64`` (RFC 7797 unencoded payload) is refused whatever its value and whether or not ``crit``
  lists it: an implementation of RFC 7797 and one without it read different payloads.
- The signature is verified before any claim is looked at, so a forged token always reads as a bad
  signature and never reveals which claim checks it would have passed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hmac
import json
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from jwt.algorithms import Algorithm, get_default_algorithms

from ext_authz import errors
from ext_authz.claims import claim_value
from ext_authz.config.model import ProviderSettings, normalise_token_type
from ext_authz.handoff import on_loop
from ext_authz.keys.jwks import VerificationKey
from ext_authz.model import Credential, Principal
from ext_authz.tokencache import CachedToken, TokenCache

if TYPE_CHECKING:  # the network client is the server's: the core only calls it
    from ext_authz.introspection import Introspector

_COMPACT = re.compile(r"[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")  # three base64url segments
_B64TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")  # RFC 6750 §2.1
_REFRESH_TOKEN_TYPES = frozenset({"refresh_token", "refresh"})
_ALGORITHMS: Mapping[str, Algorithm] = get_default_algorithms()
BACKCHANNEL_LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"
# A logout token valid for longer is refused: its jti is remembered (replays refused) until exp.
MAX_LOGOUT_TOKEN_SECONDS = 86400


class KeyResolver(Protocol):
    """The seam between verification and the key cache (keys/)."""

    def key_now(self, provider: str, kid: str | None, alg: str) -> VerificationKey | None:
        """The key when it can be had at once and without error; None: await :meth:`key_for`.
        (The request path's shortcut: no coroutine for the common case.)"""
        ...

    async def key_for(self, provider: str, kid: str | None, alg: str) -> VerificationKey:
        """The one key that may verify a token with this kid and alg.

        Raises UnknownKey when there is none (or several), KeysUnavailable when the provider has
        no usable keys right now.
        """
        ...


@dataclass(frozen=True, slots=True)
class ParsedToken:
    header: Mapping[str, object]
    claims: Mapping[str, object]
    signing_input: bytes
    signature: bytes
    payload_segment: str


_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_PADDING = ("", "", "==", "=")  # by len % 4; a length of 1 mod 4 is refused before


def _b64decode(segment: str) -> bytes:
    """One base64url segment whose alphabet parse_token has checked."""
    if len(segment) % 4 == 1:
        raise errors.MalformedToken()
    try:
        return binascii.a2b_base64(
            (segment + _PADDING[len(segment) % 4]).encode("ascii").translate(_TO_STANDARD)
        )
    except (binascii.Error, ValueError):
        raise errors.MalformedToken() from None


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        # Two parsers may pick different duplicates; RFC 7515 §5.2 lets us reject.
        raise errors.MalformedToken()
    return result


def _reject_constant(_: str) -> object:
    raise errors.MalformedToken()  # NaN / Infinity are not JSON


_MAX_INTEGER_DIGITS = 20  # 2**64 has 20 digits: no JSON number in a JWT needs more


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INTEGER_DIGITS:
        raise errors.MalformedToken()  # and it could not go into a header or dynamic metadata
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise errors.MalformedToken()  # 1e400 parses to infinity: an expiry that never comes
    return value


# One decoder for every token: json.loads with hooks would build a new one per call.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicates,
    parse_constant=_reject_constant,
    parse_int=_parse_int,
    parse_float=_parse_float,
)
_SCAN: Callable[[str, int], tuple[object, int]] = _DECODER.scan_once  # type: ignore[attr-defined]
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def _json_object(data: bytes) -> dict[str, object]:
    try:
        text = data.decode("utf-8")
        try:
            # The scanner itself, without decode()'s white-space matching around it: a token's
            # JSON has none. Anything else (white space, trailing data, an error) takes decode().
            value, end = _SCAN(text, 0)
        except StopIteration:
            end = -1
        if end != len(text):
            value = _DECODER.decode(text)
        if _SURROGATE_ESCAPE.search(text):
            # "\ud800" is valid JSON syntax for an invalid string (a lone surrogate): no UTF-8
            # form, so nothing could carry it on. A well-formed pair passes this check.
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError):  # includes Unicode errors and over-long integers
        raise errors.MalformedToken() from None
    if not isinstance(value, dict):
        raise errors.MalformedToken()
    return value


def _header_object(segment: str) -> dict[str, object]:
    return _json_object(_b64decode(segment))


# An issuer's tokens share a few header segments (alg, kid, typ): each is decoded once. The dict
# is shared by every token with that header: read, never changed. A segment that fails to decode
# raises again each time (lru_cache keeps only results).
_CACHED_HEADER_CHARS = 512
_cached_header = functools.lru_cache(maxsize=256)(_header_object)


def parse_token(token: str, max_bytes: int, *, cache_header: bool = True) -> ParsedToken:
    """``cache_header=False``: a header each client makes its own (a DPoP proof's, with the
    client's key) is not kept, so it never pushes issuers' headers out of the cache."""
    if len(token) > max_bytes:
        raise errors.TokenTooLarge()
    parts = token.split(".")
    if len(parts) != 3:
        raise errors.MalformedToken(
            "encrypted tokens (JWE) are not accepted"
            if len(parts) == 5
            else errors.MalformedToken.description
        )
    if not _COMPACT.fullmatch(token):
        raise errors.MalformedToken()
    header_segment, payload_segment, signature_segment = parts
    if cache_header and len(header_segment) <= _CACHED_HEADER_CHARS:
        header = _cached_header(header_segment)
    else:
        header = _json_object(_b64decode(header_segment))
    claims = _json_object(_b64decode(payload_segment))
    signature = _b64decode(signature_segment)
    return ParsedToken(
        header=header,
        claims=claims,
        signing_input=f"{header_segment}.{payload_segment}".encode("ascii"),
        signature=signature,
        payload_segment=payload_segment,
    )


# A NumericDate (RFC 7519 §2) is seconds since 1970; like Envoy's jwt_authn, only [0, 2**64).
_MAX_NUMERIC_DATE = 2**64


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < _MAX_NUMERIC_DATE


class Verifier:
    """Verifies tokens for a fixed set of providers. Build once per config; call per request."""

    def __init__(
        self,
        providers: tuple[ProviderSettings, ...],
        keys: KeyResolver,
        *,
        max_token_bytes: int,
        clock: Callable[[], float],
        cache: TokenCache | None = None,
        introspector: Introspector | None = None,
    ) -> None:
        # A template's own text is no issuer: a token whose iss is ".../{tenant}/..." is unknown.
        self._by_issuer = {p.issuer: p for p in providers if p.issuer_template is None}
        self._templates = tuple(p for p in providers if p.issuer_template is not None)
        self._by_name = {p.name: p for p in providers}
        self._introspecting = tuple(p for p in providers if p.introspection is not None)
        self._introspector = introspector
        self._keys = keys
        self._max_token_bytes = max_token_bytes
        self._clock = clock
        self.cache = cache
        if not self._introspecting:
            self.verify = self._verified_jws  # type: ignore[method-assign]

    async def verify(self, credential: Credential) -> Principal:
        """Return the verified Principal or raise an errors.AuthError subclass.

        A token that is not a JWS goes to the providers with ``introspection`` (RFC 7662), and
        only there; a JWS never does, unless its provider has ``introspect_jwts``. (Without
        introspection in the config, the instance's ``verify`` is ``_verified_jws`` itself: no
        coroutine more per Check.)"""
        if not _COMPACT.fullmatch(credential.token):
            return await self._introspected(credential)
        principal = await self._verified_jws(credential)
        provider = self._by_name[principal.provider]
        if provider.introspect_jwts:
            # Revocation: the signature is not enough for this provider.
            found = await self._introspect((provider,), credential.token)
            if found is None:
                raise errors.TokenInactive()
            principal = replace(principal, checks=(*principal.checks, ("introspection", "active")))
        return principal

    async def _verified_jws(self, credential: Credential) -> Principal:
        cache = self.cache
        if cache is None or len(credential.token) > self._max_token_bytes:
            return await self._verify(credential, None)
        digest = cache.digest(credential.token)
        entry = cache.get(digest, self._clock())
        if entry is None:
            return await self._verify(credential, digest)
        provider = self._by_name[entry.provider]
        if not _location_accepted(provider, credential):
            raise errors.TokenLocationNotAccepted()
        # The key must still be the one the provider's current keys give (rotation, max_stale).
        key = self._keys.key_now(provider.name, entry.kid, entry.alg)
        if key is None:
            try:
                key = await self._keys.key_for(provider.name, entry.kid, entry.alg)
            except errors.AuthError:
                cache.discard(digest)
                raise
        if key.fingerprint != entry.key_fingerprint:
            cache.discard(digest)
            return await self._verify(credential, digest)
        # The payload segment is the token's own (the cache keeps the claims, not ~0.5 KB of text).
        token = credential.token
        payload_segment = token[token.index(".") + 1 : token.rindex(".")]
        if provider.issuer_template is None:
            return Principal(entry.provider, entry.claims, payload_segment, credential)
        tenant = _tenant(provider, entry.claims)
        return Principal(
            entry.provider, entry.claims, payload_segment, credential, tenant, _tenant_checked(tenant)
        )

    async def _verify(self, credential: Credential, digest: bytes | None) -> Principal:
        token = parse_token(credential.token, self._max_token_bytes)
        header, claims = token.header, token.claims

        provider = self.provider_of(claims.get("iss"))
        if provider is None:
            raise errors.UnknownIssuer()
        if not _location_accepted(provider, credential):
            raise errors.TokenLocationNotAccepted()

        self._check_header(provider, header)
        self._check_type(provider, header.get("typ"))
        key, kid, alg = await self._check_signature(provider, token)

        self._check_claims(provider, claims)
        tenant = _tenant(provider, claims) if provider.issuer_template is not None else None
        if digest is not None and self.cache is not None:
            exp = claims["exp"]
            assert isinstance(exp, int | float)
            expires = exp + provider.clock_skew_seconds
            # The claim names interned: every token of an issuer names the same claims, and each
            # cached entry would otherwise keep its own copy of them (~0.4 KB). Only verified
            # tokens get here: names a client makes up are never interned.
            kept = {sys.intern(name): value for name, value in claims.items()}
            entry = CachedToken(provider.name, kept, expires, kid, alg, key.fingerprint)
            self.cache.put(digest, entry)
        return Principal(
            provider=provider.name,
            claims=claims,
            payload_segment=token.payload_segment,
            credential=credential,
            tenant=tenant,
            checks=_tenant_checked(tenant),
        )

    def provider_of(self, issuer: object) -> ProviderSettings | None:
        """The provider whose tokens name ``issuer``: its own issuer, or exactly one issuer
        template it fits (with an allowed tenant or not: that is checked after the signature)."""
        if not isinstance(issuer, str):
            return None
        provider = self._by_issuer.get(issuer)
        if provider is not None or not self._templates:
            return provider
        fitting = [p for p in self._templates if p.issuer_template and p.issuer_template.tenant_of(issuer)]
        return fitting[0] if len(fitting) == 1 else None

    # ---- introspection (RFC 7662) ----

    async def _introspected(self, credential: Credential) -> Principal:
        token = credential.token
        if len(token) > self._max_token_bytes:
            raise errors.TokenTooLarge()
        if not _B64TOKEN.fullmatch(token):
            # RFC 6750 §2.1 b64token: anything else is no token an IdP issued, and never worth
            # a request to one.
            raise errors.MalformedToken()
        candidates = tuple(p for p in self._introspecting if _location_accepted(p, credential))
        if not candidates:
            raise errors.TokenLocationNotAccepted()
        found = await self._introspect(candidates, token)
        if found is None:
            raise errors.TokenInactive()
        provider, answer = found
        claims = dict(answer)  # a plain dict, like a JWT's: rendered as JSON and protobuf Struct
        self._check_introspected(provider, claims)
        tenant = _tenant(provider, claims) if provider.issuer_template is not None else None
        if not _carried(claims):
            raise errors.InvalidClaim("the introspection answer holds a value JSON cannot carry")
        try:
            # What JWTs' strict parser refuses (NaN, Infinity, lone surrogates) an answer's lenient
            # JSON may hold: no header, metadata or payload could carry it.
            payload = json.dumps(claims, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
        except (ValueError, UnicodeEncodeError):
            raise errors.InvalidClaim("the introspection answer holds a value JSON cannot carry") from None
        return Principal(
            provider=provider.name,
            claims=claims,
            payload_segment=base64.urlsafe_b64encode(payload).rstrip(b"=").decode("ascii"),
            credential=credential,
            tenant=tenant,
            checks=(*_tenant_checked(tenant), ("introspection", f"active at {provider.name}")),
        )

    async def _introspect(
        self, providers: tuple[ProviderSettings, ...], token: str
    ) -> tuple[ProviderSettings, Mapping[str, object]] | None:
        """The first provider (in config order) whose endpoint says the token is active, with the
        answer's claims; None when every one says inactive. Raises IntrospectionUnavailable when
        none says active and one could not answer."""
        introspector = self._introspector
        if introspector is None:
            raise errors.IntrospectionUnavailable()
        cached = [introspector.answer_now(p, token) for p in providers]
        for provider, answer in zip(providers, cached, strict=True):
            if answer is None:
                break
            if answer.active:
                return provider, answer.claims
        else:
            return None  # every answer known, none active
        return await on_loop(
            _introspect_in_order(introspector, providers, token),
            busy=errors.IntrospectionUnavailable(retry_after_seconds=1),
        )

    def _check_introspected(self, provider: ProviderSettings, claims: Mapping[str, object]) -> None:
        """An active answer's members, judged as a JWT's claims are (RFC 7662 §2.2: exp, nbf and
        iat optional; iss, when sent, must be the provider's)."""
        issuer = claims.get("iss")
        if issuer is not None:
            if self.provider_of(issuer) is not provider:
                raise errors.IssuerNotAccepted()
        elif provider.issuer_template is not None:
            raise errors.InvalidClaim("the introspection answer names no issuer (its tenant)")
        if "exp" in claims:
            self._check_times(provider, claims)
        else:
            self._check_not_before(provider, claims)
        for member in ("token_use", "token_type", "typ"):
            value = claims.get(member)
            if isinstance(value, str) and value.lower() in _REFRESH_TOKEN_TYPES:
                # An IdP that calls a refresh token active (Hydra's token_use, Keycloak's typ):
                # it is no access token.
                raise errors.TokenTypeNotAccepted()
        self._check_audience(provider, claim_value(claims, provider.claims.audience))

    @staticmethod
    def _check_header(provider: ProviderSettings, header: Mapping[str, object]) -> None:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in provider.algorithms:
            raise errors.UnsupportedAlgorithm()
        if "b64" in header:
            # Before crit: `crit: ["b64"]` gets the precise answer, and so does b64 alone.
            raise errors.UnsupportedB64Header()
        if "crit" in header:
            raise errors.UnsupportedCritical()

    async def _check_signature(
        self, provider: ProviderSettings, token: ParsedToken
    ) -> tuple[VerificationKey, str | None, str]:
        """The key that verifies the token's signature (its header checked before), with the kid
        and alg it was chosen by. Raises BadSignature, UnknownKey, KeysUnavailable."""
        alg, kid = token.header["alg"], token.header.get("kid")
        assert isinstance(alg, str)
        if kid is not None and not isinstance(kid, str):
            raise errors.MalformedToken()
        key = self._keys.key_now(provider.name, kid, alg) or await self._keys.key_for(provider.name, kid, alg)
        algorithm = _ALGORITHMS[alg]
        try:
            valid = algorithm.verify(token.signing_input, key.key, token.signature)
        except Exception:  # malformed signatures may raise inside cryptography: still just invalid
            valid = False
        if not valid:
            raise errors.BadSignature()
        return key, kid, alg

    async def verify_id_token(
        self, token: str, provider_name: str, *, client_id: str, nonce: str | None
    ) -> Mapping[str, object]:
        """The verified claims of an ID token the provider's token endpoint returned to us (OIDC
        Core §3.1.3.7): signed by the provider's keys, ``iss`` exactly its issuer (a token from
        another provider, a mix-up, is refused), ``aud`` naming our client id (with ``azp`` equal
        to it when there are several audiences or an ``azp``), unexpired, and ``nonce`` equal to
        the sign-in's (``nonce=None``: a refresh, §12.2). Raises an AuthError subclass."""
        provider = self._by_name[provider_name]
        parsed = parse_token(token, self._max_token_bytes)
        claims = parsed.claims
        if claims.get("iss") != provider.issuer:
            raise errors.IssuerNotAccepted()
        self._check_header(provider, parsed.header)
        await self._check_signature(provider, parsed)
        self._check_times(provider, claims)
        aud, azp = claims.get("aud"), claims.get("azp")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if client_id not in audiences or not all(isinstance(a, str) for a in audiences):
            raise errors.AudienceMismatch("the ID token is not for this client")
        if (len(audiences) > 1 or azp is not None) and azp != client_id:
            raise errors.AudienceMismatch("the ID token was issued to another party (azp)")
        if nonce is not None:
            got = claims.get("nonce")
            if not isinstance(got, str) or not hmac.compare_digest(
                got.encode("utf-8", "surrogatepass"), nonce.encode("utf-8", "surrogatepass")
            ):
                raise errors.InvalidClaim("the ID token's nonce is not this sign-in's")
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise errors.InvalidClaim("the ID token has no subject")
        return claims

    async def verify_logout_token(
        self, token: str, provider_name: str, *, client_id: str
    ) -> Mapping[str, object]:
        """The verified claims of an OIDC Back-Channel Logout 1.0 logout token (§2.6): signed by
        the provider's keys, ``iss`` exactly its issuer, ``aud`` naming our client id, ``iat``
        present and not in the future, ``exp`` (required, and within a day) not passed, a ``jti``,
        the back-channel logout event, a ``sid`` or a ``sub``, and no ``nonce`` (so an ID token
        can never pass for one). A ``typ`` other than ``logout+jwt`` is refused. Raises an
        AuthError subclass."""
        provider = self._by_name[provider_name]
        parsed = parse_token(token, self._max_token_bytes)
        claims = parsed.claims
        if claims.get("iss") != provider.issuer:
            raise errors.IssuerNotAccepted()
        typ = parsed.header.get("typ")
        if typ is not None and (not isinstance(typ, str) or normalise_token_type(typ) != "logout+jwt"):
            raise errors.TokenTypeNotAccepted()
        self._check_header(provider, parsed.header)
        await self._check_signature(provider, parsed)
        self._check_times(provider, claims)  # exp is required (§2.4)
        exp = claims["exp"]
        assert isinstance(exp, int | float)
        if exp > self._clock() + MAX_LOGOUT_TOKEN_SECONDS:
            raise errors.InvalidClaim("the logout token lives too long")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise errors.InvalidClaim("the logout token has no jti")
        iat = claims.get("iat")
        if not _is_number(iat):
            raise errors.InvalidClaim("the logout token has no valid iat")
        assert isinstance(iat, int | float)
        if iat > self._clock() + provider.clock_skew_seconds:
            raise errors.TokenIssuedInFuture()
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if client_id not in audiences:
            raise errors.AudienceMismatch("the logout token is not for this client")
        events = claims.get("events")
        if not isinstance(events, dict) or not isinstance(events.get(BACKCHANNEL_LOGOUT_EVENT), dict):
            raise errors.InvalidClaim("the logout token carries no back-channel logout event")
        if "nonce" in claims:
            raise errors.InvalidClaim("a logout token has no nonce")
        sid, sub = claims.get("sid"), claims.get("sub")
        if not (isinstance(sid, str) and sid) and not (isinstance(sub, str) and sub):
            raise errors.InvalidClaim("the logout token names neither a sid nor a sub")
        return claims

    @staticmethod
    def _check_type(provider: ProviderSettings, typ: object) -> None:
        if typ is None:
            if provider.require_typ:
                raise errors.TokenTypeNotAccepted()
            return
        if not isinstance(typ, str) or normalise_token_type(typ) not in provider.token_types:
            raise errors.TokenTypeNotAccepted()

    def _check_claims(self, provider: ProviderSettings, claims: Mapping[str, object]) -> None:
        self._check_times(provider, claims)
        self._check_audience(provider, claim_value(claims, provider.claims.audience))
        if provider.issuer_template is not None:
            _tenant(provider, claims)

    def _check_times(self, provider: ProviderSettings, claims: Mapping[str, object]) -> None:
        now = self._clock()
        skew = provider.clock_skew_seconds
        exp = claims.get("exp")
        if exp is None:
            raise errors.InvalidClaim("the token has no expiry time")
        if not _is_number(exp):
            raise errors.InvalidClaim("the token expiry time is not a valid date")
        assert isinstance(exp, int | float)
        if now - skew >= exp:  # RFC 7519 §4.1.4: not accepted on or after exp
            raise errors.TokenExpired()
        self._check_not_before(provider, claims)

    def _check_not_before(self, provider: ProviderSettings, claims: Mapping[str, object]) -> None:
        now = self._clock()
        skew = provider.clock_skew_seconds
        for name, error in (("nbf", errors.TokenNotYetValid), ("iat", errors.TokenIssuedInFuture)):
            value = claims.get(name)
            if value is None:
                continue
            if not _is_number(value):
                raise errors.InvalidClaim(f"the token {name} claim is not a valid date")
            assert isinstance(value, int | float)
            if value > now + skew:
                raise error()

    @staticmethod
    def _check_audience(provider: ProviderSettings, aud: object) -> None:
        if isinstance(aud, str):
            audiences: list[object] = [aud]
        elif isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud):
            audiences = aud
        elif aud is None:
            raise errors.AudienceMismatch("the token has no audience")
        else:
            raise errors.InvalidClaim("the token audience claim is malformed")
        if not any(a in provider.audiences for a in audiences):
            raise errors.AudienceMismatch()


async def _introspect_in_order(
    introspector: Introspector, providers: tuple[ProviderSettings, ...], token: str
) -> tuple[ProviderSettings, Mapping[str, object]] | None:
    """On the loop: each provider in turn until one says active, all within one budget (the
    longest fetch timeout among them: each request is bounded by its own as well)."""
    unavailable = False
    budget = max(p.keys.fetch_timeout_seconds for p in providers)
    try:
        async with asyncio.timeout(budget):
            for provider in providers:
                try:
                    answer = introspector.answer_now(provider, token) or await introspector.introspect(
                        provider, token
                    )
                except errors.IntrospectionUnavailable:
                    unavailable = True
                    continue
                if answer.active:
                    return provider, answer.claims
    except TimeoutError:
        unavailable = True
    if unavailable:
        raise errors.IntrospectionUnavailable()
    return None


_MAX_ANSWER_DEPTH = 32
_INTEGER_BOUND: int = 10**_MAX_INTEGER_DIGITS


def _carried(value: object, depth: int = 0) -> bool:
    """A value a JWT's strict parser would have given (its numbers: finite, integers of at most
    20 digits), nested at most _MAX_ANSWER_DEPTH deep: what an introspection answer's lenient JSON
    must also be before its members travel as claims (into protobuf, headers, the payload)."""
    if value is None or isinstance(value, str | bool):
        return True
    if isinstance(value, int):
        return abs(value) < _INTEGER_BOUND
    if isinstance(value, float):
        return math.isfinite(value)
    if depth >= _MAX_ANSWER_DEPTH:
        return False
    if isinstance(value, list):
        return all(_carried(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _carried(v, depth + 1) for k, v in value.items())
    return False


def _tenant(provider: ProviderSettings, claims: Mapping[str, object]) -> str:
    """The tenant the verified ``iss`` names; raises TenantNotAllowed when it is not in the
    provider's ``tenants``, or the token's ``tid`` names another tenant."""
    template = provider.issuer_template
    assert template is not None
    issuer = claims.get("iss")
    tenant = template.tenant_of(issuer) if isinstance(issuer, str) else None
    if tenant is None:
        raise errors.UnknownIssuer()
    if template.tenants is not None and tenant not in template.tenants:
        raise errors.TenantNotAllowed()
    tid = claims.get("tid", tenant)
    if tid != tenant:
        raise errors.TenantNotAllowed("the token tid is not the tenant of its issuer")
    return tenant


def _tenant_checked(tenant: str | None) -> tuple[tuple[str, str], ...]:
    return () if tenant is None else (("tenant", f"{tenant} (allowed)"),)


def _location_accepted(provider: ProviderSettings, credential: Credential) -> bool:
    return all(provider.accepts(source) for source in credential.locations)
