"""Fetching JWKS documents and OIDC discovery over HTTP(S): bounded in time, size and redirects."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp

log = logging.getLogger(__name__)

MAX_DOCUMENT_BYTES = 512 * 1024
MAX_REDIRECTS = 3
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
    """What the key cache needs from HTTP (a seam for tests)."""

    async def get_json(self, url: str, *, ssl_context: ssl.SSLContext) -> Document: ...

    async def discover_jwks_uri(self, issuer: str, *, ssl_context: ssl.SSLContext) -> str: ...


class HttpFetcher:
    """One aiohttp session shared by every provider; create inside the running event loop."""

    def __init__(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=32),
            headers={"Accept": "application/json", "User-Agent": "ext-authz"},
        )

    async def close(self) -> None:
        await self._session.close()

    async def get_json(self, url: str, *, ssl_context: ssl.SSLContext) -> Document:
        """GET a JSON document. The caller bounds the time (asyncio.timeout)."""
        try:
            async with self._session.get(
                url,
                max_redirects=MAX_REDIRECTS,
                ssl=ssl_context,
            ) as response:
                if response.status != 200:
                    raise FetchError("http_error", f"HTTP {response.status}")
                if response.url.scheme != urlsplit(url).scheme:
                    raise FetchError("invalid", "redirected to another scheme")
                declared = response.content_length
                if declared is not None and declared > MAX_DOCUMENT_BYTES:
                    raise FetchError("invalid", f"document larger than {MAX_DOCUMENT_BYTES} bytes")
                body = await response.content.read(MAX_DOCUMENT_BYTES + 1)
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise FetchError("invalid", f"document larger than {MAX_DOCUMENT_BYTES} bytes")
                max_age = cache_max_age(response.headers.get("Cache-Control"))
        except FetchError:
            raise
        except aiohttp.TooManyRedirects:
            raise FetchError("invalid", "too many redirects") from None
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            raise FetchError("network_error", type(exc).__name__) from None
        try:
            return Document(json.loads(body), max_age)
        except ValueError:
            raise FetchError("invalid", "response is not JSON") from None

    async def discover_jwks_uri(self, issuer: str, *, ssl_context: ssl.SSLContext) -> str:
        """OIDC Discovery: the issuer's jwks_uri, after checking the document's issuer (§4.3)."""
        document = (await self.get_json(discovery_url(issuer), ssl_context=ssl_context)).body
        if not isinstance(document, dict):
            raise FetchError("invalid", "discovery document is not a JSON object")
        if document.get("issuer") != issuer:
            raise FetchError("invalid", "discovery document names a different issuer")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise FetchError("invalid", "discovery document has no jwks_uri")
        return jwks_uri
