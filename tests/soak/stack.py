"""Starting and stopping the soak's parts: two test IdPs (RS256, ES256), the dev issuer with its
login endpoints, a redis-server that can restart on its own port, `ext-authz serve --workers 2`
with the Redis key cache, an echo backend that remembers little, and Envoy in front with a
distinctive `status_on_error` and a retry policy on the ext_authz gRPC stream."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ext_authz.dev.login import LoginSettings
from ext_authz.dev.plan import envoy_binary
from tests.bench.procs import children
from tests.support.echo import EchoBackend, EchoRequest
from tests.support.envoy import (
    EnvoyProcess,
    _wait_for_admin_address,
    _wait_for_listener_port,
    _wait_until_live,
    envoy_config,
    validate_config,
)
from tests.support.idp import TestIssuer
from tests.support.processes import (
    ExtAuthzProcess,
    ManagedProcess,
    ProcessError,
    json_log_line,
    start_ext_authz,
)
from tests.support.redis import RedisServer, ping
from tests.support.signin import SESSION_SECRET, ThreadedIssuer, threaded_issuer

AUDIENCE = "api"
JWKS_CACHE_SECRET = "soak-jwks-cache-secret-0123456789abcdef"
# Envoy's answer when the Check fails (no ext-authz, a reset stream, a timeout): 510 is never an
# ext-authz status, so such answers are told apart from ext-authz's own 503s.
STATUS_ON_ERROR = 510
STATUS_ON_ERROR_NAME = "NotExtended"
RETRY_POLICY: dict[str, Any] = {
    "retry_on": "reset,connect-failure,unavailable,refused-stream",
    "num_retries": 2,
    "retry_back_off": {"base_interval": "0.05s", "max_interval": "0.25s"},
}
ECHO_KEEP = 500


@dataclass(frozen=True, slots=True)
class Timings:
    """Key-cache settings and the drain, per mode (short mode compresses them with the faults)."""

    refresh_seconds: float
    refetch_min_seconds: float
    fetch_timeout_seconds: float
    token_lifetime: int  # the dev issuer's access tokens: short, so sessions refresh
    drain_seconds: float


class RestartableRedis(RedisServer):
    """A RedisServer that restarts on the same port (clients keep their configured URL)."""

    def restart(self) -> None:
        port = self.port
        self.process.stop()
        deadline = time.monotonic() + 10
        while True:
            process = self._spawn(port)
            if self._wait_until_answering(process, port, min(deadline, time.monotonic() + 3)):
                self._process = process
                return
            process.stop()
            if time.monotonic() > deadline:
                raise ProcessError(f"redis-server did not restart on port {port}")
            time.sleep(0.2)

    def answering(self) -> bool:
        return ping(self.port, timeout=0.5)


class QuietEcho(EchoBackend):
    """The echo backend keeping only its last requests (the soak's answers carry what it saw)."""

    def __init__(self) -> None:
        super().__init__()
        self._recent: deque[EchoRequest] = deque(maxlen=ECHO_KEEP)

    @property
    def requests(self) -> list[EchoRequest]:
        with self._lock:
            return list(self._recent)

    def _record(self, request: EchoRequest) -> None:
        with self._lock:
            self._recent.append(request)


def ext_authz_config(
    rs: TestIssuer, es: TestIssuer, dev_url: str, redis_url: str, timings: Timings, *, variant: str
) -> dict[str, Any]:
    """The config; variants "a" and "b" decide every request of the mix the same way (they differ
    in rule names and an extra rule no request matches), so a reload changes no decision."""
    headers = [{"header": "x-user-id", "claim": "sub"}, {"header": "x-user-groups", "claim": "groups"}]
    keys = {
        "refresh_interval_seconds": timings.refresh_seconds,
        "refetch_min_interval_seconds": timings.refetch_min_seconds,
        "fetch_timeout_seconds": timings.fetch_timeout_seconds,
        "max_stale_seconds": 3600,
        "allow_insecure_http": True,
        "claim_to_headers": headers,
    }
    rules: list[dict[str, Any]] = [
        {"name": f"public-{variant}", "match": {"paths": ["/public/*"]}, "allow": "anonymous"},
        {"name": f"admin-{variant}", "match": {"paths": ["/admin/*"]}, "require": {"groups": ["admin"]}},
        {"name": f"api-{variant}", "match": {"paths": ["/api/*"]}, "require": {}},
        {
            "name": f"app-{variant}",
            "match": {"paths": ["/app/*", "/app"]},
            "login": "dev",
            "require": {"groups": ["staff"]},
        },
    ]
    if variant == "b":
        rules.insert(
            0, {"name": "never-matched-b", "match": {"paths": ["/nothing-here/*"]}, "allow": "anonymous"}
        )
    return {
        "listen": "127.0.0.1:0",
        "admin": "127.0.0.1:0",
        "jwks_cache": {
            "backend": "redis",
            "url": redis_url,
            "secret_file": "jwks-secret",
            "timeout_seconds": 0.5,
        },
        "providers": [
            {"name": "rs", "issuer": rs.url, "audiences": [AUDIENCE], "algorithms": ["RS256"], **keys},
            {"name": "es", "issuer": es.url, "audiences": [AUDIENCE], "algorithms": ["ES256"], **keys},
            {
                "name": "dev",
                "issuer": dev_url,
                "audiences": [AUDIENCE],
                "clock_skew_seconds": 0,
                **keys,
                "login": {
                    "client_id": "web-app",
                    "scopes": ["openid", "profile", "email", "offline_access"],
                },
            },
        ],
        "sessions": {"secret_file": "session-keys", "refresh_before_seconds": 5},
        "shutdown": {"drain_seconds": timings.drain_seconds},
        # Denials only: an allow line per request would cost the soak's two cores more than the
        # decisions themselves (the generator reads the server's output).
        "log": {"decisions": "deny"},
        "rules": rules,
    }


INVALID_CONFIG = "providers: [{name: rs}]\nrules: not-a-list\n"


def soak_envoy_config(authz_address: str, backend_port: int, *, retry: bool) -> dict[str, Any]:
    document = envoy_config(authz_address, backend_port, access_log=False)
    for listener in document["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for http_filter in network_filter["typed_config"].get("http_filters", []):
                    typed = http_filter.get("typed_config", {})
                    if "grpc_service" in typed:
                        typed["status_on_error"] = {"code": STATUS_ON_ERROR_NAME}
                        if retry:
                            typed["grpc_service"]["retry_policy"] = dict(RETRY_POLICY)
    return document


def start_soak_envoy(authz_address: str, backend_port: int, *, retry: bool) -> EnvoyProcess:
    workdir = Path(tempfile.mkdtemp(prefix="ext-authz-soak-envoy-"))
    config = workdir / "envoy.yaml"
    config.write_text(yaml.safe_dump(soak_envoy_config(authz_address, backend_port, retry=retry)))
    admin_path = workdir / "admin-address"
    argv = [envoy_binary(), "-c", str(config), "--admin-address-path", str(admin_path)]
    argv += ["--use-dynamic-base-id", "--concurrency", "1", "-l", "warning"]
    process = ManagedProcess("envoy", argv)
    try:
        deadline = time.monotonic() + 30
        admin_address = _wait_for_admin_address(process, admin_path, deadline)
        port = _wait_for_listener_port(process, admin_address, deadline)
        _wait_until_live(process, admin_address, port, deadline)
    except BaseException:
        process.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return EnvoyProcess(process, workdir, admin_address, port)


def retry_policy_validates(workdir: Path) -> tuple[bool, str]:
    """Whether this Envoy accepts GrpcService.retry_policy (`envoy --mode validate`)."""
    path = workdir / "envoy-validate.yaml"
    path.write_text(yaml.safe_dump(soak_envoy_config("127.0.0.1:1", 1, retry=True)))
    result = validate_config(path)
    return result.returncode == 0, (result.stdout + result.stderr).strip()[-400:]


@dataclass
class Stack:
    workdir: Path
    rs: TestIssuer
    es: TestIssuer
    dev: ThreadedIssuer
    redis: RestartableRedis
    echo: QuietEcho
    authz: ExtAuthzProcess
    envoy: EnvoyProcess
    config_path: Path
    timings: Timings
    retry: bool
    configs: dict[str, str]
    admin: str  # the supervisor's admin listener (HOST:PORT): its metrics add up the workers'

    @property
    def supervisor_pid(self) -> int:
        return self.authz.process.pid

    def workers(self) -> list[int]:
        return children(self.supervisor_pid)

    def write_config(self, variant: str) -> None:
        """Replace the config file atomically (as a ConfigMap's symlink swap does)."""
        temporary = self.config_path.with_suffix(".tmp")
        temporary.write_text(self.configs[variant])
        temporary.replace(self.config_path)


@contextlib.contextmanager
def soak_stack(workdir: Path, timings: Timings, *, retry: bool = True) -> Iterator[Stack]:
    with contextlib.ExitStack() as stack:
        rs = stack.enter_context(TestIssuer(audience=AUDIENCE, alg="RS256"))
        es = stack.enter_context(TestIssuer(audience=AUDIENCE, alg="ES256"))
        settings = LoginSettings(token_lifetime=timings.token_lifetime)
        dev = stack.enter_context(threaded_issuer(workdir, settings))
        redis = stack.enter_context(RestartableRedis())
        echo = stack.enter_context(QuietEcho())
        (workdir / "jwks-secret").write_text(JWKS_CACHE_SECRET + "\n")
        (workdir / "session-keys").write_text(f"{SESSION_SECRET}\n")
        configs = {
            variant: yaml.safe_dump(
                ext_authz_config(rs, es, dev.url, redis.url, timings, variant=variant), sort_keys=False
            )
            for variant in ("a", "b")
        }
        configs["invalid"] = INVALID_CONFIG
        config_path = workdir / "ext-authz.yaml"
        config_path.write_text(configs["a"])
        authz = stack.enter_context(
            start_ext_authz(config_path, extra_args=["--workers", "2"], drain_seconds=None, timeout=30)
        )
        supervising = authz.process.wait_for_line(
            lambda text: '"event": "supervising"' in text, timeout=30, what="supervising"
        )
        record = json_log_line(supervising)
        admin = str(record["admin"]) if record and record.get("admin") else ""
        envoy = stack.enter_context(start_soak_envoy(authz.address, echo.port, retry=retry))
        yield Stack(
            workdir, rs, es, dev, redis, echo, authz, envoy, config_path, timings, retry, configs, admin
        )
