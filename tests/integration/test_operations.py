"""Operations (issue #7), black box: the real `ext-authz serve` process, real gRPC clients.

Metrics from the admin listener after a known sequence of Checks; one decision log line per
Check on standard output; SIGTERM under a steady load of Checks; a reload every 100 ms under
load, by SIGHUP and by the file watcher, and a Kubernetes ConfigMap symlink swap; /readyz
following the keys. Everything listens on 127.0.0.1 with ephemeral ports (the admin listener
too: `admin: 127.0.0.1:0`, its bound address read from the "admin listening" log line); every
wait has a deadline and every process is stopped at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc
import pytest
import yaml
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from ext_authz import __version__
from ext_authz._proto.envoy.service.auth.v3 import (
    attribute_context_pb2,
    external_auth_pb2,
    external_auth_pb2_grpc,
)
from tests.support.idp import JWKS_PATH, TestIssuer, tamper_signature
from tests.support.processes import ExtAuthzProcess, json_log_line, start_ext_authz

AUDIENCE = "api"
HOST = "api.test"
# Distinctive, so that finding it in a metric label or a log line cannot be a coincidence.
SUBJECT = "user-5f1c0a9e"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
READY_TIMEOUT = 10.0
CHECK_TIMEOUT = 5.0
# Decision log lines under load run into the thousands; log lines (stderr) stay far fewer.
KEEP_LINES = 20_000
# "At once" for a state change seen from outside, with room for a busy CI box.
PROMPT = 1.0


# ---- configuration ---------------------------------------------------------------------------

RULES: list[dict[str, Any]] = [
    {"name": "public", "match": {"paths": ["/public/*"]}, "allow": "anonymous"},
    {"name": "admin", "match": {"paths": ["/admin/*"]}, "require": {"scopes": ["admin"]}},
    {"name": "api", "match": {"paths": ["/api/*"]}, "require": {}},
]

# Two valid configs that differ observably: without a token, /x is 200 under A and 401 under B,
# and the answer's rule (dynamic metadata) names which config decided it.
RULES_A: list[dict[str, Any]] = [
    {"name": "x-open", "match": {"paths": ["/x"]}, "allow": "anonymous"},
    {"name": "api", "match": {"paths": ["/*"]}, "require": {}},
]
RULES_B: list[dict[str, Any]] = [
    {"name": "x-token", "match": {"paths": ["/x"]}, "require": {}},
    {"name": "api", "match": {"paths": ["/*"]}, "require": {}},
]
UNDER_A = (200, "x-open")
UNDER_B = (401, "x-token")


def document(issuer: TestIssuer, rules: Sequence[Mapping[str, Any]] = RULES, **top: Any) -> dict[str, Any]:
    provider = {
        "name": "test",
        "issuer": issuer.url,
        "audiences": [AUDIENCE],
        "fetch_timeout_seconds": 0.5,
    }
    return {"listen": "127.0.0.1:0", "providers": [provider], "rules": list(rules), **top}


def dump(doc: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(doc), sort_keys=False)


def write_atomically(path: Path, text: str) -> None:
    """Write a temporary file beside `path`, then rename it over `path` (one atomic step)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


# ---- clients ---------------------------------------------------------------------------------


def check_request(
    path: str,
    *,
    token: str | None = None,
    method: str = "GET",
    request_id: str | None = None,
    query: str = "",
) -> external_auth_pb2.CheckRequest:
    full_path = f"{path}?{query}" if query else path
    headers = {":method": method, ":path": full_path, ":authority": HOST}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    if request_id is not None:
        headers["x-request-id"] = request_id
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method=method, path=full_path, host=HOST, headers=headers
    )
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )


@dataclass(frozen=True, slots=True)
class Answer:
    """A CheckResponse as Envoy would act on it: the HTTP status and the dynamic metadata."""

    status: int  # 200 for OK, else the denied_response status
    metadata: Mapping[str, Any]

    @property
    def rule(self) -> object:
        return self.metadata.get("rule")

    @property
    def status_and_rule(self) -> tuple[int, object]:
        return self.status, self.rule


def answer_of(response: external_auth_pb2.CheckResponse) -> Answer:
    status = 200 if response.status.code == 0 else int(response.denied_response.status.code)
    return Answer(status, json_format.MessageToDict(response.dynamic_metadata))


class Client:
    """A grpc.aio client of one ext-authz address: Check and grpc.health.v1."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = external_auth_pb2_grpc.AuthorizationStub(self._channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def check_response(
        self, path: str, *, token: str | None = None, **request: Any
    ) -> external_auth_pb2.CheckResponse:
        response: external_auth_pb2.CheckResponse = await self._stub.Check(
            check_request(path, token=token, **request), timeout=CHECK_TIMEOUT
        )
        return response

    async def check(self, path: str, *, token: str | None = None, **request: Any) -> Answer:
        return answer_of(await self.check_response(path, token=token, **request))

    async def health(self) -> int:
        response = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CHECK_TIMEOUT)
        return int(response.status)

    async def wait_health(self, status: int, within: float) -> float:
        """Poll health (as Envoy's active health check would) until `status`; return when it was seen."""
        deadline = time.monotonic() + within
        while True:
            seen = await self.health()
            now = time.monotonic()
            if seen == status:
                return now
            if now >= deadline:
                name = health_pb2.HealthCheckResponse.ServingStatus.Name
                raise AssertionError(f"health not {name(status)} within {within:g}s (last {name(seen)})")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


@dataclass(frozen=True, slots=True)
class Probe:
    """One kind of Check a load sends: a path, with or without a token."""

    name: str
    path: str
    token: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    probe: Probe
    answer: Answer | None  # None: the call failed
    error: str | None  # the gRPC error, when the call failed

    def describe(self) -> str:
        got = self.error if self.answer is None else f"HTTP {self.answer.status} {dict(self.answer.metadata)}"
        return f"{self.probe.name}: {got}"


class Load:
    """A steady load: `workers` clients, each on its own channel, sending the probes in turn,
    one Check after another, until stopped. Every answer or error is recorded."""

    PAUSE = 0.002  # between one answer and the next Check of a worker

    def __init__(self, address: str, probes: Sequence[Probe], workers: int = 4) -> None:
        self._probes = tuple(probes)
        self._stopping = asyncio.Event()
        self.outcomes: list[Outcome] = []
        self._clients = [Client(address) for _ in range(workers)]
        self._tasks = [
            asyncio.create_task(self._run(client, offset), name=f"load-{offset}")
            for offset, client in enumerate(self._clients)
        ]

    async def _run(self, client: Client, offset: int) -> None:
        turn = offset
        while not self._stopping.is_set():
            probe = self._probes[turn % len(self._probes)]
            turn += 1
            try:
                outcome = Outcome(probe, await client.check(probe.path, token=probe.token), None)
            except grpc.aio.AioRpcError as exc:
                outcome = Outcome(probe, None, f"{exc.code().name}: {exc.details()}")
            self.outcomes.append(outcome)
            await asyncio.sleep(self.PAUSE)

    async def stop(self) -> list[Outcome]:
        """Stop sending: each worker finishes the Check it has in flight."""
        self._stopping.set()
        try:
            await asyncio.gather(*self._tasks)
        finally:
            for client in self._clients:
                await client.close()
        return self.outcomes


def summary(outcomes: Sequence[Outcome], limit: int = 10) -> str:
    return "\n".join(outcome.describe() for outcome in outcomes[:limit])


# ---- the server ------------------------------------------------------------------------------


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=CHECK_TIMEOUT) as response:
            return int(response.status), response.read().decode("utf-8")
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode("utf-8")


@dataclass(frozen=True, slots=True)
class Authz:
    """A running ext-authz process (decision log kept apart from the log lines)."""

    server: ExtAuthzProcess

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def popen(self) -> subprocess.Popen[str]:
        return self.server.process.popen

    def log(self, lines: int = 60) -> str:
        return f"--- ext-authz log ---\n{self.server.process.tail(lines)}"

    def log_records(self) -> list[dict[str, object]]:
        """The JSON log lines (standard error) kept so far."""
        return [r for r in map(json_log_line, self.server.process.output_lines()) if r is not None]

    def events(self, prefix: str) -> list[dict[str, object]]:
        return [r for r in self.log_records() if str(r.get("event", "")).startswith(prefix)]

    def admin_url(self, path: str) -> str:
        """The admin listener's URL for `path`, from its "admin listening" log line."""
        line = self.server.process.wait_for_line(
            lambda line: (json_log_line(line) or {}).get("event") == "admin listening",
            timeout=PROMPT,
            what="listening on the admin address",
        )
        record = json_log_line(line)
        assert record is not None
        return f"http://{record['address']}{path}"

    async def get(self, path: str) -> tuple[int, str]:
        return await asyncio.to_thread(http_get, self.admin_url(path))

    async def wait_admin(self, path: str, status: int, within: float) -> float:
        """Poll the admin listener until `path` answers `status`; return when it did."""
        deadline = time.monotonic() + within
        while True:
            seen, _ = await self.get(path)
            now = time.monotonic()
            if seen == status:
                return now
            if now >= deadline:
                raise AssertionError(f"{path} not {status} within {within:g}s (last {seen})\n{self.log()}")
            await asyncio.sleep(0.02)

    async def exit_code(self, by: float) -> int:
        """The exit status; the process must have exited by the time.monotonic() value `by`."""
        return await asyncio.to_thread(self.popen.wait, max(0.0, by - time.monotonic()))


Launch = Callable[..., Authz]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """Start ext-authz from a config document or file; every process is stopped at teardown."""
    started: list[ExtAuthzProcess] = []

    def start(config: Mapping[str, Any] | Path, *, drain_seconds: float | None = 0) -> Authz:
        if isinstance(config, Path):
            path = config
        else:
            path = tmp_path / f"ext-authz-{len(started)}.yaml"
            path.write_text(dump(config))
        server = start_ext_authz(
            path, drain_seconds=drain_seconds, separate_stdout=True, keep_lines=KEEP_LINES
        )
        started.append(server)
        return Authz(server)

    yield start
    with contextlib.ExitStack() as stack:
        for server in reversed(started):
            stack.callback(server.stop)


@pytest.fixture
def issuer() -> Iterator[TestIssuer]:
    with TestIssuer(audience=AUDIENCE) as running:
        yield running


def token_parts(token: str) -> list[str]:
    """The token and each of its segments: none may appear in a log line or a label."""
    return [token, *token.split(".")]


# ---- 1. metrics ------------------------------------------------------------------------------


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def labelled(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: value for (sample, labels), value in samples.items() if sample == name}


def labels(**values: str) -> frozenset[tuple[str, str]]:
    return frozenset(values.items())


async def test_metrics_count_a_known_sequence_of_checks(issuer: TestIssuer, launch: Launch) -> None:
    authz = launch(document(issuer, admin="127.0.0.1:0"))
    token = issuer.mint({"sub": SUBJECT, "scope": "read"})
    async with Client(authz.address) as client:
        await client.wait_health(SERVING, READY_TIMEOUT)
        answers = [await client.check("/api/orders", token=token) for _ in range(3)]
        answers += [await client.check("/api/orders") for _ in range(2)]
        answers.append(await client.check("/admin/users", token=token))
        answers.append(await client.check("/other/thing", token=token))
    assert [a.status for a in answers] == [200, 200, 200, 401, 401, 403, 403], authz.log()

    status, body = await authz.get("/metrics")
    assert status == 200, body
    samples = parse_metrics(body)
    context = f"{body}\n{authz.log()}"
    assert labelled(samples, "ext_authz_checks_total") == {
        labels(decision="allow", status="200", reason="token", provider="test", rule="api"): 3,
        labels(decision="deny", status="401", reason="missing_token", provider="", rule="api"): 2,
        labels(decision="deny", status="403", reason="insufficient_scope", provider="test", rule="admin"): 1,
        labels(decision="deny", status="403", reason="no_matching_rule", provider="", rule=""): 1,
    }, context
    assert samples[("ext_authz_check_duration_seconds_count", frozenset())] == 7, context
    assert samples[("ext_authz_check_duration_seconds_bucket", labels(le="+Inf"))] == 7, context
    assert labelled(samples, "ext_authz_key_fetches_total")[labels(provider="test", outcome="ok")] >= 1
    assert labelled(samples, "ext_authz_key_age_seconds")[labels(provider="test")] >= 0, context
    assert labelled(samples, "ext_authz_build_info") == {labels(version=__version__): 1}, context

    forbidden = [SUBJECT, "/api/orders", "/admin/users", "/other/thing", *token_parts(token)]
    for (name, label_set), _ in samples.items():
        for label, value in label_set:
            assert not any(f in value for f in forbidden), f"{name}{{{label}={value!r}}} is unbounded"
    assert await authz.get("/healthz") == (200, "ok\n")


# ---- 2. decision log -------------------------------------------------------------------------

DECISION_FIELDS = {
    "ts",
    "request_id",
    "method",
    "host",
    "path",
    "decision",
    "status",
    "reason",
    "provider",
    "rule",
    "subject",
    "latency_us",
}


def decisions(lines: Sequence[str]) -> list[dict[str, Any]]:
    entries = []
    for line in lines:
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries


async def test_decision_log_one_line_per_check_without_the_token(issuer: TestIssuer, launch: Launch) -> None:
    authz = launch(document(issuer))  # log defaults: decisions all, sample_rate 1.0, subject hash
    token = issuer.mint({"sub": SUBJECT, "scope": "read"})
    forged = tamper_signature(issuer.mint({"sub": SUBJECT}))
    sent = [
        ("req-allow", "GET", "/api/orders", token, "debug=1&access_token=nope"),
        ("req-missing", "GET", "/api/orders", None, ""),
        ("req-scope", "POST", "/admin/users", token, ""),
        ("req-forged", "GET", "/api/orders", forged, ""),
        ("req-no-rule", "DELETE", "/nowhere", token, ""),
    ]
    started = datetime.now(UTC)
    async with Client(authz.address) as client:
        await client.wait_health(SERVING, READY_TIMEOUT)
        responses = [
            await client.check_response(path, token=bearer, method=method, request_id=rid, query=query)
            for rid, method, path, bearer, query in sent
        ]
    for (rid, *_), response in zip(sent, responses, strict=True):
        assert answer_of(response).metadata.get("request_id") == rid, response

    lines = await asyncio.to_thread(
        authz.server.process.wait_for_stdout,
        lambda lines: len(lines) >= len(sent),
        timeout=5,
        what=f"{len(sent)} decision lines",
    )
    entries = decisions(lines)
    assert len(entries) == len(sent), lines
    for entry in entries:
        assert set(entry) == DECISION_FIELDS, entry
        assert isinstance(entry["latency_us"], int), entry
        assert 0 <= entry["latency_us"] < 5_000_000, entry
        ts = datetime.fromisoformat(str(entry["ts"]).replace("Z", "+00:00"))
        assert ts.tzinfo is not None, entry
        assert abs((ts - started).total_seconds()) < 30, entry
        assert entry["host"] == HOST, entry
    shown = [
        {
            k: e[k]
            for k in ("request_id", "method", "path", "decision", "status", "reason", "provider", "rule")
        }
        for e in entries
    ]
    assert shown == [
        {
            "request_id": "req-allow",
            "method": "GET",
            "path": "/api/orders",
            "decision": "allow",
            "status": 200,
            "reason": "token",
            "provider": "test",
            "rule": "api",
        },
        {
            "request_id": "req-missing",
            "method": "GET",
            "path": "/api/orders",
            "decision": "deny",
            "status": 401,
            "reason": "missing_token",
            "provider": None,
            "rule": "api",
        },
        {
            "request_id": "req-scope",
            "method": "POST",
            "path": "/admin/users",
            "decision": "deny",
            "status": 403,
            "reason": "insufficient_scope",
            "provider": "test",
            "rule": "admin",
        },
        {
            "request_id": "req-forged",
            "method": "GET",
            "path": "/api/orders",
            "decision": "deny",
            "status": 401,
            "reason": "bad_signature",
            "provider": None,
            "rule": "api",
        },
        {
            "request_id": "req-no-rule",
            "method": "DELETE",
            "path": "/nowhere",
            "decision": "deny",
            "status": 403,
            "reason": "no_matching_rule",
            "provider": None,
            "rule": "",
        },
    ], lines
    # Hashed by default: a stable pseudonym for the verified subject, never the subject itself.
    subjects = [e["subject"] for e in entries]
    assert isinstance(subjects[0], str), entries
    assert subjects[0] == subjects[2], entries
    assert SUBJECT not in subjects[0], entries
    assert subjects[1] is None and subjects[3] is None and subjects[4] in (None, subjects[0]), entries

    # No token, signature or payload segment anywhere: decision lines and log lines alike.
    everything = lines + authz.server.process.output_lines()
    for secret in token_parts(token) + token_parts(forged):
        leaked = [line for line in everything if secret in line]
        assert not leaked, leaked
    assert not [line for line in everything if SUBJECT in line], everything
    assert not [line for line in lines if "access_token" in line], lines  # the query is not logged
    # The other logs are JSON lines too (on standard error).
    assert all(json_log_line(line) is not None for line in authz.server.process.output_lines()), authz.log()


async def test_decision_log_deny_only(issuer: TestIssuer, launch: Launch) -> None:
    authz = launch(document(issuer, log={"decisions": "deny"}))
    token = issuer.mint({"sub": SUBJECT})
    async with Client(authz.address) as client:
        await client.wait_health(SERVING, READY_TIMEOUT)
        assert (await client.check("/api/orders", token=token, request_id="req-allow")).status == 200
        assert (await client.check("/api/orders", request_id="req-deny")).status == 401
    # Lines are written in the order Checks are decided: once the denial's line is there, an
    # allow line would be there before it.
    lines = await asyncio.to_thread(
        authz.server.process.wait_for_stdout,
        lambda lines: any("req-deny" in line for line in lines),
        timeout=5,
        what="the denial's decision line",
    )
    assert [e["request_id"] for e in decisions(lines)] == ["req-deny"], lines


# ---- 3. graceful shutdown --------------------------------------------------------------------

DRAIN = 2.0
GRACE = 5.0
EXIT_MARGIN = 3.0


async def test_sigterm_under_load_fails_no_check_and_exits_0(issuer: TestIssuer, launch: Launch) -> None:
    authz = launch(
        document(issuer, admin="127.0.0.1:0", shutdown={"drain_seconds": DRAIN, "grace_seconds": GRACE}),
        drain_seconds=None,  # the config's shutdown settings, not the harness's 0
    )
    token = issuer.mint({"sub": SUBJECT})
    probes = [Probe("allow", "/api/orders", token), Probe("missing-token", "/api/orders")]
    expected = {"allow": 200, "missing-token": 401}
    async with Client(authz.address) as watcher:
        await watcher.wait_health(SERVING, READY_TIMEOUT)
        assert (await authz.get("/readyz"))[0] == 200
        load = Load(authz.address, probes)
        try:
            await asyncio.sleep(1.0)
            assert load.outcomes, "the load sent nothing"
            authz.popen.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            # Like Envoy's health checker: NOT_SERVING at once, then stop sending.
            not_serving = await watcher.wait_health(NOT_SERVING, PROMPT)
        finally:
            outcomes = await load.stop()
        assert not_serving - signalled <= PROMPT
        assert (await authz.get("/readyz"))[0] == 503, authz.log()
        # A straggler that has not heard yet is still answered, well into the drain.
        await asyncio.sleep(max(0.0, signalled + DRAIN / 2 - time.monotonic()))
        late = await watcher.check("/api/orders", token=token)
        assert late.status == 200, authz.log()
    code = await authz.exit_code(by=signalled + DRAIN + GRACE + EXIT_MARGIN)
    exited = time.monotonic() - signalled
    assert code == 0, authz.log()
    assert exited >= DRAIN - 0.25, f"stopped after {exited:.2f}s, before the {DRAIN:g}s drain"

    failed = [o for o in outcomes if o.answer is None or o.answer.status != expected[o.probe.name]]
    assert not failed, f"{len(failed)} of {len(outcomes)} Checks failed:\n{summary(failed)}\n{authz.log()}"


# ---- 4. hot reload ---------------------------------------------------------------------------

STORM_SECONDS = 10.0
STORM_PERIOD = 0.1
WATCH_NOTICE = 1.5  # the file watcher polls every second


def storm_files(issuer: TestIssuer) -> dict[str, str]:
    """Config A, config B, and two invalid files (not YAML; a config with an unknown key)."""
    return {
        "A": dump(document(issuer, RULES_A)),
        "B": dump(document(issuer, RULES_B)),
        "not-yaml": "providers: [\n  {name: test\n",
        "unknown-key": dump({**document(issuer, RULES_B), "rulez": []}),
    }


CYCLE = ("A", "not-yaml", "B", "unknown-key")


async def test_reload_every_100ms_under_load_fails_no_check(
    issuer: TestIssuer, launch: Launch, tmp_path: Path
) -> None:
    files = storm_files(issuer)
    path = tmp_path / "ext-authz.yaml"
    write_atomically(path, files["A"])
    authz = launch(path)
    token = issuer.mint({"sub": SUBJECT})
    probes = [Probe("no-token", "/x"), Probe("token", "/x", token)]
    allowed = {"no-token": {UNDER_A, UNDER_B}, "token": {(200, "x-open"), (200, "x-token")}}
    steps = round(STORM_SECONDS / STORM_PERIOD)
    final = "A"
    async with Client(authz.address) as probe:
        await probe.wait_health(SERVING, READY_TIMEOUT)
        assert (await probe.check("/x")).status_and_rule == UNDER_A, authz.log()
        load = Load(authz.address, probes)
        try:
            began = time.monotonic()
            for step in range(steps):
                if step == steps - 1:
                    # The last write is valid and differs from the config in force, so that the
                    # check below proves it was noticed.
                    final = "B" if (await probe.check("/x")).status_and_rule == UNDER_A else "A"
                    name = final
                else:
                    name = CYCLE[step % len(CYCLE)]
                await asyncio.to_thread(write_atomically, path, files[name])
                if step < steps // 2:  # SIGHUP after each write; then the file watcher alone
                    authz.popen.send_signal(signal.SIGHUP)
                await asyncio.sleep(max(0.0, began + (step + 1) * STORM_PERIOD - time.monotonic()))
            await asyncio.sleep(WATCH_NOTICE)
        finally:
            outcomes = await load.stop()
        final_answer = (await probe.check("/x")).status_and_rule
        assert final_answer == (UNDER_A if final == "A" else UNDER_B), (
            f"config {final} not in force\n{authz.log()}"
        )
        assert await probe.health() == SERVING, authz.log()
    authz.server.process.check_alive()

    bad = [o for o in outcomes if o.answer is None or o.answer.status_and_rule not in allowed[o.probe.name]]
    assert not bad, (
        f"{len(bad)} of {len(outcomes)} Checks failed or inconsistent:\n{summary(bad)}\n{authz.log()}"
    )
    seen = {o.answer.status_and_rule for o in outcomes if o.answer is not None and o.probe.name == "no-token"}
    assert seen == {UNDER_A, UNDER_B}, f"the storm never switched configs: {seen}\n{authz.log()}"
    rejected = authz.events("config reload rejected")
    reloaded = authz.events("config reloaded")
    # The SIGHUP half alone writes 25 invalid and 25 valid files; signals that arrive during a
    # reload coalesce into one, so ask for far fewer than that.
    assert len(rejected) >= steps // 10, authz.log()
    assert len(reloaded) >= steps // 10, authz.log()
    assert {r.get("reason") for r in reloaded} >= {"SIGHUP", "file changed"}, authz.log()
    assert len(outcomes) > 500, f"only {len(outcomes)} Checks in {STORM_SECONDS:g}s"


CONFIGMAP_NOTICE = 5.0


def configmap_version(mount: Path, text: str, stamp: str) -> str:
    """A new timestamped directory of the ConfigMap volume holding config.yaml; returns its name."""
    name = f"..{stamp}"
    (mount / name).mkdir()
    (mount / name / "config.yaml").write_text(text)
    return name


async def test_configmap_symlink_swap_is_noticed(issuer: TestIssuer, launch: Launch, tmp_path: Path) -> None:
    # The kubelet's layout: config.yaml -> ..data/config.yaml, ..data -> ..<timestamp>; an update
    # writes a new timestamped directory and renames a new ..data link over the old one.
    files = storm_files(issuer)
    mount = tmp_path / "configmap"
    mount.mkdir()
    first = configmap_version(mount, files["A"], "2026_01_01_00_00_00.000000001")
    (mount / "..data").symlink_to(first)
    (mount / "config.yaml").symlink_to("..data/config.yaml")
    authz = launch(mount / "config.yaml")
    async with Client(authz.address) as client:
        await client.wait_health(SERVING, READY_TIMEOUT)
        assert (await client.check("/x")).status_and_rule == UNDER_A, authz.log()

        second = configmap_version(mount, files["B"], "2026_01_01_00_01_00.000000002")
        (mount / "..data_tmp").symlink_to(second)
        os.replace(mount / "..data_tmp", mount / "..data")
        for stale in (mount / first).iterdir():
            stale.unlink()
        (mount / first).rmdir()
        swapped = time.monotonic()
        while (answer := (await client.check("/x")).status_and_rule) != UNDER_B:
            assert answer == UNDER_A, f"{answer}\n{authz.log()}"
            assert time.monotonic() - swapped < CONFIGMAP_NOTICE, f"swap not noticed\n{authz.log()}"
            await asyncio.sleep(0.05)
    assert [r.get("reason") for r in authz.events("config reloaded")] == ["file changed"], authz.log()


# ---- 5. /readyz follows the keys ------------------------------------------------------------

RECOVERY = 5.0  # start-up retries back off from about 1 s
DEFAULT_GRACE = 10.0


async def test_readyz_follows_the_keys(issuer: TestIssuer, launch: Launch) -> None:
    issuer.fail_path(JWKS_PATH, 500)
    authz = launch(document(issuer, admin="127.0.0.1:0"), drain_seconds=DRAIN)
    await asyncio.to_thread(issuer.wait_for_count, JWKS_PATH, 1, READY_TIMEOUT)
    async with Client(authz.address) as client:
        assert await authz.get("/readyz") == (503, "not ready\n"), authz.log()
        assert await client.health() == NOT_SERVING
        assert (await authz.get("/healthz"))[0] == 200  # alive, just not ready

        issuer.fail_path(JWKS_PATH, None)
        healed = time.monotonic()
        ready = await authz.wait_admin("/readyz", 200, RECOVERY)
        assert ready - healed <= RECOVERY
        assert await client.health() == SERVING

        authz.popen.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert await authz.wait_admin("/readyz", 503, PROMPT) - signalled <= PROMPT
    assert await authz.exit_code(by=signalled + DRAIN + DEFAULT_GRACE + EXIT_MARGIN) == 0, authz.log()
