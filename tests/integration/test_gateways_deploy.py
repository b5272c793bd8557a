"""The shipped gateway configs (deploy/nginx, deploy/caddy, deploy/traefik, the Istio HTTP provider):
each checked by its own tool, offline, and nginx and Caddy end to end.

- deploy/nginx/nginx.conf: `nginx -t` (Debian's nginx), as shipped and as the tests render it.
- deploy/caddy/Caddyfile: `caddy validate --adapter caddyfile` (Debian's Caddy 2.6.2), likewise.
- deploy/traefik/*.yml: Traefik is not in Debian and check-jsonschema vendors no Traefik schema
  (`--builtin-schema` lists none), so a structural check written here (keys, types, references
  between routers, middlewares and services) stands in for one.
- deploy/istio/istiod-values-http.yaml: loads, one `envoyExtAuthzHttp` provider with the keys and
  header lists the HTTP listener's envoy dialect needs.

End to end: a client -> the real nginx / Caddy (the shipped file, addresses replaced) -> the real
`ext-authz serve` HTTP listener -> the echo backend, with tokens from the test issuer.
"""

from __future__ import annotations

import http.server
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.deploy import DEPLOY
from tests.support.echo import EchoBackend
from tests.support.gateways import (
    CADDYFILE,
    NGINX_CONF,
    TRAEFIK_DYNAMIC,
    TRAEFIK_STATIC,
    GatewayProcess,
    Response,
    caddy_env,
    render_caddyfile,
    render_nginx,
    start_caddy,
    start_nginx,
)
from tests.support.httpserver import LoopbackHTTPServer
from tests.support.idp import TestIssuer
from tests.support.processes import ExtAuthzProcess, start_ext_authz

# What deploy/local/ext-authz.yaml's claim_to_headers name, plus the payload header.
IDENTITY_HEADERS = ("x-user-id", "x-user-email", "x-user-groups", "x-user-scopes", "x-jwt-payload")
ISTIO_HTTP = DEPLOY / "istio" / "istiod-values-http.yaml"
LOCAL_CONFIG = DEPLOY / "local" / "ext-authz.yaml"
TOOL_TIMEOUT = 20
PLACEHOLDER = "{http.reverse_proxy"


def run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False, env=env)


# ---- every shipped file names the identity headers ext-authz's local config sets ---------------


def test_the_identity_headers_are_the_local_configs() -> None:
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    named = {m["header"] for p in config["providers"] for m in p.get("claim_to_headers", [])}
    assert named <= set(IDENTITY_HEADERS), named
    # The payload header is not in the local config; the brief's (and the Envoy tests') name.
    assert "x-jwt-payload" in IDENTITY_HEADERS


# ---- nginx -------------------------------------------------------------------------------------


def nginx_test(config: Path, prefix: Path) -> subprocess.CompletedProcess[str]:
    return run(["nginx", "-t", "-q", "-p", str(prefix), "-c", str(config.resolve()), "-e", "stderr"])


def test_shipped_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    result = nginx_test(NGINX_CONF, tmp_path)
    assert result.returncode == 0, result.stderr


def test_rendered_nginx_conf_passes_nginx_t_and_nginx_t_is_strict(tmp_path: Path) -> None:
    rendered = tmp_path / "nginx.conf"
    rendered.write_text(render_nginx("127.0.0.1:19003", 18080, 18000, IDENTITY_HEADERS))
    assert nginx_test(rendered, tmp_path).returncode == 0

    broken = tmp_path / "broken.conf"
    broken.write_text(rendered.read_text().replace("auth_request_set $authz_user_id", "auth_request_sett $a"))
    result = nginx_test(broken, tmp_path)
    assert result.returncode != 0 and "auth_request_sett" in result.stderr, result.stderr


def test_nginx_conf_clears_every_identity_header() -> None:
    text = NGINX_CONF.read_text()
    for header in IDENTITY_HEADERS:
        variable = re.search(
            rf"^\s*auth_request_set\s+(\$\w+)\s+\$upstream_http_{header.replace('-', '_')};", text, re.M
        )
        assert variable is not None, header
        assert re.search(rf"^\s*proxy_set_header\s+{header}\s+\{variable.group(1)};", text, re.M | re.I), (
            header
        )


# ---- Caddy -------------------------------------------------------------------------------------


def caddy_validate(config: Path, workdir: Path) -> subprocess.CompletedProcess[str]:
    return run(
        ["caddy", "validate", "--config", str(config), "--adapter", "caddyfile"], env=caddy_env(workdir)
    )


def test_shipped_caddyfile_passes_caddy_validate(tmp_path: Path) -> None:
    result = caddy_validate(CADDYFILE, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Valid configuration" in result.stdout + result.stderr


def test_rendered_caddyfile_passes_caddy_validate_and_validate_is_strict(tmp_path: Path) -> None:
    rendered = tmp_path / "Caddyfile"
    rendered.write_text(render_caddyfile("127.0.0.1:19003", 18080, 18000, IDENTITY_HEADERS))
    assert caddy_validate(rendered, tmp_path).returncode == 0

    broken = tmp_path / "Broken"
    broken.write_text(rendered.read_text().replace("copy_headers", "copy_headerz"))
    assert caddy_validate(broken, tmp_path).returncode != 0


# ---- Traefik (structural: no Traefik binary or schema offline) -----------------------------------


def _strings(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)


def traefik_problems(static: Any, dynamic: Any) -> list[str]:
    problems: list[str] = []
    if not isinstance(static, dict) or not isinstance(dynamic, dict):
        return ["a file is not a mapping"]
    if set(static) - {"entryPoints", "providers", "log", "accessLog", "api", "ping", "metrics", "global"}:
        problems.append(f"unknown static keys {sorted(set(static))}")
    entry_points = static.get("entryPoints")
    if not isinstance(entry_points, dict) or not entry_points:
        return [*problems, "static: no entryPoints"]
    for name, entry in entry_points.items():
        if not isinstance(entry, dict) or not re.fullmatch(r"[0-9.]*:[0-9]+", str(entry.get("address", ""))):
            problems.append(f"entryPoints.{name}.address is not HOST:PORT")
    file_provider = (static.get("providers") or {}).get("file")
    if not isinstance(file_provider, dict) or not isinstance(file_provider.get("filename"), str):
        problems.append("static: providers.file.filename missing")
    http = dynamic.get("http")
    if not isinstance(http, dict) or set(http) - {"routers", "middlewares", "services"}:
        return [*problems, "dynamic: http must have routers, middlewares, services only"]
    routers, middlewares, services = (http.get(k) or {} for k in ("routers", "middlewares", "services"))
    for name, router in routers.items():
        if set(router) - {"entryPoints", "rule", "middlewares", "service", "priority", "tls"}:
            problems.append(f"routers.{name}: unknown keys {sorted(router)}")
        if not isinstance(router.get("rule"), str) or router.get("service") not in services:
            problems.append(f"routers.{name}: needs a rule and a defined service")
        if not _strings(router.get("entryPoints")) or not set(router["entryPoints"]) <= set(entry_points):
            problems.append(f"routers.{name}: entryPoints not defined")
        for middleware in router.get("middlewares", []):
            if middleware not in middlewares:
                problems.append(f"routers.{name}: middleware {middleware} not defined")
    for name, middleware in middlewares.items():
        if not isinstance(middleware, dict) or len(middleware) != 1:
            problems.append(f"middlewares.{name}: exactly one kind")
            continue
        [(kind, spec)] = middleware.items()
        if kind == "forwardAuth":
            if set(spec) - {"address", "trustForwardHeader", "authResponseHeaders", "authRequestHeaders",
                            "authResponseHeadersRegex", "tls", "addAuthCookiesToResponse",
                            "maxResponseBodySize", "headerField", "forwardBody", "maxBodySize",
                            "preserveLocationHeader"}:  # fmt: skip
                problems.append(f"middlewares.{name}.forwardAuth: unknown keys {sorted(spec)}")
            if not re.fullmatch(r"https?://[^/]+/.*", str(spec.get("address", ""))):
                problems.append(f"middlewares.{name}.forwardAuth.address is not a URL")
            if not isinstance(spec.get("trustForwardHeader", False), bool):
                problems.append(f"middlewares.{name}.forwardAuth.trustForwardHeader is not a boolean")
            if "authResponseHeaders" in spec and not _strings(spec["authResponseHeaders"]):
                problems.append(f"middlewares.{name}.forwardAuth.authResponseHeaders is not a list of names")
        elif kind == "headers":
            custom = spec.get("customRequestHeaders")
            if not isinstance(custom, dict) or not all(isinstance(v, str) for v in custom.values()):
                problems.append(f"middlewares.{name}.headers.customRequestHeaders is not a string map")
        else:
            problems.append(f"middlewares.{name}: kind {kind} not checked here")
    for name, service in services.items():
        servers = (service.get("loadBalancer") or {}).get("servers")
        if (
            not isinstance(servers, list)
            or not servers
            or not all(
                isinstance(s, dict) and re.fullmatch(r"https?://[^/]+/?", str(s.get("url", "")))
                for s in servers
            )
        ):
            problems.append(f"services.{name}: loadBalancer.servers[].url")
    return problems


def traefik_files() -> tuple[Any, Any]:
    return yaml.safe_load(TRAEFIK_STATIC.read_text()), yaml.safe_load(TRAEFIK_DYNAMIC.read_text())


def test_traefik_files_are_structurally_valid() -> None:
    static, dynamic = traefik_files()
    assert traefik_problems(static, dynamic) == []
    assert Path(static["providers"]["file"]["filename"]).resolve() == TRAEFIK_DYNAMIC.resolve() or (
        (DEPLOY.parent / static["providers"]["file"]["filename"]).resolve() == TRAEFIK_DYNAMIC.resolve()
    )


@pytest.mark.parametrize(
    "mistake",
    [
        lambda s, d: d["http"]["routers"]["app"].update(service="nope"),
        lambda s, d: d["http"]["routers"]["app"]["middlewares"].append("missing"),
        lambda s, d: d["http"]["middlewares"]["ext-authz"]["forwardAuth"].update(adress="x"),
        lambda s, d: d["http"]["middlewares"]["ext-authz"]["forwardAuth"].update(trustForwardHeader="no"),
        lambda s, d: s["entryPoints"]["web"].update(address="localhost"),
    ],
    ids=["service", "middleware", "typo", "bool", "address"],
)
def test_traefik_structural_check_rejects_mistakes(mistake: Callable[[Any, Any], None]) -> None:
    static, dynamic = traefik_files()
    mistake(static, dynamic)
    assert traefik_problems(static, dynamic)


def test_traefik_clears_forged_identity_headers_and_never_trusts_forwarded_headers() -> None:
    _, dynamic = traefik_files()
    http = dynamic["http"]
    [router] = http["routers"].values()
    kinds = [next(iter(http["middlewares"][m])) for m in router["middlewares"]]
    assert kinds == ["headers", "forwardAuth", "headers"]  # strip first, then ask, then drop DPoP
    strip, auth, after = (http["middlewares"][m] for m in router["middlewares"])
    # A DPoP proof reaches ext-authz and never the backend.
    assert after["headers"]["customRequestHeaders"] == {"DPoP": ""}
    # Cookie is copied back (ext-authz's answer without the session cookies), never stripped first:
    # ext-authz must see the client's.
    identity = [h for h in auth["forwardAuth"]["authResponseHeaders"] if h.lower() != "cookie"]
    stripped = strip["headers"]["customRequestHeaders"]
    assert set(stripped.values()) == {""}
    # Each identity header and every underscore spelling of it (CGI-style backends read them as one).
    assert {name.replace("_", "-").lower() for name in stripped} == {h.lower() for h in identity}
    assert all(
        sum(n.replace("_", "-").lower() == h.lower() for n in stripped) == 2 ** h.count("-") for h in identity
    )
    assert {h.lower() for h in identity} == set(IDENTITY_HEADERS)
    assert "Cookie" in auth["forwardAuth"]["authResponseHeaders"]
    assert auth["forwardAuth"]["trustForwardHeader"] is False
    assert auth["forwardAuth"]["address"].endswith("127.0.0.1:9003/forward-auth")
    assert "authRequestHeaders" not in auth["forwardAuth"]  # every client header reaches ext-authz


# ---- Istio -------------------------------------------------------------------------------------


def test_istio_http_provider_has_the_keys_the_envoy_dialect_needs() -> None:
    document = yaml.safe_load(ISTIO_HTTP.read_text())
    [provider] = document["meshConfig"]["extensionProviders"]
    assert set(provider) == {"name", "envoyExtAuthzHttp"}
    http = provider["envoyExtAuthzHttp"]
    assert set(http) <= {
        "service", "port", "timeout", "pathPrefix", "failOpen", "statusOnError",
        "includeRequestHeadersInCheck", "includeAdditionalHeadersInCheck", "includeRequestBodyInCheck",
        "headersToUpstreamOnAllow", "headersToDownstreamOnDeny", "headersToDownstreamOnAllow",
    }  # fmt: skip
    assert http["service"] == "ext-authz.ext-authz.svc.cluster.local"
    assert isinstance(http["port"], int) and http["port"] == 9003
    assert http["pathPrefix"] == "/envoy"
    assert http["failOpen"] is False and http["statusOnError"] == "503"
    assert re.fullmatch(r"[0-9.]+s", http["timeout"]) and float(http["timeout"][:-1]) <= 1.0
    assert {"authorization", "cookie"} <= set(http["includeRequestHeadersInCheck"])
    assert http["headersToUpstreamOnAllow"] == [*IDENTITY_HEADERS, "cookie"]
    assert http["headersToDownstreamOnAllow"] == ["set-cookie"]
    assert set(http["headersToDownstreamOnDeny"]) == {
        "www-authenticate", "location", "set-cookie", "retry-after", "content-type", "cache-control",
    }  # fmt: skip
    for key in (k for k, v in http.items() if isinstance(v, list)):
        assert all(isinstance(h, str) and h == h.lower() for h in http[key]), key


# ---- end to end through nginx and Caddy ----------------------------------------------------------


@pytest.fixture(scope="module")
def authz_http(issuer: TestIssuer) -> Iterator[str]:
    """The real ext-authz with its HTTP listener on an ephemeral port; yields HOST:PORT."""
    config = {
        "listen": "127.0.0.1:0",
        "providers": [
            {
                "name": "test",
                "issuer": issuer.url,
                "audiences": [issuer.audience],
                "claim_to_headers": [
                    {"header": "x-user-id", "claim": "sub"},
                    {"header": "x-user-email", "claim": "email"},
                    {"header": "x-user-groups", "claim": "groups"},
                    {"header": "x-user-scopes", "claim": "scope"},
                ],
                "payload_header": "x-jwt-payload",
            }
        ],
        "rules": [
            {"match": {"paths": ["/public", "/public/*"]}, "allow": "anonymous"},
            {"match": {"paths": ["/*"]}, "require": {}},
        ],
    }
    with tempfile.TemporaryDirectory(prefix="ext-authz-gateways-") as directory:
        path = Path(directory) / "ext-authz.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        server: ExtAuthzProcess = start_ext_authz(path, extra_args=["--listen-http", "127.0.0.1:0"])
        with server:
            yield server.logged_address("http listening")
            server.process.check_alive()


GATEWAYS: dict[str, Callable[..., GatewayProcess]] = {"nginx": start_nginx, "caddy": start_caddy}


@pytest.fixture(scope="module", params=sorted(GATEWAYS))
def gateway(request: pytest.FixtureRequest, authz_http: str, echo: EchoBackend) -> Iterator[GatewayProcess]:
    with GATEWAYS[request.param](authz_http, echo.port, identity_headers=IDENTITY_HEADERS) as started:
        yield started
        started.process.check_alive()


def bearer(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


def reached_backend(echo: EchoBackend, response: Response, before: int) -> dict[str, list[str]]:
    assert response.status == 200, response.describe()
    requests = echo.requests
    assert len(requests) == before + 1, response.describe()
    seen = response.json()
    assert seen == requests[-1], response.describe()
    headers: dict[str, list[str]] = seen["headers"]
    for name, values in headers.items():
        for value in values:
            assert PLACEHOLDER not in value, f"{name}: {value}\n{response.describe()}"
    return headers


def test_valid_token_reaches_the_backend_with_its_identity(
    gateway: GatewayProcess, issuer: TestIssuer, echo: EchoBackend
) -> None:
    token = issuer.mint({"sub": "alice", "email": "alice@example.com", "groups": ["a", "b"]})
    before = len(echo.requests)

    response = gateway.request("/orders?id=1", [bearer(token), ("X-User-Id", "admin")])

    headers = reached_backend(echo, response, before)
    assert headers.get("x-user-id") == ["alice"], response.describe()
    assert headers.get("x-user-email") == ["alice@example.com"]
    assert headers.get("x-user-groups") == ["a,b"]
    assert len(headers.get("x-jwt-payload", [])) == 1
    assert "x-user-scopes" not in headers  # the token has no scope: the header is absent
    assert echo.requests[-1]["path"] == "/orders?id=1"


def test_no_token_is_401_with_a_challenge_and_never_reaches_the_backend(
    gateway: GatewayProcess, echo: EchoBackend
) -> None:
    before = len(echo.requests)

    response = gateway.request("/orders")

    assert response.status == 401, response.describe()
    assert (response.header("www-authenticate") or "").startswith("Bearer "), response.describe()
    assert len(echo.requests) == before


def test_forged_identity_on_an_anonymous_route_never_reaches_the_backend(
    gateway: GatewayProcess, echo: EchoBackend
) -> None:
    before = len(echo.requests)

    response = gateway.request(
        "/public/page",
        [("X-User-Id", "admin"), ("x-user-email", "admin@example.com"), ("X-Jwt-Payload", "e30"),
         ("X-User-Groups", "admins"), ("X-User-Scopes", "admin")],
    )  # fmt: skip

    headers = reached_backend(echo, response, before)
    for name in IDENTITY_HEADERS:
        assert name not in headers, f"{name}: {headers.get(name)}\n{response.describe()}"


def test_expired_token_is_401(gateway: GatewayProcess, issuer: TestIssuer, echo: EchoBackend) -> None:
    token = issuer.mint({"sub": "alice"}, ttl=-600)
    before = len(echo.requests)

    response = gateway.request("/orders", [bearer(token)])

    assert response.status == 401, response.describe()
    assert "invalid_token" in (response.header("www-authenticate") or ""), response.describe()
    assert len(echo.requests) == before


def test_caddy_2_6_without_the_placeholder_deletion_leaks_the_placeholder(
    authz_http: str, echo: EchoBackend
) -> None:
    """Why the Caddyfile deletes values starting `{http.reverse_proxy.`: without those lines,
    Debian's Caddy 2.6.2 hands the backend the placeholder's literal text on an anonymous route."""
    version = run(["caddy", "version"]).stdout
    without = re.compile(
        r"^\s*(@placeholder_\w+ header_regexp .*|request_header @placeholder_\w+ .*)\n", re.M
    )

    def drop_the_fix(text: str) -> str:
        edited, count = without.subn("", text)
        assert count == 2 * (len(IDENTITY_HEADERS) + 1)  # and Cookie
        return edited

    with start_caddy(authz_http, echo.port, identity_headers=IDENTITY_HEADERS, edit=drop_the_fix) as caddy:
        response = caddy.request("/public/page", [("X-User-Id", "admin")])
    assert response.status == 200, response.describe()
    seen = response.json()["headers"]
    if re.match(r"v?2\.6\.", version):
        assert seen.get("x-user-id") == ["{http.reverse_proxy.header.X-User-Id}"], (version, seen)
    else:  # a fixed Caddy copies nothing; the deletion before forward_auth still drops the forged one
        assert "x-user-id" not in seen, (version, seen)


class ScriptedAuthorizer(LoopbackHTTPServer):
    """Answers the nginx subrequest with what ext-authz answers for a browser sign-in (302) and
    an outage (503): statuses auth_request alone turns into 500."""

    name = "scripted-authorizer"

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                uri = self.headers.get("X-Original-URI", "")
                if uri.startswith("/app"):
                    self.send_response(302)
                    self.send_header("Location", "https://idp.example/authorize?state=s")
                    self.send_header("Set-Cookie", "ext_authz_state=s; Path=/; HttpOnly")
                else:
                    self.send_response(503)
                    self.send_header("Retry-After", "7")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def test_nginx_maps_sign_in_redirects_and_outages_back_from_500(echo: EchoBackend) -> None:
    before = len(echo.requests)
    with (
        ScriptedAuthorizer() as authorizer,
        start_nginx(f"127.0.0.1:{authorizer.port}", echo.port, identity_headers=IDENTITY_HEADERS) as nginx,
    ):
        sign_in = nginx.request("/app/home")
        outage = nginx.request("/orders")

    assert sign_in.status == 302, sign_in.describe()
    assert sign_in.header("location") == "https://idp.example/authorize?state=s"
    assert sign_in.header("set-cookie") == "ext_authz_state=s; Path=/; HttpOnly"
    assert outage.status == 503, outage.describe()
    assert outage.header("retry-after") == "7"
    assert len(echo.requests) == before
