"""OIDC Back-Channel Logout 1.0 (§2.5-2.8, ``store: redis``): a logout token POSTed by the IdP,
verified, and every session of its ``sid`` (else its ``sub``) ended. Answered on the front (the
Check) and on the admin listener."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from urllib.parse import parse_qs

from ext_authz import errors
from ext_authz.browser.pages import busy
from ext_authz.browser.stores import log_store_down
from ext_authz.config.model import ProviderSettings
from ext_authz.handoff import on_loop
from ext_authz.identity import Verifier, parse_token
from ext_authz.sessions.oidc import LoginUnavailable
from ext_authz.sessions.session import SessionEvents, SessionStore, index_key

log = logging.getLogger("ext_authz.browser.flow")

MAX_LOGOUT_BODY = 16 * 1024


async def backchannel_logout(
    body: str,
    *,
    providers: Mapping[str, ProviderSettings],
    verifier: Verifier,
    store: SessionStore,
    events: SessionEvents,
    clock: Callable[[], float],
    max_token_bytes: int,
) -> tuple[int, str]:
    """OIDC Back-Channel Logout 1.0 (§2.5-2.8): the POSTed logout token verified, every
    session of its ``sid`` (else of its ``sub``) ended. The status and JSON body to answer."""
    refused = 400, json.dumps({"error": "invalid_request"})
    if len(body) > MAX_LOGOUT_BODY:
        return refused
    try:
        tokens = parse_qs(body, keep_blank_values=True, max_num_fields=8).get("logout_token", [])
    except ValueError:  # more fields than a logout POST has
        return refused
    if len(tokens) != 1:
        return refused
    try:
        issuer = parse_token(tokens[0], max_token_bytes).claims.get("iss")
        provider = next((p for p in providers.values() if p.issuer == issuer), None)
        if provider is None or provider.login is None:
            raise errors.UnknownIssuer()
        claims = await verifier.verify_logout_token(
            tokens[0], provider.name, client_id=provider.login.client_id
        )
    except errors.KeysUnavailable:
        return 503, json.dumps({"error": "temporarily_unavailable"})
    except errors.AuthError as error:
        log.info("back-channel logout refused", extra={"fields": {"reason": error.code}})
        events.count("logout", "backchannel_refused")
        return refused
    sid, sub = claims.get("sid"), claims.get("sub")
    kind, value = ("sid", sid) if isinstance(sid, str) and sid else ("sub", sub)
    assert isinstance(value, str)
    try:
        jti, exp = claims["jti"], claims["exp"]  # both required (verify_logout_token)
        assert isinstance(jti, str) and isinstance(exp, int | float)
        # Remembered until the token expires: a replay is refused for as long as it is valid.
        remember = math.ceil(exp - clock() + provider.clock_skew_seconds) + 1
        marker = index_key("jti", provider.name, jti)
        if not await on_loop(store.first_use(marker, max(1, remember)), busy=busy()):
            log.info("back-channel logout refused", extra={"fields": {"reason": "replayed"}})
            events.count("logout", "backchannel_refused")
            return refused
        ended = await on_loop(store.end(index_key(kind, provider.name, value)), busy=busy())
    except LoginUnavailable as exc:
        log_store_down(exc)
        return 503, json.dumps({"error": "temporarily_unavailable"})
    log.info("back-channel logout", extra={"fields": {"provider": provider.name, "by": kind, "ended": ended}})
    events.count("logout", "backchannel")
    return 200, "{}"
