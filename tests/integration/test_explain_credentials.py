"""``ext-authz explain`` shows each check beyond the signature: DPoP, certificate binding,
introspection and tenants. Real processes, a test issuer on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ext_authz.certbinding import certificate_thumbprint
from tests.support.dpop import DPoPKey
from tests.support.idp import TestIssuer
from tests.support.tls import CertificateAuthority

SECRET = "introspection-secret"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ext_authz", *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture(scope="module")
def issuer() -> Iterator[TestIssuer]:
    with TestIssuer(audience="api") as running:
        running.set_introspection_client("ext-authz", SECRET)
        yield running


@pytest.fixture(scope="module")
def config_file(issuer: TestIssuer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("explain-credentials")
    (directory / "secret").write_text(SECRET)
    document: dict[str, Any] = {
        "providers": [
            {
                "name": "bound",
                "issuer": issuer.url,
                "audiences": ["api"],
                "jwks_uri": issuer.jwks_uri,
                "allow_insecure_http": True,
                "dpop": "allowed",
                "mtls_bound": "allowed",
                "introspection": {"client_id": "ext-authz", "client_secret_file": "secret"},
            }
        ],
        "rules": [{"match": {"paths": ["/*"]}, "require": {}}],
    }
    file = directory / "ext-authz.yaml"
    file.write_text(yaml.safe_dump(document))
    return file


def test_explain_shows_dpop_and_certificate_checks(
    issuer: TestIssuer, config_file: Path, tmp_path: Path
) -> None:
    ca = CertificateAuthority()
    client = ca.issue("client", client=True)
    pem = tmp_path / "client.pem"
    pem.write_bytes(client.cert_pem)
    holder = DPoPKey()
    token = issuer.mint({"cnf": {"jkt": holder.thumbprint, "x5t#S256": certificate_thumbprint(client.der)}})
    proof = holder.proof("POST", "https://api.example.com/payments", token)
    args = ["explain", "--config", str(config_file), "--method", "POST", "--path", "/payments"]
    args += ["--host", "api.example.com", "--scheme", "https", "--token", f"DPoP {token}"]
    result = run(*args, "--header", f"dpop: {proof}", "--peer-certificate", str(pem), "--json")
    assert result.returncode == 0, result.stderr
    assert token not in result.stdout and token not in result.stderr
    data = json.loads(result.stdout)
    assert data["decision"]["status"] == 200, data
    checks = {c["check"]: c["verdict"] for c in data["token"]["checks"]}
    assert checks["DPoP"] == "proof valid; its key is the token's cnf.jkt"
    assert checks["certificate binding"] == "certificate matches cnf x5t#S256"
    # Without the certificate: the denial names the binding.
    text = run(*args, "--header", f"dpop: {holder.proof('POST', 'https://api.example.com/payments', token)}")
    assert "not verified: certificate_binding_mismatch" in text.stdout, text.stdout


def test_explain_introspects_an_opaque_token(issuer: TestIssuer, config_file: Path) -> None:
    opaque = issuer.issue_opaque({"sub": "carol"})
    result = run("explain", "--config", str(config_file), "--path", "/orders", "--token", opaque)
    assert result.returncode == 0, result.stderr
    assert opaque not in result.stdout and opaque not in result.stderr
    assert "introspection: active at bound" in result.stdout, result.stdout
    assert "decision  ALLOW 200" in result.stdout
    issuer.revoke_opaque(opaque)
    inactive = run("explain", "--config", str(config_file), "--path", "/orders", "--token", opaque)
    assert "not verified: token_inactive" in inactive.stdout, inactive.stdout
