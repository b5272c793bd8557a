"""deploy/prometheus/ext-authz-rules.yaml: valid for promtool, unit-tested, documented, identical to
the PrometheusRule in deploy/kubernetes/monitoring/, and written against metrics ext-authz exports.

promtool is the Debian package `prometheus` (`make tools`). The metric names are taken from a real
`ext-authz serve --workers 2` with TLS (so the supervisor's and the certificate's metrics are there)."""

from __future__ import annotations

import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.deploy import DEPLOY, document
from tests.support.idp import TestIssuer
from tests.support.processes import start_ext_authz
from tests.support.tls import CertificateAuthority, write_files

PROMETHEUS = DEPLOY / "prometheus"
RULES = PROMETHEUS / "ext-authz-rules.yaml"
RULE_TESTS = PROMETHEUS / "ext-authz-rules.test.yaml"
PROMETHEUS_RULE = DEPLOY / "kubernetes" / "monitoring" / "prometheusrule.yaml"
SEVERITIES = {"page", "ticket"}
# A metric name in PromQL, not part of a recording rule's level:metric:operation name.
METRIC_NAME = re.compile(r"(?<![\w:])ext_authz_[a-z0-9_]+(?![\w:])")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60, check=False
    )


def rules() -> list[dict[str, Any]]:
    return [rule for group in document(RULES)["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_fail_on_a_wrong_expectation(tmp_path: Path) -> None:
    """The unit tests compare rendered annotations: a changed expectation is a failure."""
    changed = RULE_TESTS.read_text().replace("2h 46m 40s", "2h 46m 41s", 1)
    assert changed != RULE_TESTS.read_text()
    (tmp_path / RULE_TESTS.name).write_text(changed)
    (tmp_path / RULES.name).write_text(RULES.read_text())
    result = subprocess.run(
        ["promtool", "test", "rules", RULE_TESTS.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_silent() -> None:
    fired: set[str] = set()
    silent: set[str] = set()
    for case in document(RULE_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
            for expected in check["exp_alerts"]:
                assert expected.get("exp_labels") and expected.get("exp_annotations"), check
    names = {alert["alert"] for alert in alerts()}
    assert fired == names
    assert silent == names


def test_every_alert_has_a_severity_and_its_own_runbook_anchor() -> None:
    anchors = []
    for alert in alerts():
        name = alert["alert"]
        assert alert["labels"]["severity"] in SEVERITIES, name
        annotations = alert["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations), name
        assert all(str(annotations[key]).strip() for key in ("summary", "description")), name
        # README.md heading "Alert: <name>"; relative, so no host outside the repository.
        assert annotations["runbook_url"] == f"README.md#alert-{name.lower()}", name
        anchors.append(annotations["runbook_url"])
    assert len(anchors) == len(set(anchors))


def test_prometheus_rule_has_the_same_groups_as_the_rule_file() -> None:
    resource = document(PROMETHEUS_RULE)
    assert resource["apiVersion"] == "monitoring.coreos.com/v1"
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"]["groups"] == document(RULES)["groups"]
    kustomization = document(PROMETHEUS_RULE.parent / "kustomization.yaml")
    on_disk = {p.name for p in PROMETHEUS_RULE.parent.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk


def exported_names(text: str) -> set[str]:
    """Every sample name the exposition has or would have once its families have samples."""
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {sample.name for sample in family.samples}
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("alert-rules")
    ca = CertificateAuthority()
    write_files(directory / "tls", ca.issue(), ca)
    with TestIssuer() as issuer:
        config = {
            "listen": "127.0.0.1:0",
            "admin": "127.0.0.1:0",
            "tls": {"cert_file": "tls/tls.crt", "key_file": "tls/tls.key"},
            "providers": [
                {"name": "test", "issuer": issuer.url, "audiences": ["api"], "jwks": issuer.jwks()}
            ],
        }
        path = directory / "ext-authz.yaml"
        path.write_text(yaml.safe_dump(config))
        with start_ext_authz(path, extra_args=["--workers", "2"]) as server:
            admin = server.logged_address("supervising", "admin")
            with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as response:
                yield response.read().decode()


def test_every_metric_in_an_expression_is_exported(exposition: str) -> None:
    exported = exported_names(exposition)
    used = {name for rule in rules() for name in METRIC_NAME.findall(rule["expr"])}

    assert "ext_authz_workers" in exported  # the supervisor's exposition (serve --workers)
    assert "ext_authz_tls_certificate_expiry_timestamp_seconds" in exported  # TLS is on
    assert len(used) >= 10
    assert used <= exported, sorted(used - exported)


def test_every_runbook_url_names_a_readme_heading() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in readme.splitlines()
        if line.startswith("#")
    }
    document = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "deploy/prometheus/ext-authz-rules.yaml").read_text()
    )
    for group in document["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                url = rule["annotations"]["runbook_url"]
                assert url.startswith("README.md#") and url.partition("#")[2] in anchors, url
