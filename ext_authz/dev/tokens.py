"""Token minting for the development issuer: claims from the command line, signed by the key
directory's signing key with the project's one signer (ext_authz.jws)."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence

from ext_authz import jws
from ext_authz.dev.errors import DevIssuerError
from ext_authz.dev.keys import KeyDir

DEFAULT_TTL = 3600

# ext-authz's default leeway on exp (README: clock_skew_seconds): a token that expired less than
# this long ago is still accepted, which surprises whoever mints "an expired token" with --ttl -1.
CLOCK_SKEW_SECONDS = 60


def parse_claim(text: str) -> tuple[str, object]:
    """`NAME=VALUE`: VALUE is JSON when it parses as JSON (true, 42, ["a"]), else a string."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise DevIssuerError(f"--claim {text!r}: expected NAME=VALUE")
    try:
        value: object = json.loads(raw)
    except ValueError:
        value = raw
    return name, value


def mint(
    key_dir: KeyDir,
    *,
    subject: str,
    scope: str | None = None,
    audience: str | None = None,
    ttl: int = DEFAULT_TTL,
    claims: Sequence[tuple[str, object]] = (),
    issuer: str | None = None,
    now: int | None = None,
) -> str:
    """A token signed with the key directory's signing key.

    A negative `ttl` gives an expired token; it is dated as issued `DEFAULT_TTL` seconds before it
    expired. `claims` are applied last and may replace any default (iss, aud, exp, ...).
    """
    key = key_dir.signing_key()
    if issuer is None or audience is None:
        saved = key_dir.settings()
        issuer = issuer or saved.issuer
        audience = audience or saved.audience
    issued = int(time.time()) if now is None else now
    expires = issued + ttl
    payload: dict[str, object] = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "iat": issued if ttl > 0 else expires - DEFAULT_TTL,
        "exp": expires,
        "jti": secrets.token_urlsafe(12),
    }
    if scope is not None:
        payload["scope"] = scope
    payload.update(claims)
    if not isinstance(payload["iss"], str):
        raise TypeError("Issuer (iss) must be a string.")  # as PyJWT's encoder, which signed before
    # The header PyJWT wrote: its members sorted, so a token's bytes are as they were.
    return jws.sign({"alg": key.alg, "kid": key.kid, "typ": "JWT"}, payload, key.private_key, key.alg)
