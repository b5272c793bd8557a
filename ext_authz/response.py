"""Stage 4: a decision → what Envoy does with the request. Pure.

On allow, identity headers come from the verified claims; every header name ext-authz owns that the
request carries but this decision does not set is removed, so a client can never get a forged
identity header to the backend. On deny, the answer follows RFC 6750 §3.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from ext_authz.claims import claim_value
from ext_authz.credentials import cookie_header_without
from ext_authz.errors import AuthError, InsufficientScope, KeysUnavailable
from ext_authz.model import Allow, Deny, Principal, Request
from ext_authz.settings import ClaimHeader, RuleSettings, Settings

log = logging.getLogger(__name__)


def _scalar_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    return None


def header_value(value: object) -> str | None:
    """A claim as header text: strings as they are, numbers and booleans as JSON, arrays joined."""
    if isinstance(value, list):
        parts = [_scalar_text(v) for v in value]
        return None if any(p is None for p in parts) else ",".join(p for p in parts if p is not None)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return _scalar_text(value)


def is_safe_header_value(value: str, max_bytes: int = 8192) -> bool:
    """Envoy fails the request on CR, LF or NUL; other controls are illegal too (RFC 9110 §5.5)."""
    if len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        return False
    return not any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value) and value == value.strip(" \t")


@dataclass(frozen=True, slots=True)
class _ProviderHeaders:
    claims: tuple[ClaimHeader, ...]
    payload_header: str | None
    forward_token: bool


class Answers:
    """Builds Allow and Deny values; everything that depends only on the config is computed here once."""

    def __init__(self, settings: Settings) -> None:
        self._realm = settings.realm
        self._max_header_bytes = settings.max_header_value_bytes
        self._providers = {
            p.name: _ProviderHeaders(p.claim_to_headers, p.payload_header, p.forward_token)
            for p in settings.providers
        }
        owned: set[str] = set()
        for p in settings.providers:
            owned.update(c.header for c in p.claim_to_headers)
            if p.payload_header:
                owned.add(p.payload_header)
        for rule in settings.rules:
            owned.update(c.header for c in rule.claim_to_headers)
        self.owned_headers = frozenset(owned)

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
                text = header_value(claim_value(principal.claims, claim_header.path))
                if text is None:
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
        set_names = {name for name, _ in to_set}
        to_remove.extend(
            name for name in sorted(self.owned_headers) if name in request.headers and name not in set_names
        )
        return Allow(
            headers_to_set=tuple(to_set),
            headers_to_remove=tuple(dict.fromkeys(to_remove)),
            query_params_to_remove=tuple(dict.fromkeys(params_to_remove)),
            metadata=metadata,
            rule=rule.name,
            provider=principal.provider if principal else None,
            subject=principal.subject if principal else None,
            reason=reason or ("token" if principal else "anonymous"),
        )

    @staticmethod
    def _strip_token(
        request: Request,
        principal: Principal,
        to_set: list[tuple[str, str]],
        to_remove: list[str],
        params_to_remove: list[str],
    ) -> None:
        cookies = set()
        for location in principal.credential.locations:
            if location.kind == "header":
                to_remove.append(location.name)
            elif location.kind == "param":
                params_to_remove.append(location.name)
            else:
                cookies.add(location.name)
        if cookies:
            remaining = cookie_header_without(request.headers.get("cookie", ""), frozenset(cookies))
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
        return "Bearer " + ", ".join(params)
