"""The shipped ext-authz configs protect the same paths the same way (they are copied as examples).

A rule for ``/admin/*`` alone leaves ``/admin`` itself to the next rule (the catch-all "signed-in"
rule in the Kubernetes example): every shipped config with an admin rule must cover both.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ext_authz.authorization import Rules
from ext_authz.config.model import Settings
from ext_authz.config.parse import parse
from ext_authz.model import Request
from ext_authz.paths import RequestView
from tests.support.keys_shared import with_test_secrets

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "deploy").rglob("ext-authz.yaml"))


def _load(file: str, directory: Path) -> Settings:
    """The shipped config's rules, without the files only its container has (secrets, certificates)."""
    path = with_test_secrets(ROOT / file, directory)
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    document.pop("tls", None)  # certificate files are mounted at run time; rules do not read them
    return parse(document, base_dir=path.parent, source=file)


def _rule_for(config: Settings, path: str) -> str | None:
    matched = Rules(config.rules, config.providers).match(RequestView.of(Request("GET", path, host="x")))
    return matched.rule.name if matched else None


def test_every_shipped_config_is_found() -> None:
    assert {"deploy/local/ext-authz.yaml", "deploy/compose/ext-authz.yaml"} <= set(SHIPPED)
    assert "deploy/kubernetes/ext-authz.yaml" in SHIPPED


# The sidecar example protects /orders writes instead of an admin area.
WITH_ADMIN = (
    "deploy/local/ext-authz.yaml",
    "deploy/compose/ext-authz.yaml",
    "deploy/kubernetes/ext-authz.yaml",
    "deploy/kubernetes-tls/ext-authz.yaml",
)


@pytest.mark.parametrize("file", WITH_ADMIN)
def test_admin_and_its_subpaths_share_one_rule(file: str, tmp_path: Path) -> None:
    config = _load(file, tmp_path)
    assert _rule_for(config, "/admin") == "admin"
    assert _rule_for(config, "/admin/") == "admin"
    assert _rule_for(config, "/admin/users") == "admin"


@pytest.mark.parametrize("file", SHIPPED)
def test_no_protected_prefix_leaves_its_root_to_a_later_rule(file: str, tmp_path: Path) -> None:
    """A non-anonymous ``/x/*`` rule also decides ``/x`` (else ``/x`` falls through to a later rule)."""
    config = _load(file, tmp_path)
    for rule in config.rules:
        if rule.anonymous or rule.match.paths is None or rule.match.methods is not None:
            continue
        for pattern in rule.match.paths:
            if pattern.prefix is not None and pattern.prefix.endswith("/") and len(pattern.prefix) > 1:
                root = pattern.prefix.rstrip("/")
                assert _rule_for(config, root) == rule.name, f"{file}: {root} is not decided by {rule.name}"
