"""`make run`'s stack plan (ext_authz.dev.plan): ports from the repository's configs and the RUN_*
overrides, and the Envoy config rendered for them. Pure functions over parsed YAML: no process."""

from __future__ import annotations

import pytest
import yaml

from ext_authz.dev.errors import DevIssuerError
from ext_authz.dev.plan import render_envoy_config, stack_plan
from tests.support.deploy import REPO_ROOT


def test_stack_ports_default_to_the_repository_configs() -> None:
    envoy = yaml.safe_load((REPO_ROOT / "envoy.yaml").read_text())
    authz = yaml.safe_load((REPO_ROOT / "deploy/local/ext-authz.yaml").read_text())

    plan = stack_plan(envoy, authz, {})
    moved = stack_plan(envoy, authz, {"RUN_ENVOY_PORT": "18000", "RUN_HOST": "127.0.0.1"})

    assert (plan.envoy_port, plan.admin_port, plan.authz_port, plan.backend_port) == (8000, 9901, 9001, 8080)
    assert (plan.issuer_port, plan.listener_host) == (8999, "0.0.0.0")
    assert render_envoy_config(envoy, plan) == envoy  # defaults: envoy.yaml as it is
    assert (moved.envoy_port, moved.listener_host, moved.authz_port) == (18000, "127.0.0.1", 9001)
    with pytest.raises(DevIssuerError, match="RUN_AUTHZ_PORT"):
        stack_plan(envoy, authz, {"RUN_AUTHZ_PORT": "ninety"})
