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

from collections.abc import Iterable

from ext_authz.errors import MultipleTokenMethods, MultipleTokens
from ext_authz.model import Credential, Request
from ext_authz.sources import Reading, TokenSource

_ORDER = {"header": 0, "cookie": 1, "param": 2}


class CredentialFinder:
    def __init__(self, sources: Iterable[TokenSource]) -> None:
        # Headers, then cookies, then parameters: the order credentials list where a token was.
        self._sources = tuple(sorted(dict.fromkeys(sources), key=lambda s: _ORDER[s.kind]))

    def find(self, request: Request) -> Credential | None:
        """The request's token, None if it has none; raises InvalidRequest when ambiguous."""
        found: dict[str, list[TokenSource]] = {}
        reading = Reading(request)  # cookies and the query are parsed once, not once per name
        for source in self._sources:
            for token in source.read(reading):
                found.setdefault(token, []).append(source)
        if not found:
            return None
        if len(found) > 1:
            raise MultipleTokens()
        ((token, sources),) = found.items()
        unique = tuple(dict.fromkeys(sources))
        if len({s.method for s in unique} - {None}) > 1:
            raise MultipleTokenMethods()
        return Credential(token, unique)
