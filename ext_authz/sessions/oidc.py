"""What a browser sign-in needs from an OpenID provider, as values: its endpoints (from discovery)
and the token endpoint's answers (RFC 6749 §5). No I/O here: ``sessions.client`` does the HTTP,
and the decision core sees only the :class:`LoginClient` protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ext_authz.config.model import ProviderSettings
from ext_authz.config.urls import url_problem

# RFC 6749 §5.2 error codes are ASCII words; anything else is shown as "error".
_MAX_ERROR_CHARS = 64
# A token beyond this is refused (it could not travel in cookies or headers anyway).
MAX_TOKEN_CHARS = 32 * 1024


class LoginUnavailable(Exception):
    """The provider's endpoints or token endpoint cannot be reached now (outage, timeout, a bad
    answer). ``outcome`` is a stable label; the message is safe to log (never a token)."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclass(frozen=True, slots=True)
class Endpoints:
    """A provider's OIDC endpoints, from its discovery document."""

    authorization: str
    token: str
    end_session: str | None
    # RFC 9207 §3: the provider says it sends `iss` with every authorization response.
    iss_parameter: bool


def endpoints_from(document: object, provider: ProviderSettings) -> Endpoints:
    """The endpoints a discovery document names, checked like jwks_uri (the provider's URL policy).
    Raises LoginUnavailable naming what is missing or wrong."""
    if not isinstance(document, dict):
        raise LoginUnavailable("invalid", "discovery document is not a JSON object")
    if document.get("issuer") != provider.issuer:
        raise LoginUnavailable("invalid", "discovery document names a different issuer")

    def url(name: str, *, required: bool) -> str | None:
        value = document.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            raise LoginUnavailable("invalid", f"discovery document has no {name}")
        problem = url_problem(value, allow_insecure_http=provider.allow_insecure_http)
        if problem:
            raise LoginUnavailable("invalid", f"{name} {problem}")
        return value

    authorization = url("authorization_endpoint", required=True)
    token = url("token_endpoint", required=True)
    assert authorization is not None and token is not None
    return Endpoints(
        authorization=authorization,
        token=token,
        end_session=url("end_session_endpoint", required=False),
        iss_parameter=document.get("authorization_response_iss_parameter_supported") is True,
    )


@dataclass(frozen=True, slots=True)
class Tokens:
    """A successful token response (RFC 6749 §5.1; OIDC Core §3.1.3.3)."""

    access_token: str = field(repr=False)
    id_token: str | None = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_in: float | None
    scope: str | None


@dataclass(frozen=True, slots=True)
class TokenRefused:
    """The token endpoint said no (RFC 6749 §5.2): ``invalid_grant`` ends a session."""

    error: str


def token_answer(status: int, body: object) -> Tokens | TokenRefused:
    """The token endpoint's answer, judged. Raises LoginUnavailable for what is neither a token
    response nor an RFC 6749 error (an outage page, a 5xx, malformed JSON)."""
    if status in (400, 401) and isinstance(body, dict) and isinstance(body.get("error"), str):
        error = body["error"]
        plain = error.isascii() and error.replace("_", "").isalpha() and len(error) <= _MAX_ERROR_CHARS
        return TokenRefused(error if plain else "error")
    if status != 200:
        raise LoginUnavailable("http_error", f"token endpoint answered HTTP {status}")
    if not isinstance(body, dict):
        raise LoginUnavailable("invalid", "token response is not a JSON object")
    access = body.get("access_token")
    if not isinstance(access, str) or not access:
        raise LoginUnavailable("invalid", "token response has no access_token")
    if len(access) > MAX_TOKEN_CHARS:
        raise LoginUnavailable(
            "invalid", f"token response has an access_token over {MAX_TOKEN_CHARS} characters"
        )
    token_type = body.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise LoginUnavailable("invalid", "token response is not for a Bearer token")
    return Tokens(
        access_token=access,
        id_token=_optional_text(body, "id_token"),
        refresh_token=_optional_text(body, "refresh_token"),
        expires_in=_expires_in(body.get("expires_in")),
        scope=_optional_text(body, "scope"),
    )


def _optional_text(body: Mapping[str, object], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise LoginUnavailable("invalid", f"token response has a malformed {name}")
    if len(value) > MAX_TOKEN_CHARS:
        raise LoginUnavailable("invalid", f"token response has an {name} over {MAX_TOKEN_CHARS} characters")
    return value


def _expires_in(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit():  # some IdPs send "3600"
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 10 * 365 * 86400:
        raise LoginUnavailable("invalid", "token response has a malformed expires_in")
    return float(value)


class LoginClient(Protocol):
    """The seam between the sign-in flow and the network (``sessions.client``)."""

    def endpoints_now(self, provider: str) -> Endpoints | None:
        """The endpoints when known (the request path's shortcut), else None: await ``endpoints``."""
        ...

    async def endpoints(self, provider: ProviderSettings) -> Endpoints:
        """The provider's endpoints (fetched once and refreshed). Raises LoginUnavailable."""
        ...

    async def token_request(
        self, provider: ProviderSettings, endpoints: Endpoints, form: Mapping[str, str]
    ) -> Tokens | TokenRefused:
        """POST ``form`` (plus the client authentication) to the token endpoint, bounded by the
        provider's fetch timeout. Raises LoginUnavailable."""
        ...


class NoLogin:
    """A LoginClient without a network (explain, policy tests): every provider is unreachable."""

    def endpoints_now(self, provider: str) -> Endpoints | None:
        return None

    async def endpoints(self, provider: ProviderSettings) -> Endpoints:
        raise LoginUnavailable("offline", "no network here")

    async def token_request(
        self, provider: ProviderSettings, endpoints: Endpoints, form: Mapping[str, str]
    ) -> Tokens | TokenRefused:
        raise LoginUnavailable("offline", "no network here")
