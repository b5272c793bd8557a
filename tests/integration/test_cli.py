"""The command line as operators use it: exit status 2 with the key path on bad config, clean stop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import start_ext_authz

GOOD = """\
listen: 127.0.0.1:0
providers:
  - name: example
    issuer: https://idp.example.com/
    audiences: [api://orders]
    jwks_uri: https://idp.example.com/.well-known/jwks.json
"""


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ext_authz", *args], capture_output=True, text=True, timeout=60, check=False
    )


def write(tmp_path: Path, text: str) -> Path:
    file = tmp_path / "ext-authz.yaml"
    file.write_text(text)
    return file


def test_check_config_ok(tmp_path: Path) -> None:
    result = run("check-config", str(write(tmp_path, GOOD)))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


@pytest.mark.parametrize(
    ("text", "key_path"),
    [
        (GOOD.replace("https://idp.example.com/\n", "http://idp.example.com/\n"), "providers[0].issuer"),
        (GOOD.replace("audiences", "audience"), "providers[0].audience"),
        (GOOD + "rules:\n  - match: {paths: [admin]}\n    require: {}\n", "rules[0].match.paths[0]"),
        ("providers: [\n", "not valid YAML"),
    ],
)
@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_bad_config_exits_2_naming_file_and_key(
    tmp_path: Path, text: str, key_path: str, command: str
) -> None:
    file = write(tmp_path, text)
    args = ["check-config", str(file)] if command == "check-config" else ["serve", "--config", str(file)]
    result = run(*args)
    assert result.returncode == 2
    assert str(file) in result.stderr
    assert key_path in result.stderr
    assert "Traceback" not in result.stderr
    assert '"event": "serving"' not in result.stderr  # nothing was bound


def test_missing_file_exits_2(tmp_path: Path) -> None:
    result = run("check-config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "cannot read" in result.stderr


def test_bad_listen_flag_exits_2(tmp_path: Path) -> None:
    result = run("serve", "--config", str(write(tmp_path, GOOD)), "--listen", "nowhere")
    assert result.returncode == 2
    assert "--listen" in result.stderr


def test_serve_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    server = start_ext_authz(write(tmp_path, GOOD))
    assert server.stop() == 0


def test_busy_port_exits_1(tmp_path: Path) -> None:
    config = write(tmp_path, GOOD)
    with start_ext_authz(config) as first:
        result = run("serve", "--config", str(config), "--listen", first.address)
        assert result.returncode == 1
        assert "cannot listen" in result.stderr
