"""What each gateway's authorization request means, and what it needs back (README: Gateways).

Pure: an HTTP request as the listener parsed it → the same ``Request`` the gRPC adapter builds, and
a ``Decision`` → the status, headers and body to answer. The dialect is the listener path the
request came to (configuration), never guessed from headers a client could send.

- ``envoy`` (Envoy's ``http_service``, Istio's ``envoyExtAuthzHttp``): the original method, the
  original path behind the dialect's prefix (Envoy's ``path_prefix``) and the original headers;
  200 allows, with the identity headers (``allowed_upstream_headers``) and the names to remove in
  ``x-envoy-auth-headers-to-remove``; any other status is the client's answer.
- ``nginx`` (``auth_request``): the subrequest carries the client's method and URI in
  ``X-Original-Method`` / ``X-Original-URI`` (names configurable); 2xx allows (identity headers
  for ``auth_request_set``, and the Cookie the backend must get), 401 and 403 go to the client,
  anything else is a 500 there (``error_page`` brings it back).
- ``forward_auth`` (Traefik ForwardAuth, Caddy ``forward_auth``): ``X-Forwarded-Method``,
  ``-Proto``, ``-Host``, ``-Uri``; 2xx allows (``authResponseHeaders`` / ``copy_headers``),
  anything else is the client's answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ext_authz.config.model import HttpSettings
from ext_authz.model import Allow, Decision, Request

REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
# Hop-by-hop and framing headers of the authorization request itself: never the client's.
_OWN_HEADERS = frozenset({"connection", "keep-alive", "content-length", "transfer-encoding", "te", "upgrade"})


class BadAuthorizationRequest(ValueError):
    """The proxy's request lacks what its dialect must carry (a misconfigured proxy): 400."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def _split_target(target: str) -> tuple[str, str]:
    # A request-target has no fragment (RFC 9112 §3.2): a "#" here reached the proxy raw, and a
    # backend may read the path through it (/public/x#/../../orders): refused, not judged in part.
    if "#" in target:
        raise BadAuthorizationRequest("the original URI holds a '#': no request-target has a fragment")
    path, _, query = target.partition("?")
    return path, query


def _one(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if value is None or not value.strip() or ("," in value and name.endswith(("method", "host", "proto"))):
        raise BadAuthorizationRequest(f"the authorization request has no single {name} header")
    return value.strip()


def _scheme(headers: Mapping[str, str]) -> str:
    """X-Forwarded-Proto (default http): http or https, nothing else (a client's own copy may
    reach us through a proxy that passes it on, and the scheme goes into URLs: DPoP's htu)."""
    scheme = headers.get("x-forwarded-proto", "http").strip().lower()
    if scheme not in ("http", "https"):
        raise BadAuthorizationRequest("the authorization request's x-forwarded-proto is not http or https")
    return scheme


class Dialects:
    """The configured dialects by listener path prefix (built once per config)."""

    def __init__(self, settings: HttpSettings) -> None:
        self._prefixes: Sequence[tuple[str, str]] = settings.dialects
        self._method_header = settings.original_method_header
        self._uri_header = settings.original_uri_header

    def dialect_of(self, path: str) -> tuple[str, str] | None:
        """(dialect, the path after its prefix) for a listener path, None when no dialect's."""
        for dialect, prefix in self._prefixes:
            if path == prefix or path.startswith(prefix + "/"):
                return dialect, path[len(prefix) :]
        return None

    def to_request(
        self, dialect: str, rest: str, method: str, query: str, headers: dict[str, str]
    ) -> Request:
        """The client's request as ``dialect`` describes it. Raises BadAuthorizationRequest."""
        for name in _OWN_HEADERS:
            headers.pop(name, None)
        if dialect == "envoy":
            # Envoy: path_prefix + the original path; the original Host; the scheme it forwards.
            return Request(
                method=method,
                path=rest or "/",
                query=query,
                host=headers.get("host", ""),
                headers=headers,
                scheme=_scheme(headers),
            )
        if dialect == "nginx":
            original_method = _one(headers, self._method_header)
            path, original_query = _split_target(_one(headers, self._uri_header))
            return Request(
                method=original_method.upper(),
                path=path,
                query=original_query,
                host=headers.get("host", ""),
                headers=headers,
                scheme=_scheme(headers),
            )
        path, original_query = _split_target(_one(headers, "x-forwarded-uri"))
        host = _one(headers, "x-forwarded-host")
        headers["host"] = host  # the rules' and the backend's host, not the auth endpoint's
        return Request(
            method=_one(headers, "x-forwarded-method").upper(),
            path=path,
            query=original_query,
            host=host,
            headers=headers,
            scheme=_scheme(headers),
        )

    @staticmethod
    def answer(dialect: str, decision: Decision, request: Request) -> Answer:
        if not isinstance(decision, Allow):
            return Answer(decision.status, decision.headers, decision.body.encode("utf-8"))
        headers = [*decision.headers_to_set, *decision.response_headers]
        if dialect == "envoy":
            if decision.headers_to_remove:
                headers.append((REMOVE_HEADER, ",".join(decision.headers_to_remove)))
        elif "cookie" in request.headers and all(name != "cookie" for name, _ in decision.headers_to_set):
            # nginx, Caddy and Traefik can only copy a header from the answer: the Cookie the
            # backend gets is always in it when the client sent one (without the session's
            # cookies, or empty when no other remains; the proxy then drops it).
            kept = "" if "cookie" in decision.headers_to_remove else request.headers["cookie"]
            headers.append(("cookie", kept))
        return Answer(200, tuple(headers), b"")
