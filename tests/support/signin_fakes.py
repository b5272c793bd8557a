"""Fakes for the sign-in flow's unit tests: a scripted LoginClient and the endpoints it names."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from ext_authz.sessions.oidc import Endpoints, TokenRefused, Tokens

ENDPOINTS = Endpoints(
    authorization="https://idp.example.com/authorize",
    token="https://idp.example.com/token",
    end_session="https://idp.example.com/logout",
    iss_parameter=False,
)


class FakeLogin:
    """A LoginClient whose token endpoint answers what the test scripts (``answers``, in order)
    and records the forms sent; with ``gate`` set, a refresh waits for it (``entered`` is set
    once one waits)."""

    def __init__(self) -> None:
        self.answers: list[Tokens | TokenRefused] = []
        self.forms: list[Mapping[str, str]] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    def endpoints_now(self, provider: str) -> Endpoints | None:
        return ENDPOINTS

    async def endpoints(self, provider: Any) -> Endpoints:
        return ENDPOINTS

    async def token_request(self, provider: Any, endpoints: Endpoints, form: Mapping[str, str]) -> Any:
        self.forms.append(dict(form))
        answer = self.answers.pop(0)
        if form.get("grant_type") == "refresh_token" and self.gate is not None:
            self.entered.set()
            await self.gate.wait()
        return answer
