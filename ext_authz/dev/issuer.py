"""The development issuer's HTTP app: OIDC discovery and the JWKS of the key directory."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from typing import TextIO
from urllib.parse import urlsplit

from aiohttp import web

from ext_authz.dev.errors import DevIssuerError
from ext_authz.dev.http import (
    DEFAULT_HOST,
    bound_port,
    check_bind,
    is_loopback,
    listen_socket,
    start_site,
    stop_on_signals,
    url_host,
)
from ext_authz.dev.keys import DEFAULT_ALG, DEFAULT_AUDIENCE, IssuerSettings, KeyDir

DEFAULT_PORT = 8999
DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/jwks.json"

BANNER = """\
*****************************************************************************
*  ext-authz dev-issuer: DEVELOPMENT ONLY.                                  *
*  It signs any token it is asked to; anyone who can read its key directory *
*  can mint tokens. Never configure a real deployment to trust it.          *
*****************************************************************************"""


def issuer_app(key_dir: KeyDir, issuer_url: str) -> web.Application:
    """Discovery and JWKS; keys are re-read from the directory on every request (rotation)."""

    async def discovery(_: web.Request) -> web.Response:
        algs = sorted({key.alg for key in key_dir.all_keys()})
        return web.json_response(
            {
                # OIDC Discovery §4.3: identical to the URL this document was fetched under.
                "issuer": issuer_url,
                "jwks_uri": f"{issuer_url}{JWKS_PATH}",
                "id_token_signing_alg_values_supported": algs,
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
            }
        )

    async def jwks(_: web.Request) -> web.Response:
        return web.json_response(key_dir.jwks(), headers={"Cache-Control": "max-age=60"})

    async def index(_: web.Request) -> web.Response:
        return web.Response(text=f"{BANNER}\n\ndiscovery: {issuer_url}{DISCOVERY_PATH}\n")

    app = web.Application()
    app.router.add_get(DISCOVERY_PATH, discovery)
    app.router.add_get(JWKS_PATH, jwks)
    app.router.add_get("/", index)
    return app


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """How `dev-issuer serve` listens and what it publishes."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    issuer_url: str | None = None  # default http://HOST:PORT
    audience: str | None = None  # default: the key directory's, else DEFAULT_AUDIENCE
    alg: str = DEFAULT_ALG  # of a first key
    allow_non_loopback: bool = False


async def serve_issuer(key_dir: KeyDir, options: ServeOptions, err: TextIO = sys.stderr) -> None:
    """Serve until SIGINT or SIGTERM."""
    host, issuer_url = options.host, options.issuer_url
    check_bind(host, options.allow_non_loopback)
    if issuer_url is not None and (issuer_url.endswith("/") or not urlsplit(issuer_url).hostname):
        raise DevIssuerError(
            "--issuer-url: an absolute URL without a trailing slash, e.g. http://issuer:8999"
        )
    key = key_dir.ensure_key(options.alg)
    sock = listen_socket(host, options.port)
    url = issuer_url or f"http://{url_host(host)}:{bound_port(sock)}"
    settings = IssuerSettings(url, options.audience or key_dir.saved_audience() or DEFAULT_AUDIENCE)
    key_dir.write_settings(settings)
    runner = await start_site(issuer_app(key_dir, url), sock)
    stop = asyncio.Event()
    try:
        with stop_on_signals(stop):
            print(BANNER, file=err)
            if not is_loopback(host):
                print(f"WARNING: listening on {host}, beyond loopback", file=err)
            print(
                f"ext-authz dev-issuer: serving {url} (audience {settings.audience}, signing kid "
                f"{key.kid}, keys in {key_dir.path})",
                file=err,
                flush=True,
            )
            await stop.wait()
    finally:
        await runner.cleanup()
