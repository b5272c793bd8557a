"""The values that flow through the decision pipeline. No protobuf, no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the places a token travels: ext_authz.sources builds them
    from ext_authz.sources import TokenSource


@dataclass(frozen=True, slots=True)
class Request:
    """An HTTP request as Envoy described it in a CheckRequest.

    ``headers`` has lower-case names; repeated headers are joined with "," (Envoy's own encoding).
    ``path`` excludes the query string, which is in ``query`` (without the "?").
    """

    method: str
    path: str
    query: str = ""
    host: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    context: Mapping[str, str] = field(default_factory=dict)
    scheme: str = ""  # the scheme the client used, as Envoy saw it ("http", "https")
    # The request body, when Envoy sends it (`with_request_body`: the back-channel logout route).
    body: str = field(default="", repr=False)
    # The client's TLS certificate as Envoy sends it (`include_peer_certificate: true`): URL-encoded
    # PEM, "" without one (RFC 8705 certificate-bound tokens).
    peer_certificate: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class Credential:
    """A token found in a request, with every place it was found (the same token may be sent twice)."""

    token: str = field(repr=False)  # a repr (a log line, a traceback) never carries the token
    locations: tuple[TokenSource, ...]


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified identity: the provider that vouched for it and the token's verified claims."""

    provider: str
    claims: Mapping[str, object]
    # The token's payload segment: base64url of the claims JSON, as signed by the issuer.
    payload_segment: str
    credential: Credential
    # The tenant of a multi-tenant issuer (`issuer: .../{tenant}/...`), else None.
    tenant: str | None = None
    # The checks beyond the signature that held (tenant, introspection, DPoP, certificate binding):
    # (check, verdict) pairs for explain.
    checks: tuple[tuple[str, str], ...] = ()

    @property
    def subject(self) -> str | None:
        sub = self.claims.get("sub")
        return sub if isinstance(sub, str) else None


@dataclass(frozen=True, slots=True)
class WouldDeny:
    """The denial a dry-run rule recorded instead of answering with it."""

    status: int
    code: str


@dataclass(frozen=True, slots=True)
class Allow:
    """Let the request through, rewriting its headers for the upstream."""

    headers_to_set: tuple[tuple[str, str], ...] = ()
    headers_to_remove: tuple[str, ...] = ()
    query_params_to_remove: tuple[str, ...] = ()
    metadata: Mapping[str, object] = field(default_factory=dict)
    rule: str = ""
    provider: str | None = None
    subject: str | None = None
    # Why the request is allowed, for logs and metrics: "token", "session", "anonymous" or "dry_run".
    reason: str = "token"
    # Set in dry-run mode (reason "dry_run"): the denial the request would have had.
    would_deny: WouldDeny | None = None
    # Headers added to the response the client gets (a renewed session's Set-Cookie lines).
    response_headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Deny:
    """Answer the client directly with ``status``, ``headers`` and ``body``."""

    status: int
    grpc_code: int
    code: str
    headers: tuple[tuple[str, str], ...]
    body: str
    rule: str = ""
    provider: str | None = None
    subject: str | None = None


Decision = Allow | Deny


def reason_of(decision: Decision) -> str:
    """The reason logs and traces show: a denial's code, else "token" or "anonymous", and for a
    dry-run allow "dry_run:<code>" (the code of the denial it would have had)."""
    if isinstance(decision, Deny):
        return decision.code
    if decision.would_deny is not None:
        return f"{decision.reason}:{decision.would_deny.code}"
    return decision.reason
