"""Fetching JWKS documents and OIDC discovery over HTTP(S): bounded in time, size and redirects."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from urllib.parse import urlsplit

import aiohttp

log = logging.getLogger(__name__)

MAX_DOCUMENT_BYTES = 512 * 1024
MAX_REDIRECTS = 3
DISCOVERY_PATH = "/.well-known/openid-configuration"


class FetchError(Exception):
    """A fetch failed; the message is safe to log (no response body)."""


def discovery_url(issuer: str) -> str:
    # OIDC Discovery §4: the issuer with any trailing "/" removed, then the well-known path.
    return issuer.rstrip("/") + DISCOVERY_PATH


class HttpFetcher:
    """One aiohttp session shared by every provider; create inside the running event loop."""

    def __init__(self, *, timeout_seconds: float = 5.0, ca_file: str | None = None) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        ssl_context = ssl.create_default_context(cafile=ca_file)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_context, limit=32),
            timeout=self._timeout,
            headers={"Accept": "application/json", "User-Agent": "ext-authz"},
        )

    async def close(self) -> None:
        await self._session.close()

    async def get_json(self, url: str) -> object:
        try:
            async with self._session.get(url, max_redirects=MAX_REDIRECTS) as response:
                if response.status != 200:
                    raise FetchError(f"HTTP {response.status}")
                if response.url.scheme != urlsplit(url).scheme:
                    raise FetchError("redirected to another scheme")
                declared = response.content_length
                if declared is not None and declared > MAX_DOCUMENT_BYTES:
                    raise FetchError(f"document larger than {MAX_DOCUMENT_BYTES} bytes")
                body = await response.content.read(MAX_DOCUMENT_BYTES + 1)
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise FetchError(f"document larger than {MAX_DOCUMENT_BYTES} bytes")
        except FetchError:
            raise
        except TimeoutError:
            raise FetchError("timed out") from None
        except aiohttp.TooManyRedirects:
            raise FetchError("too many redirects") from None
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            raise FetchError(f"{type(exc).__name__}") from None
        try:
            return json.loads(body)
        except ValueError:
            raise FetchError("response is not JSON") from None

    async def discover_jwks_uri(self, issuer: str) -> str:
        """OIDC Discovery: the issuer's jwks_uri, after checking the document's issuer (§4.3)."""
        document = await self.get_json(discovery_url(issuer))
        if not isinstance(document, dict):
            raise FetchError("discovery document is not a JSON object")
        if document.get("issuer") != issuer:
            raise FetchError("discovery document names a different issuer")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise FetchError("discovery document has no jwks_uri")
        return jwks_uri
