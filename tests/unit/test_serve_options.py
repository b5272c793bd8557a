"""serve's options as one value (ServeOptions), a supervisor's worker argv, and the signal helper."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

import pytest

from ext_authz import signals
from ext_authz.config.parse import parse
from ext_authz.serveoptions import OptionError, ServeOptions
from ext_authz.supervisor import Supervisor

OPTION_SETS = [
    ServeOptions(config="ext-authz.yaml"),
    ServeOptions(config="/etc/ext-authz/config.yaml", listen="0.0.0.0:9001", event_loop="asyncio"),
    ServeOptions(config="c.yaml", log_level="debug", drain_seconds=0.0, workers=4),
    ServeOptions(config="c.yaml", drain_seconds=2.5, event_loop="uvloop", listen="[::1]:0"),
    ServeOptions(
        config="c.yaml",
        listen="127.0.0.1:40001",
        reuse_port=True,
        admin_listen="127.0.0.1:0",
        admin_address_file="/tmp/worker-0.admin",
        admin_plaintext=True,
        event_loop="asyncio",
        log_level="warning",
    ),
]


@pytest.mark.parametrize("options", OPTION_SETS)
def test_options_survive_the_argv_round_trip(options: ServeOptions) -> None:
    assert ServeOptions.from_argv(options.to_argv()) == options


def test_the_defaults_are_the_clis() -> None:
    assert ServeOptions.from_argv(["--config", "c.yaml"]) == ServeOptions(config="c.yaml")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--listen", "nonsense"], "--listen"),
        (["--drain-seconds", "601"], "--drain-seconds: must be between 0 and 600"),
        (["--drain-seconds", "-1"], "--drain-seconds: must be between 0 and 600"),
        (["--workers", "0"], "--workers: must be a number from 1 to 64, or auto"),
        (["--workers", "many"], "--workers: must be a number from 1 to 64, or auto"),
    ],
)
def test_out_of_range_options_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(OptionError, match=message):
        ServeOptions.from_argv(["--config", "c.yaml", *argv])


def test_auto_workers_is_one_per_available_core() -> None:
    workers = ServeOptions.from_argv(["--config", "c.yaml", "--workers", "auto"]).workers
    assert workers == max(1, len(os.sched_getaffinity(0)))


# ---- the supervisor's workers --------------------------------------------------------------------


def supervisor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: ServeOptions, **top: object
) -> Supervisor:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its run directory goes there
    document = {"providers": [{"name": "idp", "issuer": "https://idp.example.com/", "audiences": ["api"]}]}
    return Supervisor(parse({**document, **top}), options)


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_workers_run_the_supervisors_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, event_loop: str
) -> None:
    options = ServeOptions(config="c.yaml", event_loop=event_loop, workers=3)  # type: ignore[arg-type]
    argv = supervisor(tmp_path, monkeypatch, options).worker_argv(1, "127.0.0.1:40001")
    assert argv[:4] == [sys.executable, "-m", "ext_authz", "serve"]
    assert ServeOptions.from_argv(argv[4:]).event_loop == event_loop
    assert not any(arg.startswith("--worker-index") for arg in argv)


def test_a_worker_gets_the_supervisors_options_on_the_shared_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = ServeOptions(
        config="c.yaml", listen="0.0.0.0:0", log_level="debug", drain_seconds=1.0, workers=2
    )
    boss = supervisor(tmp_path, monkeypatch, options, admin="127.0.0.1:0")
    worker = ServeOptions.from_argv(boss.worker_argv(0, "0.0.0.0:40001")[4:])
    assert worker == dataclasses.replace(
        options,
        listen="0.0.0.0:40001",
        workers=1,
        reuse_port=True,
        admin_listen="127.0.0.1:0",
        admin_address_file=worker.admin_address_file,
        admin_plaintext=True,
    )
    assert worker.admin_address_file is not None and worker.admin_address_file.startswith(str(tmp_path))


def test_without_an_admin_listener_workers_get_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    options = ServeOptions(config="c.yaml", workers=2)
    argv = supervisor(tmp_path, monkeypatch, options).worker_argv(0, "127.0.0.1:40001")
    assert not {"--admin-listen", "--admin-address-file", "--admin-plaintext"} & set(argv)


# ---- signals.handling ----------------------------------------------------------------------------


def previous_handler(signum: int, frame: FrameType | None) -> None:
    raise AssertionError("the loop's handler should have run instead")


async def test_handlers_run_on_the_loop_and_the_previous_ones_come_back() -> None:
    before = {sig: signal.signal(sig, previous_handler) for sig in (signal.SIGHUP, signal.SIGUSR1)}
    try:
        seen: list[str] = []
        arrived = asyncio.Event()

        def hangup() -> None:
            seen.append("hup")
            arrived.set()

        with signals.handling({signal.SIGHUP: hangup, signal.SIGUSR1: lambda: seen.append("usr1")}):
            os.kill(os.getpid(), signal.SIGHUP)
            async with asyncio.timeout(5):
                await arrived.wait()
        assert seen == ["hup"]
        assert signal.getsignal(signal.SIGHUP) is previous_handler
        assert signal.getsignal(signal.SIGUSR1) is previous_handler
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


async def test_sigint_and_ignored_signals_come_back_as_they_were() -> None:
    interrupt = signal.getsignal(signal.SIGINT)
    ignored = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        with signals.handling({signal.SIGINT: lambda: None, signal.SIGUSR2: lambda: None}):
            assert signal.getsignal(signal.SIGUSR2) != signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is interrupt
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR2, ignored)


async def test_the_handlers_are_removed_when_the_block_raises() -> None:
    with pytest.raises(RuntimeError, match="boom"), signals.handling({signal.SIGUSR1: lambda: None}):
        raise RuntimeError("boom")
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


async def test_outside_the_main_thread_the_block_runs_without_handlers() -> None:
    def in_a_thread() -> bool:
        async def block() -> bool:
            with signals.handling({signal.SIGUSR1: lambda: None}):
                return True

        return asyncio.run(block())

    assert await asyncio.to_thread(in_a_thread)
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
