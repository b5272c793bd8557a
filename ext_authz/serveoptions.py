"""``ext-authz serve``'s command-line options as one value: parsed once by the CLI, and handed to a
supervisor's workers through :meth:`ServeOptions.to_argv`, which :meth:`ServeOptions.from_argv`
reads back (the worker's CLI parses the same arguments), so a worker runs with every option its
supervisor was given.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

from ext_authz.config.parse import listen_address
from ext_authz.config.values import ConfigError

EventLoop = Literal["asyncio", "uvloop"]
MAX_DRAIN_SECONDS = 600
DEFAULT_THREADS = 2  # request threads per process; make bench measures 2, 4 and 8 (X1, X1t4, X1t8)
MAX_THREADS = 64


class OptionError(Exception):
    """A serve option is out of range; the message names it (``--workers: ...``)."""


def worker_count(value: str) -> int:
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    count = int(value)
    if not 1 <= count <= 64:
        raise ValueError(value)
    return count


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """What ``serve`` takes besides the config file's contents; None: the config's own value."""

    config: str
    listen: str | None = None
    listen_http: str | None = None
    log_level: str | None = None
    drain_seconds: float | None = None
    event_loop: EventLoop = "uvloop"
    workers: int = 1
    threads: int = DEFAULT_THREADS
    # Set by the supervisor for its workers.
    reuse_port: bool = False
    admin_listen: str | None = None
    admin_address_file: str | None = None
    admin_plaintext: bool = False

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--config", required=True, metavar="FILE", help="the YAML config file")
        parser.add_argument("--listen", metavar="HOST:PORT", help="override the config's listen address")
        parser.add_argument(
            "--listen-http", metavar="HOST:PORT", help="override the config's listen_http (the HTTP listener)"
        )
        parser.add_argument(
            "--log-level",
            choices=["debug", "info", "warning", "error"],
            help="override the config's log.level",
        )
        parser.add_argument(
            "--drain-seconds",
            type=float,
            metavar="S",
            help="override shutdown.drain_seconds (e.g. 0 when nothing routes traffic here)",
        )
        parser.add_argument(
            "--event-loop",
            choices=["asyncio", "uvloop"],
            default="uvloop",
            help="the event loop for I/O (key fetches, Redis, reloads, the admin listener)",
        )
        parser.add_argument(
            "--workers",
            default="1",
            metavar="N|auto",
            help="worker processes sharing the port (auto: one per available core); default 1",
        )
        parser.add_argument(
            "--threads",
            type=int,
            default=DEFAULT_THREADS,
            metavar="N",
            help=f"request threads per process that decide Checks (default {DEFAULT_THREADS})",
        )
        parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
        parser.add_argument("--admin-listen", help=argparse.SUPPRESS)
        parser.add_argument("--admin-address-file", help=argparse.SUPPRESS)
        parser.add_argument("--admin-plaintext", action="store_true", help=argparse.SUPPRESS)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeOptions:
        """The parsed arguments, checked (listen, drain, workers, threads, in order). Raises OptionError."""
        for flag, value in (("--listen", args.listen), ("--listen-http", args.listen_http)):
            if value is not None:
                try:
                    listen_address(value, flag)
                except ConfigError as exc:
                    raise OptionError(str(exc)) from None
        if args.drain_seconds is not None and not 0 <= args.drain_seconds <= MAX_DRAIN_SECONDS:
            raise OptionError(f"--drain-seconds: must be between 0 and {MAX_DRAIN_SECONDS}")
        try:
            workers = worker_count(args.workers)
        except ValueError:
            raise OptionError("--workers: must be a number from 1 to 64, or auto") from None
        if not 1 <= args.threads <= MAX_THREADS:
            raise OptionError(f"--threads: must be a number from 1 to {MAX_THREADS}")
        # The argparse destinations are the field names (add_arguments above).
        values = {field.name: getattr(args, field.name) for field in fields(cls)}
        return cls(**{**values, "workers": workers})

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> ServeOptions:
        """Parse ``serve``'s arguments (without the ``serve`` itself). Raises OptionError."""
        parser = argparse.ArgumentParser(prog="ext-authz serve")
        cls.add_arguments(parser)
        return cls.from_args(parser.parse_args(list(argv)))

    def to_argv(self) -> list[str]:
        """The arguments that :meth:`from_argv` turns back into these options."""
        # --name=value: a value that starts with "-" (a file named -x.yaml) stays a value.
        argv = [f"--config={self.config}"]
        if self.listen is not None:
            argv += [f"--listen={self.listen}"]
        if self.listen_http is not None:
            argv += [f"--listen-http={self.listen_http}"]
        if self.log_level is not None:
            argv += [f"--log-level={self.log_level}"]
        if self.drain_seconds is not None:
            argv += [f"--drain-seconds={self.drain_seconds}"]
        argv += [f"--event-loop={self.event_loop}"]
        if self.workers != 1:
            argv += [f"--workers={self.workers}"]
        if self.threads != DEFAULT_THREADS:
            argv += [f"--threads={self.threads}"]
        if self.reuse_port:
            argv += ["--reuse-port"]
        if self.admin_listen is not None:
            argv += [f"--admin-listen={self.admin_listen}"]
        if self.admin_address_file is not None:
            argv += [f"--admin-address-file={self.admin_address_file}"]
        if self.admin_plaintext:
            argv += ["--admin-plaintext"]
        return argv
