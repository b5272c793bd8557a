"""`ext-authz dev-issuer serve|rotate|mint` as a developer uses it: the issuer a real process on real
HTTP, tokens checked by a real ext-authz that found the issuer by OIDC discovery.

`serve` and one `rotate` run as processes; the other one-shot commands go through the same entry
point (`ext_authz.cli.main`) in this process, which keeps the file fast.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from ext_authz import cli
from ext_authz._proto.envoy.service.auth.v3 import (
    external_auth_pb2,
    external_auth_pb2_grpc,
)
from ext_authz.jws import b64url
from tests.support.inprocess import check_request
from tests.support.processes import ManagedProcess, start_ext_authz

OK, PERMISSION_DENIED, UNAUTHENTICATED = 0, 7, 16


def dev_issuer(*args: str) -> subprocess.CompletedProcess[str]:
    """`ext-authz dev-issuer ARGS` as a process."""
    return subprocess.run(
        [sys.executable, "-m", "ext_authz", "dev-issuer", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`ext-authz dev-issuer ARGS` through the console script's entry point: (status, out, err)."""
    capsys.readouterr()
    status = cli.main(["dev-issuer", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def mint(capsys: pytest.CaptureFixture[str], key_dir: Path, *args: str) -> str:
    status, out, err = run(capsys, "mint", "--key-dir", str(key_dir), *args)
    assert status == 0, err
    return out.strip()


def get_json(url: str) -> tuple[dict[str, Any], dict[str, str]]:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        document = json.loads(response.read())
        assert isinstance(document, dict)
        return document, {k.lower(): v for k, v in response.headers.items()}


def unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header, payload = (json.loads(base64.urlsafe_b64decode(part + "==")) for part in token.split(".")[:2])
    return header, payload


def rfc7638_thumbprint(jwk: dict[str, Any]) -> str:
    members = {"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"], "y": jwk["y"]}
    digest = hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest()
    return b64url(digest)


@dataclass
class RunningIssuer:
    process: ManagedProcess
    url: str
    key_dir: Path


@pytest.fixture
def issuer(tmp_path: Path) -> Iterator[RunningIssuer]:
    key_dir = tmp_path / "keys"
    argv = [
        sys.executable,
        "-m",
        "ext_authz",
        "dev-issuer",
        "serve",
        "--port",
        "0",
        "--key-dir",
        str(key_dir),
    ]
    process = ManagedProcess("dev-issuer", argv, env={"PYTHONUNBUFFERED": "1"})
    try:
        line = process.wait_for_line(lambda text: "serving http://" in text, timeout=30, what="serving")
        match = re.search(r"serving (http://\S+)", line)
        assert match is not None, line
        yield RunningIssuer(process, match.group(1), key_dir)
        process.check_alive()
    finally:
        assert process.stop() == 0, process.tail()


def test_serve_publishes_discovery_and_jwks_from_a_generated_key(issuer: RunningIssuer) -> None:
    discovery, _ = get_json(f"{issuer.url}/.well-known/openid-configuration")
    jwks, headers = get_json(f"{issuer.url}/jwks.json")

    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", issuer.url)  # loopback by default
    assert discovery["issuer"] == issuer.url  # OIDC Discovery §4.3
    assert discovery["jwks_uri"] == f"{issuer.url}/jwks.json"
    assert discovery["id_token_signing_alg_values_supported"] == ["ES256"]
    [key] = jwks["keys"]
    assert {key["kty"], key["crv"], key["alg"], key["use"]} == {"EC", "P-256", "ES256", "sig"}
    assert key["kid"] == rfc7638_thumbprint(key)
    assert "d" not in key  # public members only
    assert "max-age" in headers["cache-control"]
    assert "DEVELOPMENT ONLY" in issuer.process.tail()
    # The key directory: private to its owner, and it tells `mint` the issuer URL and audience.
    assert stat.S_IMODE(issuer.key_dir.stat().st_mode) == 0o700
    assert [stat.S_IMODE(p.stat().st_mode) for p in issuer.key_dir.glob("key-*.pem")] == [0o600]
    saved = json.loads((issuer.key_dir / "issuer.json").read_text())
    assert (saved["issuer"], saved["audience"]) == (issuer.url, "api")


def test_mint_prints_a_token_with_the_key_dirs_issuer_and_audience(
    issuer: RunningIssuer, capsys: pytest.CaptureFixture[str]
) -> None:
    before = int(time.time())
    token = mint(
        capsys, issuer.key_dir, "--sub", "alice", "--scope", "read write", "--claim", "admin=true",
        "--claim", "email=alice@example.com", "--claim", 'groups=["a","b"]', "--ttl", "600",
    )  # fmt: skip

    header, payload = unverified(token)
    [key] = get_json(f"{issuer.url}/jwks.json")[0]["keys"]
    assert header == {"alg": "ES256", "kid": key["kid"], "typ": "JWT"}
    assert payload["iss"] == issuer.url
    assert (payload["sub"], payload["aud"], payload["scope"]) == ("alice", "api", "read write")
    assert (payload["admin"], payload["email"], payload["groups"]) == (True, "alice@example.com", ["a", "b"])
    assert before + 600 <= payload["exp"] <= int(time.time()) + 600
    assert payload["iat"] <= payload["exp"] - 600

    expired = unverified(mint(capsys, issuer.key_dir, "--sub", "bob", "--aud", "other", "--ttl", "-300"))[1]
    assert expired["aud"] == "other"
    assert expired["exp"] <= int(time.time()) - 299
    assert expired["iat"] < expired["exp"]


def test_rotate_adds_a_key_that_signs_from_then_on(
    issuer: RunningIssuer, capsys: pytest.CaptureFixture[str]
) -> None:
    [first] = get_json(f"{issuer.url}/jwks.json")[0]["keys"]

    rotated = dev_issuer("rotate", "--key-dir", str(issuer.key_dir), "--alg", "RS256")

    assert rotated.returncode == 0, rotated.stderr
    new_kid = rotated.stdout.strip()
    keys = get_json(f"{issuer.url}/jwks.json")[0]["keys"]
    assert [k["kid"] for k in keys] == [first["kid"], new_kid]  # the old key stays published
    assert keys[1]["kty"] == "RSA" and keys[1]["alg"] == "RS256"
    discovery = get_json(f"{issuer.url}/.well-known/openid-configuration")[0]
    assert discovery["id_token_signing_alg_values_supported"] == ["ES256", "RS256"]
    assert unverified(mint(capsys, issuer.key_dir, "--sub", "alice"))[0]["kid"] == new_kid


def _check(address: str, token: str | None, path: str) -> external_auth_pb2.CheckResponse:
    request = check_request(path, token, host="api.example.com")
    with grpc.insecure_channel(address) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)  # type: ignore[no-untyped-call]
        response: external_auth_pb2.CheckResponse = stub.Check(request, timeout=10)
        return response


def _user_id(response: external_auth_pb2.CheckResponse) -> str | None:
    for option in response.ok_response.headers:
        if option.header.key == "x-user-id":
            return str(option.header.value)
    return None


def test_minted_tokens_verify_through_a_real_ext_authz(
    issuer: RunningIssuer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "ext-authz.yaml"
    provider = {
        "name": "dev",
        "issuer": issuer.url,  # keys by OIDC discovery, as in deploy/local/ext-authz.yaml
        "audiences": ["api"],
        "claim_to_headers": [{"header": "x-user-id", "claim": "sub"}],
        "refetch_min_interval_seconds": 0,
    }
    rules = [
        {"match": {"paths": ["/admin/*"]}, "require": {"scopes": ["admin"]}},
        {"match": {"paths": ["/*"]}, "require": {}},
    ]
    config.write_text(yaml.safe_dump({"listen": "127.0.0.1:0", "providers": [provider], "rules": rules}))
    reader = mint(capsys, issuer.key_dir, "--sub", "alice", "--scope", "read")
    expired = mint(capsys, issuer.key_dir, "--sub", "alice", "--ttl", "-300")
    wrong_audience = mint(capsys, issuer.key_dir, "--sub", "alice", "--aud", "not-api")

    with start_ext_authz(config) as server:
        allowed = _check(server.address, reader, "/orders/1")
        assert allowed.status.code == OK, allowed
        assert _user_id(allowed) == "alice"
        assert _check(server.address, reader, "/admin/users").denied_response.status.code == 403
        assert _check(server.address, reader, "/admin/users").status.code == PERMISSION_DENIED
        for token in (expired, wrong_audience, None):
            denied = _check(server.address, token, "/orders/1")
            assert (denied.status.code, denied.denied_response.status.code) == (UNAUTHENTICATED, 401)

        # A rotation mid-flight: ext-authz meets the new kid, refetches the JWKS and accepts it.
        assert run(capsys, "rotate", "--key-dir", str(issuer.key_dir))[0] == 0
        after_rotation = _check(server.address, mint(capsys, issuer.key_dir, "--sub", "carol"), "/orders/1")
        assert after_rotation.status.code == OK, after_rotation
        assert _user_id(after_rotation) == "carol"
        # Tokens signed with the previous key remain valid: it is still published.
        assert _check(server.address, reader, "/orders/1").status.code == OK


def test_serve_refuses_a_non_loopback_address_unless_told(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run(capsys, "serve", "--host", "0.0.0.0", "--port", "0", "--key-dir", str(tmp_path))

    assert status == 2
    assert "--allow-non-loopback" in err
    assert not (tmp_path / "issuer.json").exists()


def test_mint_without_a_key_dir_says_what_to_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "mint", "--key-dir", str(tmp_path / "nothing-here"), "--sub", "alice")

    assert status == 2
    assert "dev-issuer serve" in err
    assert out == ""


def test_mint_warns_when_an_expired_token_is_still_within_ext_authz_leeway(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "rotate", "--key-dir", str(tmp_path))[0] == 0  # a key, and no server needed:
    status, out, err = run(capsys, "mint", "--key-dir", str(tmp_path), "--issuer", "http://127.0.0.1:1",
                           "--aud", "api", "--sub", "alice", "--ttl", "-10")  # fmt: skip

    assert status == 0
    assert "clock_skew_seconds" in err
    assert out.count(".") == 2  # the token alone on standard output
