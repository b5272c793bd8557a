"""`ext-authz status` and `GET /debug/providers` against a real server (and a supervisor's fleet)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.support.idp import TestIssuer
from tests.support.processes import ExtAuthzProcess, start_ext_authz


def admin_of(server: ExtAuthzProcess, event: str = "admin listening") -> str:
    return server.logged_address(event, "address" if event == "admin listening" else "admin")


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ext_authz", "status", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def write_config(tmp_path: Path, issuer: TestIssuer, **fetched: object) -> Path:
    config = {
        "listen": "127.0.0.1:0",
        "admin": "127.0.0.1:0",
        "providers": [
            {
                "name": "fetched",
                "issuer": issuer.url,
                "audiences": ["api"],
                "allow_insecure_http": True,
                **fetched,
            },
            {
                "name": "inline",
                "issuer": "https://inline.example/",
                "audiences": ["api"],
                "jwks": issuer.jwks(),
            },
        ],
    }
    path = tmp_path / "ext-authz.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def wait_until(condition: object, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.2)


def test_status_shows_each_provider_and_exits_by_health(tmp_path: Path) -> None:
    issuer = TestIssuer()
    issuer.add_key("ES256", kid="ec-1")
    with (
        issuer,
        start_ext_authz(
            write_config(
                tmp_path, issuer, refresh_interval_seconds=1, max_stale_seconds=3, fetch_timeout_seconds=0.5
            )
        ) as server,
    ):
        admin = admin_of(server)
        wait_until(lambda: status("--admin", admin).returncode == 0)
        shown = status("--admin", admin)
        assert f"ext-authz at {admin}: ready" in shown.stdout
        lines = {line.split()[0]: line for line in shown.stdout.splitlines()[2:]}
        assert (
            "discovery" in lines["fetched"] and "ec-1 ES256" in lines["fetched"] and "ok " in lines["fetched"]
        )
        assert "inline" in lines["inline"] and " yes " in lines["inline"]
        document = json.loads(status("--admin", admin, "--json").stdout)
        fetched = next(p for p in document["providers"] if p["name"] == "fetched")
        assert {k["kid"] for k in fetched["keys"]} >= {"ec-1"} and fetched["stale"] is False
        assert fetched["max_stale_seconds"] == 3 and fetched["last_fetch"]["outcome"] == "ok"
        jwk = issuer.jwks()["keys"][0]
        assert jwk["n"][:20] not in shown.stdout and jwk["n"][:20] not in json.dumps(
            document
        )  # no key material
        issuer.stop()  # the IdP goes away: after max_stale_seconds the keys are stale
        wait_until(lambda: status("--admin", admin).returncode == 1)
        down = status("--admin", admin)
        assert "STALE" in down.stdout and "NOT READY" in down.stdout
        assert "network_error" in down.stdout or "timeout" in down.stdout


def test_status_of_a_fleet_and_of_nothing(tmp_path: Path) -> None:
    with (
        TestIssuer() as issuer,
        start_ext_authz(write_config(tmp_path, issuer), extra_args=["--workers", "2"]) as server,
    ):
        admin = admin_of(server, "supervising")
        wait_until(lambda: status("--admin", admin).returncode == 0)
        shown = status("--admin", admin).stdout
        assert "(2 workers)" in shown and "worker 0: ready" in shown and "worker 1: ready" in shown
    unreachable = status("--admin", "127.0.0.1:9")
    assert unreachable.returncode == 2 and "cannot reach" in unreachable.stderr
