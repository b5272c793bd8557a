"""Why a request is denied: one class per reason.

Each class knows everything the edges need to answer: the HTTP status Envoy sends to the client,
the RFC 6750 error code for ``WWW-Authenticate`` (None where the RFC says to send none), the gRPC
status code for ``CheckResponse.status``, a stable ``code`` for logs and metric labels, and a
description in general words. Descriptions are fixed strings: they never echo token content, and
they contain no characters that would need escaping inside an RFC 7235 quoted-string.

Stages raise these; the pipeline turns them into a ``Deny`` value. Nothing here reaches gRPC as an
exception.
"""

from __future__ import annotations

from typing import ClassVar

# google.rpc.Code values used in CheckResponse.status (Envoy only tests code == 0).
GRPC_OK = 0
GRPC_PERMISSION_DENIED = 7
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16


class AuthError(Exception):
    """Base of every denial reason."""

    status: ClassVar[int] = 401
    rfc6750_error: ClassVar[str | None] = None
    grpc_code: ClassVar[int] = GRPC_UNAUTHENTICATED
    code: ClassVar[str] = "unauthorized"
    description: ClassVar[str] = "the request is not authorized"
    # The `error` member of the JSON body where RFC 6750 has no code (RFC 6749 §4.1.2.1 names).
    body_code: ClassVar[str | None] = None
    # The authentication scheme of the challenge (RFC 9449 §7.1: "DPoP" for DPoP's denials).
    scheme: ClassVar[str] = "Bearer"

    def __init__(self, description: str | None = None) -> None:
        # A subclass may pass a more precise fixed description; never pass token content.
        self.detail = description or self.description
        super().__init__(self.detail)

    @property
    def body_error(self) -> str:
        """The ``error`` member of the JSON body: the RFC 6750 code, else an OAuth or stable code."""
        return self.rfc6750_error or self.body_code or self.code


class MissingToken(AuthError):
    """No credential where one is required (RFC 6750 §3.1: no error code in the challenge)."""

    code = "missing_token"
    description = "a bearer token is required"


class InvalidRequest(AuthError):
    """The request itself is malformed, e.g. it carries two different tokens (RFC 6750 §2)."""

    status = 400
    rfc6750_error = "invalid_request"
    code = "invalid_request"
    description = "the request is malformed"


class MultipleTokens(InvalidRequest):
    code = "multiple_tokens"
    description = "the request carries more than one token"


class MultipleTokenMethods(InvalidRequest):
    """The token is sent by more than one RFC 6750 method: header and query parameter (§2: one).

    Even the same token: a client that puts it in the URL too leaks it to logs and Referer
    headers, and two copies invite two components to disagree on which one was checked.
    """

    code = "multiple_token_methods"
    description = "the token is sent by more than one method"


class EmptyToken(InvalidRequest):
    code = "empty_token"
    description = "the authorization scheme carries no token"


class AmbiguousPath(InvalidRequest):
    """Backends could read the path as resources that different rules (or parameters) guard."""

    code = "ambiguous_path"
    description = "the request path can be read as different resources"


class InvalidHost(InvalidRequest):
    """The authority is not one host in a spelling that can be read with certainty."""

    code = "invalid_host"
    description = "the request host is malformed"


class InvalidToken(AuthError):
    """The token is expired, forged, malformed or not meant for us (RFC 6750 §3.1 invalid_token)."""

    rfc6750_error = "invalid_token"
    code = "invalid_token"
    description = "the token is invalid"


class TokenTooLarge(InvalidToken):
    code = "token_too_large"
    description = "the token is too large"


class MalformedToken(InvalidToken):
    code = "malformed_token"
    description = "the token is malformed"


class UnsupportedAlgorithm(InvalidToken):
    code = "algorithm_not_allowed"
    description = "the token algorithm is not allowed"


class UnsupportedCritical(InvalidToken):
    code = "critical_header_unsupported"
    description = "the token requires an unsupported critical header extension"


class UnsupportedB64Header(InvalidToken):
    """``b64`` in the JWS header (RFC 7797, any value, with or without ``crit``): not implemented.

    A recipient that implements RFC 7797 and one that does not read different payloads from the
    same JWS; rather than pick one reading, the token is refused.
    """

    code = "b64_header_unsupported"
    description = "the token b64 header parameter of RFC 7797 is not supported"


class TokenTypeNotAccepted(InvalidToken):
    code = "token_type_not_accepted"
    description = "the token type is not accepted"


class UnknownIssuer(InvalidToken):
    code = "unknown_issuer"
    description = "the token issuer is not trusted"


class IssuerNotAccepted(InvalidToken):
    code = "issuer_not_accepted"
    description = "the token issuer is not accepted for this resource"


class TokenLocationNotAccepted(InvalidToken):
    code = "token_location_not_accepted"
    description = "the token issuer does not accept tokens sent this way"


class UnknownKey(InvalidToken):
    code = "unknown_key"
    description = "no key of the token issuer matches the token"


class BadSignature(InvalidToken):
    code = "bad_signature"
    description = "the token signature is invalid"


class InvalidClaim(InvalidToken):
    code = "invalid_claim"
    description = "a token claim is invalid"


class TokenExpired(InvalidToken):
    code = "token_expired"
    description = "the token has expired"


class TokenNotYetValid(InvalidToken):
    code = "token_not_yet_valid"
    description = "the token is not yet valid"


class TokenIssuedInFuture(InvalidToken):
    code = "token_issued_in_future"
    description = "the token was issued in the future"


class AudienceMismatch(InvalidToken):
    """No audience of the token is one the provider accepts (``audiences``)."""

    code = "audience_mismatch"
    description = "the token audience is not accepted"


class TenantNotAllowed(InvalidToken):
    """The token's issuer fits the provider's issuer template, for a tenant not in ``tenants``
    (or its ``tid`` claim names another tenant than its issuer)."""

    code = "tenant_not_allowed"
    description = "the token tenant is not accepted"


class TokenInactive(InvalidToken):
    """The issuer's introspection endpoint says the token is not active (RFC 7662 §2.2)."""

    code = "token_inactive"
    description = "the token is not active"


class InvalidDPoPProof(AuthError):
    """The DPoP proof is missing, malformed, or does not fit this request or token (RFC 9449 §7.1)."""

    rfc6750_error = "invalid_dpop_proof"
    code = "invalid_dpop_proof"
    description = "the DPoP proof is invalid"
    scheme = "DPoP"


class UseDPoPNonce(InvalidDPoPProof):
    """The proof lacks the server's current nonce (RFC 9449 §9): the answer carries a fresh one."""

    rfc6750_error = "use_dpop_nonce"
    code = "use_dpop_nonce"
    description = "the DPoP proof must carry the server nonce"

    def __init__(self, nonce: str) -> None:
        super().__init__()
        self.nonce = nonce


class DPoPBindingMismatch(InvalidToken):
    """A DPoP-bound token sent without its proof (as a bearer token), a bound token whose
    ``cnf.jkt`` is not the proof key's thumbprint, or an unbound token sent with the DPoP scheme."""

    code = "dpop_binding_mismatch"
    description = "the token is not bound to the DPoP proof key"
    scheme = "DPoP"


class CertificateBindingMismatch(InvalidToken):
    """A certificate-bound token (``cnf["x5t#S256"]``, RFC 8705 §3) without the client certificate
    it is bound to: none was presented, or another one was."""

    code = "certificate_binding_mismatch"
    description = "the token is not bound to the client certificate"


class InsufficientScope(AuthError):
    """Valid token, but a required scope is missing (RFC 6750 §3.1 insufficient_scope)."""

    status = 403
    rfc6750_error = "insufficient_scope"
    grpc_code = GRPC_PERMISSION_DENIED
    code = "insufficient_scope"
    description = "the token lacks a required scope"

    def __init__(self, scopes: tuple[str, ...]) -> None:
        super().__init__()
        self.scopes = scopes


class InsufficientUserAuthentication(AuthError):
    """The token's authentication is not strong or recent enough (RFC 9470): the client may sign
    the user in again with the ``acr_values`` and ``max_age`` the challenge names."""

    rfc6750_error = "insufficient_user_authentication"
    code = "insufficient_user_authentication"
    description = "a stronger or more recent authentication is required"

    def __init__(self, acr_values: tuple[str, ...] = (), max_age: int | None = None) -> None:
        super().__init__()
        self.acr_values = acr_values
        self.max_age = max_age


class AccessDenied(AuthError):
    """The request is not allowed, whoever makes it (no rule matches it)."""

    status = 403
    grpc_code = GRPC_PERMISSION_DENIED
    code = "access_denied"
    body_code = "access_denied"
    description = "access to this resource is denied"


class RequirementNotMet(AccessDenied):
    code = "requirement_not_met"
    description = "the token does not grant access to this resource"


class NoMatchingRule(AccessDenied):
    code = "no_matching_rule"
    description = "no rule allows this request"


class KeysUnavailable(AuthError):
    """The issuer's keys cannot be had right now: the token may be fine, so not a 401."""

    status = 503
    grpc_code = GRPC_UNAVAILABLE
    code = "keys_unavailable"
    body_code = "temporarily_unavailable"
    description = "the token issuer's keys are temporarily unavailable"

    def __init__(self, retry_after_seconds: int = 5) -> None:
        super().__init__()
        self.retry_after_seconds = retry_after_seconds


class KeyPending(KeysUnavailable):
    """The token's ``kid`` is not in the cached keys and no IdP fetch since it was first seen has
    come back yet (rate-limited, failed or slow): it may be a key published a moment ago, so 503
    with Retry-After rather than a 401 that would be wrong for a valid token."""

    code = "key_pending"
    description = "the token's key is being fetched from its issuer"


class IntrospectionUnavailable(KeysUnavailable):
    """No introspection endpoint could answer in time: the token may be fine, so not a 401."""

    code = "introspection_unavailable"
    description = "the token issuer cannot check the token right now"


class ReplayCheckUnavailable(KeysUnavailable):
    """The replicas' shared memory of DPoP proofs (Redis) cannot be reached: without it a proof
    replayed at another replica would pass, so the request waits (503) rather than pass."""

    code = "dpop_replay_check_unavailable"
    description = "the DPoP proof cannot be checked for replay right now"


class InternalError(AuthError):
    """A bug: answered as a clean 500 denial (fail closed), never as a gRPC error."""

    status = 500
    grpc_code = GRPC_INTERNAL
    code = "internal_error"
    body_code = "server_error"
    description = "the authorization service failed"


class LoginUnavailable(KeysUnavailable):
    """A session's tokens need the identity provider (a refresh, a sign-in) and it cannot be
    reached: 503 with Retry-After, never a sign-in loop."""

    code = "login_unavailable"
    description = "the identity provider is temporarily unavailable"
