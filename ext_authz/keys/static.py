"""A KeyResolver over fixed key sets: nothing is fetched (explain's ``--jwks``, the policy tests).

Keys are chosen as the KeyStore chooses them (``select_key``: no key, or several that fit, is
UnknownKey), and a provider without keys is KeysUnavailable, as a KeyStore with none is.
"""

from __future__ import annotations

from collections.abc import Mapping

from ext_authz.errors import KeysUnavailable
from ext_authz.keys.jwks import KeySet, VerificationKey, select_key

# What a provider without keys tells the client to wait (there is nothing to wait for here).
RETRY_AFTER_SECONDS = 7


class StaticKeys:
    """Keys by provider name; ``keys``, when given, for every provider not listed."""

    def __init__(
        self, by_provider: Mapping[str, KeySet] | None = None, *, keys: KeySet | None = None
    ) -> None:
        self.by_provider = dict(by_provider or {})
        self._shared = keys

    @property
    def keys(self) -> KeySet:
        """The keys of every provider not listed (empty: such a provider has none)."""
        return self._shared if self._shared is not None else KeySet(())

    def add(self, provider: str, keys: KeySet) -> None:
        self.by_provider[provider] = keys

    def key_now(self, provider: str, kid: str | None, alg: str) -> VerificationKey | None:
        return None  # key_for answers every case at once

    async def key_for(self, provider: str, kid: str | None, alg: str) -> VerificationKey:
        keys = self.by_provider.get(provider, self._shared)
        if keys is None:
            raise KeysUnavailable(retry_after_seconds=RETRY_AFTER_SECONDS)
        return select_key(keys.candidates(kid, alg), kid)
