"""Command line: ``ext-authz serve``, ``check-config``, ``explain``, ``test``, ``dev-issuer``.

Exit 2 on any configuration or usage error. ``explain`` exits 0 whatever the decision; ``test``
exits 1 when a case fails.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import uvloop

from ext_authz import __version__, explain, logs, policytest, status, supervisor
from ext_authz.config.credentials import check_workers
from ext_authz.config.model import Settings
from ext_authz.config.parse import load
from ext_authz.config.values import ConfigError
from ext_authz.serveoptions import OptionError, ServeOptions
from ext_authz.server import ServeError, serve
from ext_authz.tracing import TracingUnavailable

EXIT_CONFIG = 2
EXIT_TEST_FAILED = 1
STDIN = "-"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ext-authz", description="Envoy external authorization for JWTs.")
    parser.add_argument("--version", action="version", version=f"ext-authz {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the gRPC Check service")
    ServeOptions.add_arguments(serve_cmd)
    check_cmd = commands.add_parser("check-config", help="validate a config file and exit")
    check_cmd.add_argument("file", metavar="FILE")

    explain_cmd = commands.add_parser(
        "explain", help="show how one request is decided: rules, token, requirements, answer"
    )
    explain_cmd.add_argument("--config", required=True, metavar="FILE", help="the YAML config file")
    explain_cmd.add_argument("--method", default="GET", help="the request method (default GET)")
    explain_cmd.add_argument("--path", required=True, help="the request path, optionally with ?query")
    explain_cmd.add_argument("--host", default="", help="the request's :authority (host[:port])")
    explain_cmd.add_argument(
        "--scheme", default="", choices=("", "http", "https"), help="the request's :scheme (DPoP's htu)"
    )
    explain_cmd.add_argument(
        "--peer-certificate",
        metavar="FILE",
        help="the client's TLS certificate (PEM), as Envoy sends it with include_peer_certificate",
    )
    explain_cmd.add_argument(
        "--header", action="append", default=[], metavar="'NAME: VALUE'", help="a request header (repeatable)"
    )
    explain_cmd.add_argument(
        "--context", action="append", default=[], metavar="KEY=VALUE", help="a context extension (repeatable)"
    )
    explain_cmd.add_argument(
        "--token", metavar="TOKEN", help="a bearer token, put where its provider reads tokens; - reads stdin"
    )
    explain_cmd.add_argument(
        "--jwks", metavar="FILE", help="verify with this JWKS file for every provider (offline)"
    )
    explain_cmd.add_argument("--json", action="store_true", help="print one JSON object")

    test_cmd = commands.add_parser("test", help="run policy test cases against a config (for CI)")
    test_cmd.add_argument("cases", metavar="CASES.yaml", help="the case file")
    test_cmd.add_argument("--config", required=True, metavar="FILE", help="the YAML config file")

    status_cmd = commands.add_parser(
        "status", help="a running server's providers: keys, age, last fetch, staleness, readiness"
    )
    status_cmd.add_argument(
        "--admin",
        default=status.DEFAULT_ADMIN,
        metavar="HOST:PORT",
        help=f"its admin listener (default {status.DEFAULT_ADMIN})",
    )
    status_cmd.add_argument("--json", action="store_true", help="print the admin listener's JSON")
    status_cmd.add_argument("--ca-file", metavar="FILE", help="the admin listener serves TLS: trust this CA")

    from ext_authz.dev import cli as dev_cli  # the one product module that loads the dev tools

    dev_cli.add_parser(commands)
    return parser


def _load(file: str) -> Settings:
    try:
        return load(file)
    except ConfigError as exc:
        print(f"ext-authz: config error: {file}: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def _quiet_logs() -> None:
    """Warnings (a failed key fetch, an unusable key) as JSON lines on stderr; the output itself
    shows dry-run denials, so their log lines are left out."""
    logs.configure("warning")
    logging.getLogger("ext_authz.pipeline").setLevel(logging.ERROR)


def _explain(args: argparse.Namespace) -> int:
    loaded = _load(args.config)
    try:
        headers = [explain.parse_header(h) for h in args.header]
        context = dict(explain.parse_context(c) for c in args.context)
        keys = explain.load_jwks_file(args.jwks) if args.jwks is not None else None
        certificate = (
            explain.read_peer_certificate(args.peer_certificate) if args.peer_certificate is not None else ""
        )
    except explain.UsageError as exc:
        print(f"ext-authz: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    request = explain.build_request(
        args.method,
        args.path,
        host=args.host,
        headers=headers,
        context=context,
        scheme=args.scheme,
        peer_certificate=certificate,
    )
    if args.token is not None:
        token = (sys.stdin.read() if args.token == STDIN else args.token).strip()
        scheme, _, rest = token.partition(" ")
        dpop = scheme.lower() == "dpop"  # `DPoP <token>`: the DPoP scheme (its proof: --header)
        if scheme.lower() == "bearer" or dpop:  # pasted with its scheme: a JWT itself has no space
            token = rest.strip()
        if not token:
            print("ext-authz: --token: the token is empty", file=sys.stderr)
            return EXIT_CONFIG
        provider = explain.provider_for_token(loaded, token)
        location = explain.dpop_location() if dpop else explain.token_location(provider)
        request = explain.with_token(request, location, token)
    _quiet_logs()
    result = asyncio.run(explain.run(loaded, request, keys))
    print(explain.render_json(result) if args.json else explain.render_text(result), end="")
    return 0


def _test(args: argparse.Namespace) -> int:
    loaded = _load(args.config)
    try:
        cases = policytest.load_cases(args.cases, loaded)
    except ConfigError as exc:
        print(f"ext-authz: case file error: {args.cases}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    _quiet_logs()
    outcomes = asyncio.run(policytest.run_cases(loaded, cases))
    for outcome in outcomes:
        print(outcome.line)
    print(policytest.summary(outcomes))
    return 0 if all(o.passed for o in outcomes) else EXIT_TEST_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "explain":
        return _explain(args)
    if args.command == "test":
        return _test(args)
    if args.command == "status":
        return status.run(args.admin, as_json=args.json, ca_file=args.ca_file, out=sys.stdout, err=sys.stderr)
    if args.command == "dev-issuer":
        from ext_authz.dev import cli as dev_cli

        return dev_cli.run(args)
    if args.command == "check-config":
        loaded = _load(args.file)
        print(f"{args.file}: ok ({len(loaded.providers)} providers, {len(loaded.rules)} rules)")
        return 0
    loaded = _load(args.config)
    try:
        options = ServeOptions.from_args(args)
    except OptionError as exc:
        print(f"ext-authz: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        check_workers(loaded, options.workers)
    except ConfigError as exc:
        print(f"ext-authz: config error: {args.config}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.configure(options.log_level or loaded.log.level)
    if options.workers > 1:
        return asyncio.run(supervisor.Supervisor(loaded, options).run())
    run: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    if options.event_loop == "uvloop":
        run = uvloop.run
    try:
        run(serve(loaded, options))
    except ServeError as exc:
        print(f"ext-authz: {exc}", file=sys.stderr)
        return 1
    except TracingUnavailable as exc:
        print(f"ext-authz: config error: {args.config}: tracing.enabled: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
