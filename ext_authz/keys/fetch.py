"""Fetching JWKS documents and OIDC discovery over HTTP(S): bounded in time, size and redirects."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urldefrag, urljoin

import aiohttp

from ext_authz.config.urls import url_problem

log = logging.getLogger(__name__)

MAX_DOCUMENT_BYTES = 512 * 1024
MAX_REDIRECTS = 3
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DISCOVERY_PATH = "/.well-known/openid-configuration"


class FetchError(Exception):
    """A fetch failed. ``outcome`` is a stable label for logs and metrics; the message is safe to log."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclass(frozen=True, slots=True)
class Document:
    body: object  # decoded JSON
    max_age: float | None  # from Cache-Control, when the server sent one


def discovery_url(issuer: str) -> str:
    # OIDC Discovery §4: the issuer with any trailing "/" removed, then the well-known path.
    return issuer.rstrip("/") + DISCOVERY_PATH


def cache_max_age(header: str | None) -> float | None:
    """Seconds from ``Cache-Control: max-age=N``; no-store/no-cache mean 0 (refetch soon)."""
    if not header:
        return None
    max_age: float | None = None
    for directive in header.lower().split(","):
        name, _, value = directive.strip().partition("=")
        if name in ("no-store", "no-cache"):
            return 0.0
        if name == "max-age" and value.strip().strip('"').isdigit():
            max_age = float(value.strip().strip('"'))
    return max_age


class Fetcher(Protocol):
    """What the key cache needs from HTTP (a seam for tests).

    ``allow_insecure_http`` is the provider's own flag: the URL policy
    (``settings.url_problem``) applied to the URL and to every redirect hop.
    """

    async def get_json(
        self, url: str, *, ssl_context: ssl.SSLContext, allow_insecure_http: bool
    ) -> Document: ...

    async def discover_jwks_uri(
        self,
        issuer: str,
        *,
        ssl_context: ssl.SSLContext,
        allow_insecure_http: bool,
        also_named: tuple[str, ...] = (),
    ) -> str: ...


def decode_json(body: bytes) -> object:
    """JSON text → value. An object that repeats a member name is ambiguous (RFC 8259 §4: parsers
    disagree on which value counts) and is decoded as its list of ``[name, value]`` pairs, which
    no reader of these documents takes for an object: such a key is skipped, such a document
    refused. The list survives the shared cache's JSON round trip, so every process agrees."""
    try:
        return json.loads(body, object_pairs_hook=_object)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        raise FetchError("invalid", "response is not JSON") from None


def _object(pairs: list[tuple[str, object]]) -> object:
    if len({name for name, _ in pairs}) == len(pairs):
        return dict(pairs)
    return [[name, value] for name, value in pairs]


def redirect_target(current: str, location: str | None, status: int) -> str:
    """Where a redirect answer points: ``Location`` resolved against the current URL (RFC 9110
    §10.2.2), without its fragment (a fragment names a part of a document, not a resource)."""
    if not location:
        raise FetchError("invalid", f"HTTP {status} redirect without a Location")
    try:
        return urldefrag(urljoin(current, location.strip())).url
    except ValueError:
        raise FetchError("invalid", "redirect to a malformed URL") from None


@functools.cache
def client_ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """The TLS context for requests to an IdP that trusts ``ca_file`` (None: the system's CAs),
    made once per file (a provider's ``ca_file``: its login, introspection and key requests)."""
    return ssl.create_default_context(cafile=ca_file)


class HttpFetcher:
    """One aiohttp session shared by every provider; create inside the running event loop."""

    def __init__(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=32),
            headers={"Accept": "application/json", "User-Agent": "ext-authz"},
        )

    async def close(self) -> None:
        await self._session.close()

    async def get_json(self, url: str, *, ssl_context: ssl.SSLContext, allow_insecure_http: bool) -> Document:
        """GET a JSON document. The caller bounds the time (asyncio.timeout).

        Redirects are followed here, not by aiohttp, so that the URL policy is applied to every
        hop before it is requested: https → http → https is refused at the http hop.
        """
        current = url
        for hop in range(MAX_REDIRECTS + 1):
            try:
                problem = url_problem(current, allow_insecure_http=allow_insecure_http)
            except ValueError:  # urlsplit: e.g. an unbalanced "[" in the host
                problem = "must be an absolute http(s) URL"
            if problem:
                raise FetchError("invalid", f"redirect target {problem}" if hop else f"URL {problem}")
            body, location, max_age = await self._get(current, ssl_context)
            if location is None:
                return Document(decode_json(body), max_age)
            current = location
        raise FetchError("invalid", "too many redirects")

    async def _get(self, url: str, ssl_context: ssl.SSLContext) -> tuple[bytes, str | None, float | None]:
        """One request: the whole body, or where a redirect points (then the body is b"")."""
        with _as_fetch_errors():
            async with self._session.get(url, allow_redirects=False, ssl=ssl_context) as response:
                if response.status in REDIRECT_STATUSES:
                    target = redirect_target(url, response.headers.get("Location"), response.status)
                    return b"", target, None
                if response.status != 200:
                    raise FetchError("http_error", f"HTTP {response.status}")
                declared = response.content_length
                if declared is not None and declared > MAX_DOCUMENT_BYTES:
                    raise FetchError("invalid", f"document larger than {MAX_DOCUMENT_BYTES} bytes")
                body = await _read_body(response.content)
                return body, None, cache_max_age(response.headers.get("Cache-Control"))

    async def post_form(
        self,
        url: str,
        form: Mapping[str, str],
        *,
        headers: Mapping[str, str],
        ssl_context: ssl.SSLContext,
        allow_insecure_http: bool,
    ) -> tuple[int, object]:
        """POST an application/x-www-form-urlencoded body (a token request, RFC 6749 §4.1.3): the
        status and the decoded JSON answer (None when the body is not JSON). Redirects are not
        followed (a token endpoint has no business redirecting a client's secret elsewhere). The
        caller bounds the time."""
        try:
            problem = url_problem(url, allow_insecure_http=allow_insecure_http)
        except ValueError:
            problem = "must be an absolute http(s) URL"
        if problem:
            raise FetchError("invalid", f"URL {problem}")
        with _as_fetch_errors():
            async with self._session.post(
                url, data=dict(form), headers=dict(headers), allow_redirects=False, ssl=ssl_context
            ) as response:
                declared = response.content_length
                if declared is not None and declared > MAX_DOCUMENT_BYTES:
                    raise FetchError("invalid", f"answer larger than {MAX_DOCUMENT_BYTES} bytes")
                body = await _read_body(response.content)
                try:
                    decoded = decode_json(body)
                except FetchError:
                    decoded = None
                return response.status, decoded

    async def discover_jwks_uri(
        self,
        issuer: str,
        *,
        ssl_context: ssl.SSLContext,
        allow_insecure_http: bool,
        also_named: tuple[str, ...] = (),
    ) -> str:
        """OIDC Discovery: the issuer's jwks_uri, after checking the document's issuer (§4.3):
        ``issuer`` itself, or one of ``also_named`` (a multi-tenant IdP's common document names
        its issuer template)."""
        fetched = await self.get_json(
            discovery_url(issuer), ssl_context=ssl_context, allow_insecure_http=allow_insecure_http
        )
        document = fetched.body
        if not isinstance(document, dict):
            raise FetchError("invalid", "discovery document is not a JSON object")
        named = document.get("issuer")
        if named != issuer and named not in also_named:
            raise FetchError("invalid", "discovery document names a different issuer")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise FetchError("invalid", "discovery document has no jwks_uri")
        return jwks_uri


@contextlib.contextmanager
def _as_fetch_errors() -> Iterator[None]:
    """What aiohttp and the network raise, as FetchError (a stable outcome, a safe message)."""
    try:
        yield
    except FetchError:
        raise
    except aiohttp.InvalidURL:
        raise FetchError("invalid", "malformed URL") from None
    except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
        # A body shorter than its Content-Length, or cut off, is a ClientPayloadError here.
        raise FetchError("network_error", type(exc).__name__) from None
    except ValueError:  # yarl: a URL it cannot represent (port out of range, ...)
        raise FetchError("invalid", "malformed URL") from None


async def _read_body(content: aiohttp.StreamReader) -> bytes:
    """The body to its end (``read(n)`` returns only what has arrived so far), refused as soon as
    more than MAX_DOCUMENT_BYTES have arrived, whether or not a Content-Length was sent."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in content.iter_any():
        size += len(chunk)
        if size > MAX_DOCUMENT_BYTES:
            raise FetchError("invalid", f"document larger than {MAX_DOCUMENT_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
