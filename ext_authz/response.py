"""Stage 4: a decision → what Envoy does with the request. Pure.

On allow, identity headers come from the verified claims; every header name ext-authz owns that
this decision does not set is removed, whether or not the CheckRequest shows it (Envoy's
``allowed_headers`` may hide it from us), so a client can never get a forged identity header to
the backend. Underscore spellings go too (``x_user_id`` for ``x-user-id``): CGI, WSGI and Rack
backends read both as one name. On deny, the answer follows RFC 6750 §3.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ext_authz.claims import claim_value
from ext_authz.config.model import ClaimHeader, RuleSettings, Settings, owned_headers
from ext_authz.errors import (
    AuthError,
    InsufficientScope,
    InsufficientUserAuthentication,
    KeysUnavailable,
    UseDPoPNonce,
)
from ext_authz.model import Allow, Deny, Principal, Request
from ext_authz.sources import Removal, cookie_header_without

log = logging.getLogger(__name__)


def _scalar_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    return None


def _list_element(value: object) -> str | None:
    text = _scalar_text(value)
    # An element with "," (or with blanks around it, which list parsers trim, RFC 9110 §5.6.1)
    # would read as other elements once joined: ["x,admin"] must not become "x,admin".
    if text is None or "," in text or text != text.strip(" \t"):
        return None
    return text


def header_value(value: object) -> str | None:
    """A claim as header text: strings as they are, numbers and booleans as JSON, arrays joined.

    None when there is no faithful text: no claim, or an array with a nested array or object, or
    with an element that would read as other elements once joined with ",".
    """
    if isinstance(value, list):
        parts = [_list_element(v) for v in value]
        return None if any(p is None for p in parts) else ",".join(p for p in parts if p is not None)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return _scalar_text(value)


# A name with k dashes has 2**k underscore spellings: all of them are removed up to this k (8
# names, enough for x-user-id, x-jwt-payload, x-forwarded-user-id), beyond it the all-underscore
# one, and any other spelling when the CheckRequest shows it (Envoy's DROP_HEADER covers the rest).
_MAX_SPELLED_SEPARATORS = 3


_REMOVAL_CACHE_ENTRIES = 1024


def underscore_spellings(name: str) -> tuple[str, ...]:
    """The names a backend that folds "_" into "-" reads as ``name`` (``name`` first)."""
    canonical = name.replace("_", "-")
    parts = canonical.split("-")
    if len(parts) - 1 > _MAX_SPELLED_SEPARATORS:
        return tuple(dict.fromkeys((name, canonical, canonical.replace("-", "_"))))
    spellings = [parts[0]]
    for part in parts[1:]:
        spellings = [f"{head}{sep}{part}" for head in spellings for sep in ("-", "_")]
    return tuple(dict.fromkeys((name, *spellings)))


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def is_safe_header_value(value: str, max_bytes: int = 8192) -> bool:
    """Envoy fails the request on CR, LF or NUL; other controls are illegal too (RFC 9110 §5.5)."""
    if len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        return False
    return _CONTROL.search(value) is None and value == value.strip(" \t")


@dataclass(frozen=True, slots=True)
class _ProviderHeaders:
    claims: tuple[ClaimHeader, ...]
    payload_header: str | None
    forward_token: bool


class Answers:
    """Builds Allow and Deny values; everything that depends only on the config is computed here once."""

    def __init__(self, settings: Settings) -> None:
        self._realm = settings.realm
        self._dpop_algorithms = " ".join(
            sorted({alg for p in settings.providers if p.dpop is not None for alg in p.dpop.algorithms})
        )
        self._max_header_bytes = settings.max_header_value_bytes
        self._providers = {
            p.name: _ProviderHeaders(p.claim_to_headers, p.payload_header, p.forward_token)
            for p in settings.providers
        }
        owned = self.owned_headers = owned_headers(settings)
        # Removed from every allowed request unless the decision sets that very name: computed
        # once, sent as is when nothing is set (anonymous routes).
        # A DPoP proof (RFC 9449) is for us: it never reaches a backend.
        dpop = ("dpop",) if any(p.dpop is not None for p in settings.providers) else ()
        self.headers_always_removed = tuple(
            dict.fromkeys(
                (*(spelling for name in sorted(owned) for spelling in underscore_spellings(name)), *dpop)
            )
        )
        self._removed = frozenset(self.headers_always_removed)
        self._removal_by_key: dict[tuple[str, ...], tuple[str, ...]] = {}
        # Names with too many dashes to spell out every way (folded to dashes): their other
        # spellings are removed when the CheckRequest shows them.
        self._folded_unlisted = frozenset(
            folded
            for folded in (name.replace("_", "-") for name in owned)
            if folded.count("-") > _MAX_SPELLED_SEPARATORS
        )

    def allow(
        self,
        request: Request,
        principal: Principal | None,
        rule: RuleSettings,
        extra_metadata: Mapping[str, object] | None = None,
        reason: str | None = None,
    ) -> Allow:
        to_set: list[tuple[str, str]] = []
        metadata: dict[str, object] = {"rule": rule.name, **(extra_metadata or {})}
        to_remove: list[str] = []
        params_to_remove: list[str] = []
        if principal is not None:
            headers = self._providers[principal.provider]
            for claim_header in headers.claims + rule.claim_to_headers:
                value = claim_value(principal.claims, claim_header.path)
                if value is None:
                    continue
                text = header_value(value)
                if text is None:
                    log.warning(
                        "claim not emitted: an array with a nested value, or an element with ',' "
                        "or blanks at its edges",
                        extra={"fields": {"header": claim_header.header, "claim": claim_header.claim}},
                    )
                    continue
                if not is_safe_header_value(text, self._max_header_bytes):
                    log.warning(
                        "claim not emitted: not a legal header value",
                        extra={"fields": {"header": claim_header.header, "claim": claim_header.claim}},
                    )
                    continue
                to_set.append((claim_header.header, text))
            if headers.payload_header:
                if len(principal.payload_segment) <= self._max_header_bytes:
                    to_set.append((headers.payload_header, principal.payload_segment))
                else:
                    log.warning(
                        "payload header not emitted: over max_header_value_bytes",
                        extra={"fields": {"header": headers.payload_header}},
                    )
            if not headers.forward_token:
                self._strip_token(request, principal, to_set, to_remove, params_to_remove)
            metadata["provider"] = principal.provider
            # The verified claims object itself (shared by every hit of the token cache), so that
            # the transport can reuse what it built from it.
            metadata["claims"] = principal.claims
        return Allow(
            headers_to_set=tuple(to_set),
            headers_to_remove=self._headers_to_remove(request, to_set, to_remove),
            query_params_to_remove=tuple(dict.fromkeys(params_to_remove)),
            metadata=metadata,
            rule=rule.name,
            provider=principal.provider if principal else None,
            subject=principal.subject if principal else None,
            reason=reason or ("token" if principal else "anonymous"),
        )

    def _headers_to_remove(
        self, request: Request, to_set: list[tuple[str, str]], to_remove: list[str]
    ) -> tuple[str, ...]:
        # Every owned name, shown in the CheckRequest or not (allowed_headers may hide it), except
        # the very names this decision sets: Envoy removes after it sets.
        if not self._folded_unlisted:
            if not to_set and not to_remove:
                return self.headers_always_removed
            # Decisions of one config set few distinct lists of names: one answer for each.
            key = (*(name for name, _ in to_set), "", *to_remove)
            cached = self._removal_by_key.get(key)
            if cached is None:
                cached = self._remove_except(to_set, to_remove)
                if len(self._removal_by_key) < _REMOVAL_CACHE_ENTRIES:
                    self._removal_by_key[key] = cached
            return cached
        set_names = {name for name, _ in to_set}
        names = [*self._remove_except(to_set, to_remove)]
        names += (
            name
            for name in request.headers
            if "_" in name
            and name not in self._removed
            and name not in set_names
            and name.replace("_", "-") in self._folded_unlisted
        )
        return tuple(dict.fromkeys(names))

    def _remove_except(self, to_set: list[tuple[str, str]], to_remove: list[str]) -> tuple[str, ...]:
        set_names = {name for name, _ in to_set}
        names = (*to_remove, *(n for n in self.headers_always_removed if n not in set_names))
        return tuple(dict.fromkeys(names))

    @staticmethod
    def _strip_token(
        request: Request,
        principal: Principal,
        to_set: list[tuple[str, str]],
        to_remove: list[str],
        params_to_remove: list[str],
    ) -> None:
        removal = Removal(to_remove, params_to_remove)
        for source in principal.credential.locations:
            source.remove(removal)
        if removal.cookies:
            remaining = cookie_header_without(request.headers.get("cookie", ""), frozenset(removal.cookies))
            if remaining:
                to_set.append(("cookie", remaining))
            else:
                to_remove.append("cookie")

    def deny(
        self, error: AuthError, rule: RuleSettings | None = None, principal: Principal | None = None
    ) -> Deny:
        headers: list[tuple[str, str]] = []
        status, body_error, description = error.status, error.body_error, error.detail
        custom = rule.deny if rule is not None else None
        if custom is not None and error.status == 403:
            # The rule's own answer (say 404, to hide that the resource exists): no challenge.
            status, body_error, description = custom.status, "access_denied", custom.message
        elif error.status in (400, 401) or error.rfc6750_error == "insufficient_scope":
            headers.append(("www-authenticate", self._challenge(error)))
        if isinstance(error, KeysUnavailable):
            headers.append(("retry-after", str(error.retry_after_seconds)))
        if isinstance(error, UseDPoPNonce):
            headers.append(("dpop-nonce", error.nonce))  # RFC 9449 §9
        headers.append(("content-type", "application/json"))
        headers.append(("cache-control", "no-store"))
        return Deny(
            status=status,
            grpc_code=error.grpc_code,
            code=error.code,
            headers=tuple(headers),
            body=json.dumps({"error": body_error, "error_description": description}),
            rule=rule.name if rule is not None else "",
            provider=principal.provider if principal else None,
            subject=principal.subject if principal else None,
        )

    def _challenge(self, error: AuthError) -> str:
        # RFC 6750 §3: no error attributes when the request carried no credentials at all.
        params = [f'realm="{self._realm}"']
        if error.rfc6750_error:
            params.append(f'error="{error.rfc6750_error}"')
            params.append(f'error_description="{error.detail}"')
        if isinstance(error, InsufficientScope):
            params.append(f'scope="{" ".join(error.scopes)}"')
        if isinstance(error, InsufficientUserAuthentication):
            # RFC 9470 §3: what to authenticate with again.
            if error.acr_values:
                params.append(f'acr_values="{" ".join(error.acr_values)}"')
            if error.max_age is not None:
                params.append(f'max_age="{error.max_age}"')
        if error.scheme == "DPoP" and self._dpop_algorithms:
            params.append(f'algs="{self._dpop_algorithms}"')  # RFC 9449 §7.1
        return f"{error.scheme} " + ", ".join(params)
