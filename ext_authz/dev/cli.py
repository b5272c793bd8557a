"""The development commands: `ext-authz dev-issuer serve|rotate|mint`, and `python -m ext_authz.dev`,
which adds `echo` and `stack` (`make run`). Usage problems exit 2 with one line on stderr."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ext_authz.dev.echo import DEFAULT_ECHO_PORT, serve_echo
from ext_authz.dev.errors import DevIssuerError
from ext_authz.dev.http import DEFAULT_HOST
from ext_authz.dev.issuer import DEFAULT_PORT, ServeOptions, serve_issuer
from ext_authz.dev.keys import ALGORITHMS, DEFAULT_ALG, DEFAULT_AUDIENCE, DEFAULT_KEY_DIR, KeyDir
from ext_authz.dev.plan import DEFAULT_GATEWAY, ENV_PREFIX, ENVOY_CONFIGS, GATEWAYS
from ext_authz.dev.stack import StackOptions, run_stack
from ext_authz.dev.tokens import CLOCK_SKEW_SECONDS, DEFAULT_TTL, mint, parse_claim

EXIT_USAGE = 2


def _add_key_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key-dir",
        type=Path,
        default=DEFAULT_KEY_DIR,
        metavar="DIR",
        help=f"where the keys and issuer URL live (default {DEFAULT_KEY_DIR}/)",
    )


def add_issuer_commands(commands: Any) -> None:
    """`serve`, `rotate`, `mint` on a subparsers object (dest `dev_command`)."""
    serve = commands.add_parser("serve", help="serve OIDC discovery and a JWKS (DEVELOPMENT ONLY)")
    _add_key_dir(serve)
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"bind address (default {DEFAULT_HOST})")
    serve.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any)"
    )
    serve.add_argument(
        "--issuer-url", metavar="URL", help="the issuer URL to publish (default http://HOST:PORT)"
    )
    serve.add_argument("--audience", help=f"default audience for mint (default {DEFAULT_AUDIENCE})")
    serve.add_argument("--alg", choices=ALGORITHMS, default=DEFAULT_ALG, help="algorithm of a first key")
    serve.add_argument(
        "--allow-non-loopback", action="store_true", help="allow a --host beyond loopback (containers)"
    )
    serve.add_argument(
        "--client-secret", metavar="SECRET", help="sign-in: token requests must authenticate with it"
    )
    serve.add_argument(
        "--client-secret-file", type=Path, metavar="PATH", help="the client secret from a file (not in ps)"
    )
    serve.add_argument(
        "--token-lifetime", type=int, default=300, metavar="SECONDS", help="access/ID tokens (default 300)"
    )
    serve.add_argument(
        "--refresh-lifetime",
        type=int,
        default=86400,
        metavar="SECONDS",
        help="refresh tokens (default 86400)",
    )
    serve.add_argument(
        "--backchannel-logout-uri",
        action="append",
        default=[],
        metavar="URL",
        help="POST a back-channel logout_token here when a session ends (repeatable)",
    )
    rotate = commands.add_parser("rotate", help="add a signing key; older keys stay published")
    _add_key_dir(rotate)
    rotate.add_argument("--alg", choices=ALGORITHMS, default=DEFAULT_ALG, help=f"default {DEFAULT_ALG}")
    mint_cmd = commands.add_parser("mint", help="print a signed token")
    _add_key_dir(mint_cmd)
    mint_cmd.add_argument("--sub", required=True, help="the subject")
    mint_cmd.add_argument("--scope", help='space-separated scopes, e.g. "read write"')
    mint_cmd.add_argument("--aud", help="the audience (default: the key directory's)")
    mint_cmd.add_argument(
        "--ttl",
        type=int,
        default=DEFAULT_TTL,
        help=f"seconds until exp (default {DEFAULT_TTL}; negative: expired)",
    )
    mint_cmd.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra claim; VALUE is JSON or a string",
    )
    mint_cmd.add_argument("--issuer", metavar="URL", help="the iss claim (default: the key directory's)")


def add_parser(commands: Any) -> None:
    """The `dev-issuer` command of `ext-authz`."""
    parser = commands.add_parser(
        "dev-issuer",
        help="DEVELOPMENT ONLY: a local OIDC issuer (serve, rotate, mint)",
        description="DEVELOPMENT ONLY: a local OIDC issuer for trying ext-authz. It signs any token it is "
        "asked to; never configure a real deployment to trust it.",
    )
    add_issuer_commands(parser.add_subparsers(dest="dev_command", required=True))


def run(args: argparse.Namespace) -> int:
    """Run a parsed `dev-issuer` (or module) command; usage problems exit 2 with one line."""
    try:
        return _dispatch(args)
    except DevIssuerError as exc:
        print(f"ext-authz dev-issuer: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _serve_options(args: argparse.Namespace) -> ServeOptions:
    """`serve`'s flags: each is named as the ServeOptions field it sets."""
    return ServeOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeOptions)})


def _dispatch(args: argparse.Namespace) -> int:
    command = args.dev_command
    if command == "serve":
        asyncio.run(serve_issuer(KeyDir(args.key_dir), _serve_options(args)))
        return 0
    if command == "rotate":
        key = KeyDir(args.key_dir).add_key(args.alg)
        print(f"added {key.alg} key {key.kid}; it signs from now on", file=sys.stderr)
        print(key.kid)
        return 0
    if command == "mint":
        claims = [parse_claim(c) for c in args.claim]
        token = mint(
            KeyDir(args.key_dir),
            subject=args.sub,
            scope=args.scope,
            audience=args.aud,
            ttl=args.ttl,
            claims=claims,
            issuer=args.issuer,
        )
        if -CLOCK_SKEW_SECONDS < args.ttl <= 0:
            print(
                f"note: ext-authz accepts a token up to clock_skew_seconds (default {CLOCK_SKEW_SECONDS}) "
                "after it expires; use --ttl -300 for one that is rejected",
                file=sys.stderr,
            )
        print(token)
        return 0
    if command == "echo":
        asyncio.run(serve_echo(host=args.host, port=args.port, allow_non_loopback=args.allow_non_loopback))
        return 0
    if command == "stack":
        if args.envoy_config is not None and args.gateway not in ENVOY_CONFIGS:
            raise DevIssuerError(f"--envoy-config is for an Envoy gateway, not --gateway {args.gateway}")
        envoy_config = args.envoy_config or ENVOY_CONFIGS.get(args.gateway, ENVOY_CONFIGS[DEFAULT_GATEWAY])
        options = StackOptions(envoy_config, args.config, args.key_dir, args.gateway)
        return asyncio.run(run_stack(options, os.environ, sys.stdout, sys.stderr))
    raise AssertionError(f"unknown command {command!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ext_authz.dev",
        description="DEVELOPMENT ONLY: issuer, echo backend, local stack.",
    )
    commands = parser.add_subparsers(dest="dev_command", required=True)
    add_issuer_commands(commands)
    echo = commands.add_parser("echo", help="an HTTP backend that answers with what reached it")
    echo.add_argument("--host", default=DEFAULT_HOST, help=f"bind address (default {DEFAULT_HOST})")
    echo.add_argument("--port", type=int, default=DEFAULT_ECHO_PORT, help=f"default {DEFAULT_ECHO_PORT}")
    echo.add_argument("--allow-non-loopback", action="store_true", help="allow a --host beyond loopback")
    stack = commands.add_parser("stack", help="issuer, echo backend, ext-authz and a gateway (make run)")
    stack.add_argument(
        "--gateway",
        choices=GATEWAYS,
        default=DEFAULT_GATEWAY,
        help="in front of ext-authz: envoy (gRPC, envoy.yaml), envoy-http (deploy/envoy/envoy-http.yaml), "
        "nginx (deploy/nginx/nginx.conf), caddy (deploy/caddy/Caddyfile); default envoy",
    )
    stack.add_argument(
        "--envoy-config",
        type=Path,
        default=None,
        help="the Envoy gateways' config (default: envoy.yaml, or deploy/envoy/envoy-http.yaml)",
    )
    stack.add_argument(
        "--config", type=Path, default=Path("deploy/local/ext-authz.yaml"), help="the ext-authz config"
    )
    stack.add_argument(
        "--key-dir",
        type=Path,
        default=Path(os.environ.get(ENV_PREFIX + "KEY_DIR") or DEFAULT_KEY_DIR),
        metavar="DIR",
        help=f"the dev issuer's keys (default ${ENV_PREFIX}KEY_DIR or {DEFAULT_KEY_DIR}/)",
    )
    return run(parser.parse_args(argv))
