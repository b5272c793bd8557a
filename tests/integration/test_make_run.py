"""`make run` end to end: the stack comes up, every printed curl command answers as its
`# expect <status>` line says, and Ctrl-C (SIGINT to the terminal's process group) or SIGTERM stops
every process it started.

Ports are ephemeral and on 127.0.0.1 (RUN_* variables), the issuer's keys go to a temporary
directory, and make is told (`-o`) not to rebuild the venv: the test runs inside it already.
"""

from __future__ import annotations

import http.client
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ext_authz.dev.stack import READY_MARKER
from tests.support.processes import ManagedProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
STAMP = ".venv/.installed-stamp"
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
PORT_NAMES = ("ENVOY_PORT", "ENVOY_ADMIN_PORT", "AUTHZ_PORT", "BACKEND_PORT", "ISSUER_PORT")


def free_ports(n: int) -> list[int]:
    """Ports that were free a moment ago, all different (held open together while choosing)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def stack_env(key_dir: Path) -> dict[str, str]:
    env = {
        f"RUN_{name}": str(port) for name, port in zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True)
    }
    # curl honours proxy variables; nothing here may leave the machine.
    return {**env, "RUN_HOST": "127.0.0.1", "RUN_KEY_DIR": str(key_dir), "NO_PROXY": "*", "no_proxy": "*"}


@dataclass(frozen=True)
class Expectation:
    status: int
    what: str
    command: str


def printed_expectations(lines: list[str]) -> list[Expectation]:
    """Each `# expect <status>: <what>` line with the curl command on the line after it."""
    found = []
    for i, line in enumerate(lines):
        match = re.fullmatch(r"# expect (\d{3}): (.+)", line)
        if match:
            assert i + 1 < len(lines) and lines[i + 1].startswith("curl "), lines[i : i + 2]
            found.append(Expectation(int(match.group(1)), match.group(2), lines[i + 1]))
    return found


def run_curl_command(command: str) -> tuple[int, str]:
    """Run a printed command as a user pasting it would (no shell needed: shlex is its grammar);
    without curl on the machine, send the same request with http.client. Returns (status, body)."""
    argv = shlex.split(command)
    if shutil.which("curl"):
        env = {**os.environ, "NO_PROXY": "*", "no_proxy": "*"}
        result = subprocess.run(argv, capture_output=True, timeout=20, check=False, env=env)
        assert result.returncode == 0, f"{command}\n{result.stderr!r}"
        head, _, body = result.stdout.decode("utf-8", "replace").partition("\r\n\r\n")
        return int(head.split()[1]), body
    return _send_like_curl(argv)


def _send_like_curl(argv: list[str]) -> tuple[int, str]:
    assert argv[0] == "curl"
    method, url, headers = "GET", "", {}
    args = iter(argv[1:])
    for arg in args:
        if arg == "-i":
            continue
        if arg == "-X":
            method = next(args)
        elif arg == "-H":
            name, _, value = next(args).partition(":")
            headers[name.strip()] = value.strip()
        else:
            url = arg
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def started_pids(process: ManagedProcess) -> dict[str, int]:
    pids = {}
    for line in process.output_lines():
        match = re.fullmatch(r"\[run\] started (\S+) pid=(\d+)", line)
        if match:
            pids[match.group(1)] = int(match.group(2))
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # Reaped by nobody yet (a zombie) counts as gone: it runs nothing and holds no port.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def group_members(pgid: int) -> list[int]:
    """Live processes in process group `pgid` (everything make and its children spawned)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def wait_until_gone(process: ManagedProcess, pids: dict[str, int]) -> None:
    try:
        process.popen.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(process.describe_failure(f"still running {STOP_TIMEOUT:g}s after the signal"))
    deadline = time.monotonic() + 5.0
    while any(alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {name: pid for name, pid in pids.items() if alive(pid)} == {}, process.tail()
    assert group_members(process.pid) == []
    process.stop()  # exited already: this only collects the last of its output
    assert "[run] stopped" in process.output_lines(), process.tail()


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[ManagedProcess]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    argv = ["make", "--no-print-directory", "-o", STAMP, "run", f"PY={sys.executable}"]
    process = ManagedProcess(
        "make run",
        argv,
        env=stack_env(tmp_path / "keys"),
        cwd=REPO_ROOT,
        separate_stdout=True,
        keep_lines=2000,
    )
    try:
        yield process
    finally:
        process.stop()


def test_make_run_prints_commands_that_behave_as_printed_and_ctrl_c_stops_it_all(
    make_run: ManagedProcess,
) -> None:
    lines = make_run.wait_for_stdout(lambda seen: READY_MARKER in seen, timeout=STARTUP_TIMEOUT, what="ready")
    expectations = printed_expectations(lines)
    pids = started_pids(make_run)

    assert sorted(e.status for e in expectations) == [200, 200, 401, 401, 403]
    assert set(pids) == {"ext-authz", "envoy"}
    for expectation in expectations:
        status, body = run_curl_command(expectation.command)
        assert status == expectation.status, f"{expectation}\n{body}\n{make_run.tail()}"
        # The fallback for machines without curl sends the same request and gets the same answer.
        assert _send_like_curl(shlex.split(expectation.command))[0] == expectation.status
        if "x-user-id: alice" in expectation.what:
            assert '"x-user-id": ["alice"]' in body  # ext-authz's identity header reached the backend
        if "insufficient_scope" in expectation.what:
            assert "insufficient_scope" in body

    os.killpg(make_run.pid, signal.SIGINT)  # what a terminal's Ctrl-C does

    wait_until_gone(make_run, pids)


def test_sigterm_to_the_stack_alone_stops_what_it_started(tmp_path: Path) -> None:
    """A supervisor's SIGTERM reaches only the stack's own process: it must stop its children."""
    argv = [sys.executable, "-m", "ext_authz.dev", "stack"]
    stack = ManagedProcess(
        "stack", argv, env=stack_env(tmp_path / "keys"), cwd=REPO_ROOT, separate_stdout=True, keep_lines=2000
    )
    try:
        stack.wait_for_stdout(lambda seen: READY_MARKER in seen, timeout=STARTUP_TIMEOUT, what="ready")
        pids = started_pids(stack)
        assert set(pids) == {"ext-authz", "envoy"}

        stack.popen.send_signal(signal.SIGTERM)

        wait_until_gone(stack, pids)
        assert stack.popen.returncode == 0
    finally:
        stack.stop()
