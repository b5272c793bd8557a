"""Stage 2b: sender-constrained tokens. A verified token bound to a key (DPoP, RFC 9449) or to a
client certificate (RFC 8705) is accepted only from the party that holds it. Pure but for the
shared replay cache, reached through ``handoff.on_loop``.

Per provider, each binding is off (the default: tokens are bearer tokens, whatever ``cnf`` they
carry), ``allowed`` (a bound token must be presented by its holder; an unbound one is a bearer
token) or ``required`` (every token must be bound, and presented by its holder).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from ext_authz import errors
from ext_authz.certbinding import check_binding, presented_thumbprint
from ext_authz.config.model import DPoPSettings, ProviderSettings
from ext_authz.dpop import (
    NonceIssuer,
    ReplayCache,
    ReplayCacheUnavailable,
    check_proof,
    replay_key,
    replay_ttl_seconds,
)
from ext_authz.handoff import on_loop
from ext_authz.model import Principal, Request
from ext_authz.sources import DPOP_AUTHORIZATION, HeaderToken

# An authority as Envoy or a gateway sends it: a host name or IPv4 address, or an IPv6 literal, and
# a port. Nothing that could end the authority early (/ ? # @) and move the htu elsewhere.
_AUTHORITY = re.compile(r"(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def _origin(request: Request) -> str:
    """The origin the client addressed, as the request tells it (``dpop_public_origin`` replaces
    it behind a balancer). A scheme other than http(s), or an authority that is not one, comes
    from no client URL (an X-Forwarded-Proto of "https://elsewhere/path#" would move the htu)."""
    scheme = request.scheme or "https"
    if scheme not in ("http", "https") or not _AUTHORITY.fullmatch(request.host):
        raise errors.InvalidDPoPProof("the request's scheme or host is no URL's")
    return f"{scheme}://{request.host}"


class SharedReplayCache(Protocol):
    """The replicas' common memory of DPoP proofs seen (Redis, with ``jwks_cache.backend: redis``)."""

    async def first_use(self, key: str, now: float, ttl: float) -> bool: ...


def dpop_scheme(principal: Principal) -> bool:
    """The token came with the DPoP authorization scheme (``Authorization: DPoP <token>``)."""
    return any(
        isinstance(s, HeaderToken) and (s.name, s.prefix) == DPOP_AUTHORIZATION
        for s in principal.credential.locations
    )


class SenderConstraints:
    """Checks the bindings of each provider that has one. Build once per config."""

    def __init__(
        self,
        providers: tuple[ProviderSettings, ...],
        *,
        clock: Callable[[], float],
        replays: ReplayCache | None = None,
        shared_replays: SharedReplayCache | None = None,
        nonces: NonceIssuer | None = None,
    ) -> None:
        self._providers = {p.name: p for p in providers if p.dpop is not None or p.mtls_bound is not None}
        self._clock = clock
        self._replays = replays if replays is not None else ReplayCache()
        self._shared = shared_replays
        # How long this config remembers a proof: its longest window (RFC 9449 §11.1).
        windows = [p.dpop.proof_max_age_seconds for p in providers if p.dpop is not None]
        self._window = max(windows, default=0.0)
        if windows:
            self._replays.note_window(self._window, clock())
        self._nonces = nonces
        if nonces is None and any(p.dpop is not None and p.dpop.nonce for p in providers):
            raise ValueError("a provider with dpop_nonce needs a NonceIssuer")

    def __bool__(self) -> bool:
        return bool(self._providers)

    async def check(self, principal: Principal, request: Request) -> Principal:
        """The principal (with the bindings' verdicts added to its checks), or raise the denial."""
        provider = self._providers.get(principal.provider)
        if provider is None:
            return principal
        checks = list(principal.checks)
        if provider.dpop is not None:
            checks.append(("DPoP", await self._dpop(provider.dpop, principal, request)))
        if provider.mtls_bound is not None:
            mtls = provider.mtls_bound
            presented = presented_thumbprint(request, mtls.certificate_from)
            verdict = check_binding(principal.claims, presented, mtls.mode)
            checks.append(("certificate binding", verdict or "holds"))
        return replace(principal, checks=tuple(checks))

    async def _dpop(self, dpop: DPoPSettings, principal: Principal, request: Request) -> str:
        cnf = principal.claims.get("cnf")
        if cnf is not None and not isinstance(cnf, dict):
            # Not "unbound": a binding we cannot read (RFC 7800 cnf is an object) is refused.
            raise errors.DPoPBindingMismatch("the token's cnf claim is malformed")
        jkt = cnf.get("jkt") if cnf is not None else None
        if jkt is not None and not isinstance(jkt, str):
            raise errors.DPoPBindingMismatch("the token's cnf.jkt is malformed")
        if not dpop_scheme(principal):
            # RFC 9449 §7.2: a DPoP-bound token is never accepted as a bearer token.
            if jkt is not None:
                raise errors.DPoPBindingMismatch("a DPoP-bound token needs the DPoP scheme and a proof")
            if dpop.mode == "required":
                raise errors.DPoPBindingMismatch("this issuer's tokens must be DPoP-bound")
            return "bearer token, not bound (allowed)"
        proof_header = request.headers.get("dpop")
        if proof_header is None:
            raise errors.InvalidDPoPProof("the request carries no DPoP proof")
        if "," in proof_header:
            # RFC 9449 §4.3: exactly one DPoP header (Envoy joins repeated ones with ",").
            raise errors.InvalidDPoPProof("the request carries more than one DPoP proof")
        now = self._clock()
        origin = dpop.public_origin or _origin(request)
        proof = check_proof(
            proof_header.strip(),
            method=request.method,
            url=origin + request.path,
            access_token=principal.credential.token,
            algorithms=dpop.algorithms,
            now=now,
            max_age_seconds=dpop.proof_max_age_seconds,
        )
        if jkt is None:
            raise errors.DPoPBindingMismatch("the token sent with the DPoP scheme is not DPoP-bound")
        if not hmac.compare_digest(jkt.encode("utf-8", "surrogatepass"), proof.jkt.encode("ascii")):
            raise errors.DPoPBindingMismatch()
        if dpop.nonce:
            assert self._nonces is not None
            if proof.nonce is None or not self._nonces.valid(proof.nonce):
                raise errors.UseDPoPNonce(self._nonces.current())
        if now - proof.iat > self._replays.window_since(proof.iat):
            # A reload since widened the window: a config in force since its iat remembered
            # proofs for less time, so this one may have been seen and forgotten.
            raise errors.InvalidDPoPProof("the DPoP proof is too old")
        # Remembered for as long as any provider of this config would accept its iat.
        ttl = replay_ttl_seconds(proof, now=now, max_age_seconds=self._window)
        key = replay_key(proof)
        if not self._replays.first_use(key, now, ttl, holder=proof.jkt):
            raise errors.InvalidDPoPProof("the DPoP proof was used before")
        if self._shared is not None:
            try:
                first = await on_loop(
                    self._shared.first_use(key, now, ttl),
                    busy=errors.ReplayCheckUnavailable(retry_after_seconds=1),
                )
            except ReplayCacheUnavailable:
                # Fail closed: without the replicas' memory a replay at another one would pass.
                raise errors.ReplayCheckUnavailable(retry_after_seconds=1) from None
            if not first:
                raise errors.InvalidDPoPProof("the DPoP proof was used before")
        return "proof valid; its key is the token's cnf.jkt"
