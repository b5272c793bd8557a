"""The HTTP authorization listener in the test's own loop, on 127.0.0.1:0, over a fixed pipeline:
an anonymous /public/* and a token rule for everything else, x-user-id from `sub`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from ext_authz.compiled import compile
from ext_authz.identity import KeyResolver
from ext_authz.pipeline import Pipeline
from ext_authz.transport.http import HttpAuthorizer, HttpListener
from ext_authz.transport.servicer import AuthorizationServicer
from tests.support.tokens import clock, make_settings

RULES = [
    {"name": "public", "match": {"paths": ["/public/*"]}, "allow": "anonymous"},
    {"name": "api", "match": {"paths": ["/*"]}, "require": {}},
]


@contextlib.asynccontextmanager
async def running_listener(resolver: KeyResolver) -> AsyncIterator[HttpListener]:
    """A started listener (``.bound`` is its address), stopped on exit."""
    settings = make_settings(
        provider={"claim_to_headers": [{"header": "x-user-id", "claim": "sub"}]},
        rules=RULES,
        listen_http="127.0.0.1:0",
    )
    pipeline = Pipeline(compile(settings), resolver, clock=clock)
    listener = HttpListener("127.0.0.1:0", HttpAuthorizer(AuthorizationServicer(pipeline)))
    await listener.start()
    try:
        yield listener
    finally:
        await listener.stop(1.0)
