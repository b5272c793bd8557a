"""Command line: ``ext-authz serve``, ``ext-authz check-config``. Exit 2 on any configuration error."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from ext_authz import __version__, logs, settings
from ext_authz.server import ServeError, serve

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ext-authz", description="Envoy external authorization for JWTs.")
    parser.add_argument("--version", action="version", version=f"ext-authz {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the gRPC Check service")
    serve_cmd.add_argument("--config", required=True, metavar="FILE", help="the YAML config file")
    serve_cmd.add_argument("--listen", metavar="HOST:PORT", help="override the config's listen address")
    serve_cmd.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    check_cmd = commands.add_parser("check-config", help="validate a config file and exit")
    check_cmd.add_argument("file", metavar="FILE")
    return parser


def _load(file: str) -> settings.Settings:
    try:
        return settings.load(file)
    except settings.ConfigError as exc:
        print(f"ext-authz: config error: {file}: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        loaded = _load(args.file)
        print(f"{args.file}: ok ({len(loaded.providers)} providers, {len(loaded.rules)} rules)")
        return 0
    loaded = _load(args.config)
    if args.listen is not None:
        try:
            settings.listen_address(args.listen, "--listen")
        except settings.ConfigError as exc:
            print(f"ext-authz: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    logs.configure(args.log_level)
    try:
        asyncio.run(serve(loaded, listen=args.listen))
    except ServeError as exc:
        print(f"ext-authz: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
