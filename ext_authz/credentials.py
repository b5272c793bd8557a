"""Stage 1: find the bearer token in the request.

Every place any provider reads tokens from is searched. Two different tokens are an ambiguous
request, answered 400 invalid_request rather than guessing which one to trust. RFC 6750 §2: a
client uses one method to send the token. Every configured header source is the header method and
every query parameter source the query method (ext-authz reads no bodies), so even the same token
in a header and a query parameter is a 400. A cookie is not an RFC 6750 method: the same token in
a header (or parameter) and a cookie is one credential, and so is the same token in two headers or
two parameters (one method, sent twice).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from urllib.parse import parse_qsl

from ext_authz.errors import EmptyToken, MultipleTokenMethods, MultipleTokens
from ext_authz.model import Credential, Request, TokenLocation

# The RFC 6750 §2 methods ext-authz reads: the request header field and the URI query parameter.
_RFC6750_METHODS = frozenset({"header", "param"})


class CredentialFinder:
    def __init__(self, locations: Iterable[TokenLocation]) -> None:
        unique = tuple(dict.fromkeys(locations))
        self._headers = tuple(loc for loc in unique if loc.kind == "header")
        self._cookies = frozenset(loc.name for loc in unique if loc.kind == "cookie")
        self._params = frozenset(loc.name for loc in unique if loc.kind == "param")

    def find(self, request: Request) -> Credential | None:
        """The request's token, None if it has none; raises InvalidRequest when ambiguous."""
        found: dict[str, list[TokenLocation]] = {}
        for token, location in self._candidates(request):
            found.setdefault(token, []).append(location)
        if not found:
            return None
        if len(found) > 1:
            raise MultipleTokens()
        ((token, locations),) = found.items()
        unique = tuple(dict.fromkeys(locations))
        if len(unique) > 1 and len({loc.kind for loc in unique} & _RFC6750_METHODS) > 1:
            raise MultipleTokenMethods()
        return Credential(token, unique)

    def _candidates(self, request: Request) -> Iterator[tuple[str, TokenLocation]]:
        for location in self._headers:
            value = request.headers.get(location.name)
            if value is not None:
                for token in _from_header(value, location.prefix):
                    yield token, location
        if self._cookies:
            cookie_header = request.headers.get("cookie")
            if cookie_header:
                for name, value in _cookies(cookie_header):
                    if name in self._cookies:
                        yield _non_empty(value), TokenLocation("cookie", name)
        if self._params and request.query:
            for name, value in parse_qsl(request.query, keep_blank_values=True):
                if name in self._params:
                    yield _non_empty(value), TokenLocation("param", name)


def _non_empty(token: str) -> str:
    token = token.strip()
    if not token:
        raise EmptyToken()
    return token


def _from_header(value: str, prefix: str) -> Iterator[str]:
    # Envoy joins repeated headers with ","; a JWT never contains one, so each part is a credential.
    parts = value.split(",")
    if not prefix:
        for part in parts:
            if part.strip():
                yield part.strip()
        return
    wanted = prefix.lower()
    scheme_style = wanted.endswith(" ")  # "Bearer ": a scheme, then one or more spaces
    for part in parts:
        part = part.strip()
        if scheme_style:
            head, _, rest = part.partition(" ")
            # RFC 9110 §11.1: the auth scheme is case-insensitive.
            if head.lower() == wanted.strip():
                yield _non_empty(rest)
        elif part.lower().startswith(wanted):
            yield _non_empty(part[len(wanted) :])


def _cookies(header: str) -> Iterator[tuple[str, str]]:
    # Envoy may join several Cookie headers with ","; cookie values are never raw ",".
    for pair in header.replace(",", ";").split(";"):
        name, sep, value = pair.strip().partition("=")
        if sep:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            yield name.strip(), value


def cookie_header_without(header: str, names: frozenset[str]) -> str:
    """The Cookie header with the named cookies taken out (for forward_token: false)."""
    kept = [
        pair.strip()
        for pair in header.replace(",", ";").split(";")
        if pair.strip() and pair.strip().partition("=")[0].strip() not in names
    ]
    return "; ".join(kept)
