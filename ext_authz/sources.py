"""Where tokens travel: a header (with its scheme prefix), a cookie, or a query parameter.

One class per place. Each reads its tokens from a request, says how to take them off the request
that goes upstream (``forward_token: false``), puts a token on a request (``explain``, ``test``),
describes itself, and says whether a provider reads tokens there. Adding a place (a session
cookie, a DPoP header) is one more class here and its key in the parser; the credential finder,
the verifier's location check, the response and explain do not change.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal
from urllib.parse import parse_qsl, urlencode

from ext_authz.config.model import ProviderSettings
from ext_authz.errors import EmptyToken
from ext_authz.model import Request


@dataclass(slots=True)
class Removal:
    """What to take off the upstream request so that the token does not travel further."""

    headers: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    cookies: set[str] = field(default_factory=set)


class Reading:
    """A request as the sources read it: its cookies and query parameters are parsed once, on
    first use, however many names the providers configure (the client controls their size)."""

    __slots__ = ("_cookies", "_params", "request")

    def __init__(self, request: Request) -> None:
        self.request = request
        self._cookies: Mapping[str, list[str]] | None = None
        self._params: Mapping[str, list[str]] | None = None

    def cookies(self) -> Mapping[str, list[str]]:
        if self._cookies is None:
            header = self.request.headers.get("cookie")
            self._cookies = _by_name(_cookies(header) if header else ())
        return self._cookies

    def params(self) -> Mapping[str, list[str]]:
        if self._params is None:
            query = self.request.query
            self._params = _by_name(parse_qsl(query, keep_blank_values=True) if query else ())
        return self._params


@dataclass(frozen=True, slots=True)
class HeaderToken:
    """A request header, after a prefix (``Bearer ``: a case-insensitive scheme and spaces)."""

    name: str
    prefix: str = ""
    kind: ClassVar[Literal["header"]] = "header"
    # The RFC 6750 §2 method this place is (None: not one; a cookie is not an RFC 6750 method).
    method: ClassVar[str | None] = "header"

    def read(self, reading: Reading) -> Iterator[str]:
        value = reading.request.headers.get(self.name)
        if value is not None:
            yield from _from_header(value, self.prefix)

    def remove(self, removal: Removal) -> None:
        removal.headers.append(self.name)

    def carry(self, request: Request, token: str) -> Request:
        """``request`` carrying ``token`` here (added to what is there, as a client would)."""
        return _add_header(request, self.name, self.prefix + token, ",")

    def accepted_by(self, provider: ProviderSettings) -> bool:
        if provider.dpop is not None and (self.name, self.prefix) == DPOP_AUTHORIZATION:
            return True
        return any(h.name == self.name and h.prefix == self.prefix for h in provider.from_headers)

    def __str__(self) -> str:
        return f"header {self.name}"


class _Named:
    """A token under a name among the request's name=value pairs (cookies, query parameters)."""

    __slots__ = ()
    name: str
    kind: ClassVar[Literal["cookie", "param"]]
    _configured_in: ClassVar[str]  # the provider setting that lists these names

    def _values(self, reading: Reading) -> Mapping[str, list[str]]:
        raise NotImplementedError

    def read(self, reading: Reading) -> Iterator[str]:
        for value in self._values(reading).get(self.name, ()):
            yield _non_empty(value)

    def accepted_by(self, provider: ProviderSettings) -> bool:
        names: tuple[str, ...] = getattr(provider, self._configured_in)
        return self.name in names

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


@dataclass(frozen=True, slots=True)
class CookieToken(_Named):
    name: str
    kind: ClassVar[Literal["cookie"]] = "cookie"
    method: ClassVar[str | None] = None
    _configured_in: ClassVar[str] = "from_cookies"

    def _values(self, reading: Reading) -> Mapping[str, list[str]]:
        return reading.cookies()

    def remove(self, removal: Removal) -> None:
        removal.cookies.add(self.name)

    def carry(self, request: Request, token: str) -> Request:
        return _add_header(request, "cookie", f"{self.name}={token}", "; ")


@dataclass(frozen=True, slots=True)
class ParamToken(_Named):
    name: str
    kind: ClassVar[Literal["param"]] = "param"
    method: ClassVar[str | None] = "query"
    _configured_in: ClassVar[str] = "from_params"

    def _values(self, reading: Reading) -> Mapping[str, list[str]]:
        return reading.params()

    def remove(self, removal: Removal) -> None:
        removal.params.append(self.name)

    def carry(self, request: Request, token: str) -> Request:
        query = urlencode({self.name: token})
        return replace(request, query=f"{request.query}&{query}" if request.query else query)


TokenSource = HeaderToken | CookieToken | ParamToken


# RFC 9449 §7.1: a DPoP-bound token travels as `Authorization: DPoP <token>` (with `dpop:` set).
DPOP_AUTHORIZATION = ("authorization", "DPoP ")


def provider_sources(provider: ProviderSettings) -> tuple[TokenSource, ...]:
    """Where ``provider`` reads tokens, in the order the config gives: headers, cookies, params
    (and the DPoP scheme, for a provider with ``dpop``)."""
    dpop = (HeaderToken(*DPOP_AUTHORIZATION),) if provider.dpop is not None else ()
    return (
        *(HeaderToken(h.name, h.prefix) for h in provider.from_headers),
        *dpop,
        *(CookieToken(name) for name in provider.from_cookies),
        *(ParamToken(name) for name in provider.from_params),
    )


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


def _by_name(pairs: Iterable[tuple[str, str]]) -> Mapping[str, list[str]]:
    values: dict[str, list[str]] = {}
    for name, value in pairs:
        values.setdefault(name, []).append(value)
    return values


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


def _add_header(request: Request, name: str, value: str, separator: str) -> Request:
    headers = dict(request.headers)
    headers[name] = f"{headers[name]}{separator}{value}" if name in headers else value
    return replace(request, headers=headers)
