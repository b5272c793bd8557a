"""Browser sign-in through every gateway: the 302 to the IdP, the callback, the session cookie on
the way back, identity at the backend without the session cookie, and logout — through Envoy's
http_service, nginx auth_request and Caddy forward_auth (real binaries), with the dev issuer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ext_authz.dev.login import LoginSettings
from tests.support.echo import EchoBackend
from tests.support.envoy import start_envoy
from tests.support.gateways import http_listener_address, start_caddy, start_nginx
from tests.support.processes import start_ext_authz
from tests.support.signin import COOKIE, CookieBrowser, signin_config, threaded_issuer

IDENTITY = ("x-user-id", "x-user-groups")


@contextlib.contextmanager
def gateway_stack(tmp_path: Path, gateway: str) -> Iterator[tuple[CookieBrowser, Any]]:
    with contextlib.ExitStack() as stack:
        issuer = stack.enter_context(threaded_issuer(tmp_path, LoginSettings()))
        echo = stack.enter_context(EchoBackend())
        path = signin_config(issuer.url, tmp_path / "ext-authz.yaml")
        document = yaml.safe_load(path.read_text())
        document["listen_http"] = "127.0.0.1:0"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        authz = stack.enter_context(start_ext_authz(path))
        http = http_listener_address(authz)
        if gateway == "envoy-http":
            base = stack.enter_context(start_envoy(http, echo.port, http_service=True)).base_url
        elif gateway == "nginx":
            base = stack.enter_context(start_nginx(http, echo.port, identity_headers=IDENTITY)).base_url
        else:
            base = stack.enter_context(start_caddy(http, echo.port, identity_headers=IDENTITY)).base_url
        yield CookieBrowser(base, echo), issuer


@pytest.mark.parametrize("gateway", ["envoy-http", "nginx", "caddy"])
def test_sign_in_and_out_through_the_gateway(tmp_path: Path, gateway: str) -> None:
    with gateway_stack(tmp_path, gateway) as (browser, _):
        page = browser.sign_in("/app/orders?page=2")
        assert page.response.status == 200, page.describe()
        assert page.backend is not None
        assert page.backend.header_values("x-user-id") == ["alice"], page.describe()
        assert page.backend.header_values("x-user-groups") == ["staff"]
        assert not any(COOKIE in v for v in page.backend.header_values("cookie")), page.describe()
        browser.jar["theme"] = "dark"
        page = browser.get("/app/")
        assert page.backend is not None and page.backend.header_values("cookie") == ["theme=dark"]
        api = browser.get("/app/", (("Accept", "application/json"),))
        assert api.response.status == 200  # the session, not a redirect, for a fetch too
        out = browser.request("POST", "/oauth2/logout", (("Origin", browser.base),), body=b"")
        assert out.response.status == 302, out.describe()
        assert COOKIE not in browser.jar
        assert browser.get("/app/", (("Accept", "application/json"),)).response.status == 401
