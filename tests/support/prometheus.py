"""Run Debian's `prometheus` binary for a test: one scrape target, a temp TSDB, a query helper.

The server listens on 127.0.0.1 at a port that was free a moment ago (Prometheus cannot bind
port 0 and report it, so a taken port is retried), keeps its TSDB in a directory of the test's,
scrapes one target every second, and is always stopped on leaving the ``with`` block. Every
wait and every HTTP call has a deadline.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import yaml

from tests.support.lifecycle import StopOnExit
from tests.support.processes import ManagedProcess, ProcessError
from tests.support.redis import free_port

HOST = "127.0.0.1"
READY_TIMEOUT = 20.0
HTTP_TIMEOUT = 5.0
SCRAPE_INTERVAL = "1s"
PORT_ATTEMPTS = 3


class PrometheusError(RuntimeError):
    """A query failed: an HTTP error, or `"status": "error"` in the answer."""


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise ProcessError("prometheus is not installed (`make tools` installs the Debian package)")
    return found


def scrape_config(target: str, *, job: str, interval: str = SCRAPE_INTERVAL) -> dict[str, Any]:
    """A prometheus.yml that scrapes `target` (host:port, path /metrics) as `job`."""
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
        "scrape_configs": [
            {"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": [target]}]}
        ],
    }


class Prometheus(StopOnExit):
    """A running Prometheus scraping one target; ``query`` runs instant queries."""

    def __init__(self, target: str, *, job: str = "ext-authz", ready_timeout: float = READY_TIMEOUT) -> None:
        self.target = target
        self.job = job
        self._dir = Path(tempfile.mkdtemp(prefix="prometheus-test-"))
        self._process: ManagedProcess | None = None
        self.address = ""
        config = self._dir / "prometheus.yml"
        config.write_text(yaml.safe_dump(scrape_config(target, job=job)))
        try:
            self._start(config, ready_timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, config: Path, ready_timeout: float) -> None:
        for attempt in range(PORT_ATTEMPTS):
            address = f"{HOST}:{free_port()}"
            process = ManagedProcess(
                "prometheus",
                [
                    prometheus_binary(),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self._dir / 'data'}",
                    f"--web.listen-address={address}",
                    "--log.level=warn",
                    "--storage.tsdb.retention.time=1h",
                ],
                cwd=self._dir,
            )
            self._process, self.address = process, address
            try:
                self._wait_ready(ready_timeout)
                return
            except ProcessError:
                lost_port = "address already in use" in process.tail().lower()
                process.stop()
                self._process = None
                if not lost_port or attempt == PORT_ATTEMPTS - 1:
                    raise

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def process(self) -> ManagedProcess:
        if self._process is None:
            raise ProcessError("prometheus is not running")
        return self._process

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.process.check_alive()
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ProcessError(self.process.describe_failure(f"not ready within {timeout:g}s"))
            time.sleep(0.1)

    def api(self, path: str, params: dict[str, str]) -> Any:
        """GET /api/v1/<path>; the `data` of a successful answer, else PrometheusError."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:  # 400 (bad expression), 422 (cannot execute), ...
            try:
                body = json.load(error)
            except ValueError:
                raise PrometheusError(f"{path} {params}: HTTP {error.code}") from error
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; the result samples (a vector), or [scalar] for a scalar result."""
        data = self.api("query", {"query": expr})
        result = data["result"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": result}]
        return list(result)

    def values(self, expr: str, by: str) -> dict[str, float]:
        """An instant query's values keyed by one label."""
        return {sample["metric"].get(by, ""): float(sample["value"][1]) for sample in self.query(expr)}

    def wait_for(self, condition: Callable[[], bool], *, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            self.process.check_alive()
            if time.monotonic() > deadline:
                raise ProcessError(self.process.describe_failure(f"{what}: not within {timeout:g}s"))
            time.sleep(0.2)

    def targets_up(self) -> bool:
        return self.values(f'up{{job="{self.job}"}}', "instance").get(self.target) == 1.0

    def stop(self) -> int | None:
        code = None
        if self._process is not None:
            code = self._process.stop()
            self._process = None
        shutil.rmtree(self._dir, ignore_errors=True)
        return code

    def __enter__(self) -> Self:
        return self
