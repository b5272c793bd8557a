"""ProviderKeys under test: an injected clock, a scripted fetcher and the constructor's defaults
(tests/unit/test_key_store.py, test_key_refetch.py)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

from ext_authz.config.model import JwksCacheSettings, ProviderSettings
from ext_authz.keys.cache import SharedKeyCache
from ext_authz.keys.fetch import Document, FetchError
from ext_authz.keys.provider import ProviderKeys
from tests.support.idp import SigningKey
from tests.support.tokens import NOW, make_settings

JWKS_URI = "https://idp.example.com/jwks"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class ScriptedFetcher:
    """Serves whatever ``document`` is (a JWKS dict, a FetchError to raise, or a callable)."""

    def __init__(self, document: object) -> None:
        self.document = document
        self.max_age: float | None = None
        self.delay = 0.0
        self.jwks_fetches = 0
        self.discoveries = 0
        self.allow_insecure_http: list[bool] = []  # the flag each call was given

    async def get_json(self, url: str, *, ssl_context: ssl.SSLContext, allow_insecure_http: bool) -> Document:
        self.jwks_fetches += 1
        self.allow_insecure_http.append(allow_insecure_http)
        document = self.document  # what the IdP publishes when the request reaches it
        if self.delay:
            await asyncio.sleep(self.delay)
        if isinstance(document, FetchError):
            raise document
        return Document(document, self.max_age)

    async def discover_jwks_uri(
        self,
        issuer: str,
        *,
        ssl_context: ssl.SSLContext,
        allow_insecure_http: bool,
        also_named: tuple[str, ...] = (),
    ) -> str:
        self.discoveries += 1
        self.allow_insecure_http.append(allow_insecure_http)
        return JWKS_URI


def provider(**policy: Any) -> ProviderSettings:
    return make_settings(provider={"jwks_uri": JWKS_URI, **policy}).providers[0]


def jwks(*keys: SigningKey) -> dict[str, Any]:
    return {"keys": [k.jwk() for k in keys]}


def make(
    fetcher: ScriptedFetcher,
    clock: Clock,
    cache: SharedKeyCache | None = None,
    on_change: Callable[[], None] = lambda: None,
    **policy: Any,
) -> ProviderKeys:
    return ProviderKeys(
        provider(**policy), fetcher, cache, clock=clock, on_change=on_change, jitter=lambda low, high: high
    )


async def started(keys: ProviderKeys) -> ProviderKeys:
    assert await keys.refresh(from_idp=True) in ("installed", "failed")
    return keys


def memory_cache() -> SharedKeyCache:
    return SharedKeyCache(JwksCacheSettings())
