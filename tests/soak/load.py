"""The load generator: a known request mix at a fixed rate (after a closed-loop probe of the maximum),
browser sessions that sign in, navigate and refresh, and a sampler of RSS and open FDs.

Every request records what it must get (`kind`, the kid and subject of its token) beside what it
got; the checker judges them after the run, against the fault windows."""

from __future__ import annotations

import http.client
import itertools
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tests.bench.procs import rss_mib
from tests.soak.stack import Stack
from tests.support.echo import EchoBackend
from tests.support.envoy import HttpResponse
from tests.support.idp import PrivateKey, TestIssuer, generate_key
from tests.support.signin import CookieBrowser

# The mix, one cycle: each kind's share of the load is its count here.
MIX = (
    ("rs_cached", 3),
    ("es_cached", 3),
    ("rs_new", 2),
    ("es_new", 2),
    ("expired", 1),
    ("forged", 1),
    ("wrong_aud", 1),
    ("no_token", 1),
    ("anonymous", 1),
    ("denied_rule", 1),
    ("retired", 1),
)
MUST_ALLOW = frozenset({"rs_cached", "es_cached", "rs_new", "es_new", "anonymous", "session"})
MUST_DENY = {"expired": 401, "forged": 401, "wrong_aud": 401, "no_token": 401, "denied_rule": 403}
SIGN_IN = "sign_in"  # one whole sign-in flow, recorded as 200 when every step answered as it must
CONNECTIONS = 8
REQUEST_TIMEOUT = 10.0


@dataclass(slots=True)
class Outcome:
    kind: str
    sent: float  # seconds since the run's start
    latency: float
    status: int  # 0: no HTTP answer (connection error)
    kid: str | None = None
    subject: str | None = None  # the identity the backend must see (x-user-id)
    seen: str | None = None  # the x-user-id the backend saw; None if the backend was not reached
    error: str | None = None  # ext-authz's JSON "error", or what went wrong
    authz_denial: bool = False  # an answer made by ext-authz (JSON error, cache-control no-store)
    retry_after: bool = False
    refreshed: bool = False  # a session navigation whose answer renewed the cookie


@dataclass
class Issuing:
    """One IdP's keys as the soak sees them: the signing kid and when each kid was published and
    removed (the checker's windows), and the cached token of each kid."""

    name: str
    issuer: TestIssuer
    published: dict[str, float] = field(default_factory=dict)
    removed: dict[str, float] = field(default_factory=dict)
    cached: dict[str, str] = field(default_factory=dict)
    retired: list[tuple[str, str]] = field(default_factory=list)  # (kid, token) of former signing keys

    def __post_init__(self) -> None:
        self.published[self.issuer.default_kid] = 0.0


class KeyBook:
    def __init__(
        self, rs: TestIssuer, es: TestIssuer, clock: Callable[[], float], *, retired_grace: float
    ) -> None:
        self.lock = threading.Lock()
        self.clock = clock
        self.retired_grace = retired_grace  # a removed key's tokens are still sent this long
        self.issuers = {"rs": Issuing("rs", rs), "es": Issuing("es", es)}

    def rotate(self, name: str) -> str:
        entry = self.issuers[name]
        with self.lock:
            old = entry.issuer.default_kid
            kid = entry.issuer.rotate(entry.issuer.key().alg)
            entry.published[kid] = self.clock()
            if old in entry.cached:
                entry.retired.append((old, entry.cached[old]))
        return kid

    def remove(self, name: str, kid: str) -> None:
        entry = self.issuers[name]
        with self.lock:
            entry.removed[kid] = self.clock()
            entry.issuer.remove_key(kid)

    def signing(self, name: str) -> tuple[str, str]:
        """(kid, a cached token of it), minting the token once per kid."""
        entry = self.issuers[name]
        with self.lock:
            kid = entry.issuer.default_kid
            token = entry.cached.get(kid)
            if token is None:
                token = entry.issuer.mint({"sub": f"{name}-cached"}, kid=kid, ttl=7200)
                entry.cached[kid] = token
            return kid, token

    def retired(self) -> tuple[str, str, str] | None:
        """(provider, kid, token) of a former signing key, still published or lately removed."""
        now = self.clock()
        with self.lock:
            for entry in self.issuers.values():
                while (
                    entry.retired and now - entry.removed.get(entry.retired[0][0], now) > self.retired_grace
                ):
                    del entry.retired[0]
            found = [(entry.name, *entry.retired[0]) for entry in self.issuers.values() if entry.retired]
        return found[int(now) % len(found)] if found else None


@dataclass(frozen=True, slots=True)
class Planned:
    kind: str
    path: str
    token: str | None
    kid: str | None
    subject: str | None


def plan(kind: str, keys: KeyBook) -> Planned:
    """The request of `kind` and what the backend must see."""
    rs, es = keys.issuers["rs"].issuer, keys.issuers["es"].issuer
    if kind in ("rs_cached", "es_cached"):
        kid, token = keys.signing(kind[:2])
        return Planned(kind, "/api/orders", token, kid, f"{kind[:2]}-cached")
    if kind in ("rs_new", "es_new"):
        issuer = rs if kind == "rs_new" else es
        kid, _ = keys.signing(kind[:2])
        subject = f"{kind[:2]}-{uuid.uuid4().hex[:12]}"
        return Planned(kind, "/api/orders", issuer.mint({"sub": subject}, kid=kid), kid, subject)
    if kind == "expired":
        kid, _ = keys.signing("rs")
        return Planned(kind, "/api/orders", rs.mint(kid=kid, ttl=-600), kid, None)
    if kind == "forged":
        kid, _ = keys.signing("es")
        return Planned(kind, "/api/orders", es.mint(kid=kid, key=FORGER), kid, None)
    if kind == "wrong_aud":
        kid, _ = keys.signing("rs")
        return Planned(kind, "/api/orders", rs.mint({"aud": "someone-else"}, kid=kid), kid, None)
    if kind == "no_token":
        return Planned(kind, "/api/orders", None, None, None)
    if kind == "anonymous":
        return Planned(kind, "/public/page", None, None, None)
    if kind == "denied_rule":
        kid, token = keys.signing("es")
        return Planned(kind, "/admin/users", token, kid, None)
    if kind == "retired":
        old = keys.retired()
        if old is None:
            return plan("rs_cached", keys)
        name, kid, token = old
        return Planned(kind, "/api/orders", token, kid, f"{name}-cached")
    raise ValueError(kind)


def _forger() -> PrivateKey:
    return generate_key("ES256")


FORGER = _forger()  # an ES256 key no IdP publishes: signatures "by" a published kid that fail


def judge_response(response: HttpResponse, outcome: Outcome) -> None:
    """Fill what the answer shows: the identity the backend saw, or ext-authz's error."""
    outcome.retry_after = response.header_values("retry-after") != []
    body: object = None
    if response.header_values("content-type")[:1] == ["application/json"]:
        try:
            body = json.loads(response.body)
        except ValueError:
            body = None
    if response.status == 200 and isinstance(body, dict) and "headers" in body:
        values = body["headers"].get("x-user-id", [])
        outcome.seen = values[0] if values else ""
    elif isinstance(body, dict) and isinstance(body.get("error"), str):
        outcome.error = body["error"]
        outcome.authz_denial = response.header_values("cache-control") == ["no-store"]


class Load:
    """CONNECTIONS threads on keep-alive connections to Envoy, sharing one schedule."""

    def __init__(self, stack: Stack, keys: KeyBook, t0: float) -> None:
        self.stack = stack
        self.keys = keys
        self.t0 = t0
        self.outcomes: list[Outcome] = []
        self._kinds: Iterator[str] = itertools.cycle([k for k, n in MIX for _ in range(n)])
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._rate: float | None = None  # None: closed loop
        self._index = 0
        self._start = 0.0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _next(self) -> tuple[str, float]:
        with self._lock:
            kind = next(self._kinds)
            index, self._index = self._index, self._index + 1
        due = self._start if self._rate is None else self._start + index / self._rate
        return kind, due

    def _worker(self) -> None:
        host, port = "127.0.0.1", self.stack.envoy.port
        conn = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT)
        try:
            while not self._stop.is_set():
                kind, due = self._next()
                wait = due - self.now()
                if wait > 0 and self._stop.wait(wait):
                    break
                planned = plan(kind, self.keys)
                outcome, conn = self._send(conn, planned)
                self.outcomes.append(outcome)
        finally:
            conn.close()

    def _send(
        self, conn: http.client.HTTPConnection, planned: Planned
    ) -> tuple[Outcome, http.client.HTTPConnection]:
        headers = {"Authorization": f"Bearer {planned.token}"} if planned.token else {}
        sent = self.now()
        outcome = Outcome(planned.kind, sent, 0.0, 0, kid=planned.kid, subject=planned.subject)
        try:
            conn.request("GET", planned.path, headers=headers)
            raw = conn.getresponse()
            body = raw.read()
            response = HttpResponse(raw.status, tuple((k.lower(), v) for k, v in raw.getheaders()), body)
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            outcome.latency = self.now() - sent
            outcome.error = f"{type(exc).__name__}: {exc}"
            return outcome, http.client.HTTPConnection(
                "127.0.0.1", self.stack.envoy.port, timeout=REQUEST_TIMEOUT
            )
        outcome.latency = self.now() - sent
        outcome.status = response.status
        judge_response(response, outcome)
        return outcome, conn

    def start(self, rate: float | None) -> None:
        self._stop.clear()
        self._rate, self._index, self._start = rate, 0, self.now()
        self._threads = [
            threading.Thread(target=self._worker, name=f"soak-load-{i}") for i in range(CONNECTIONS)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT + 5)
        self._threads = []

    def probe(self, seconds: float) -> float:
        """The closed-loop maximum (answers per second) of this generator against the stack."""
        before = len(self.outcomes)
        started = self.now()
        self.start(None)
        time.sleep(seconds)
        self.stop()
        elapsed = self.now() - started
        done = len(self.outcomes) - before
        del self.outcomes[before:]  # the probe is not judged: it is not at the run's rate
        return done / elapsed


class Browsers:
    """Browser sessions through Envoy: sign in (the whole flow), then a navigation every
    `interval` seconds for `session_seconds` (the access token's short lifetime makes ext-authz
    refresh it on the way), then sign in anew."""

    def __init__(
        self,
        stack: Stack,
        echo: EchoBackend,
        clock: Callable[[], float],
        count: int,
        *,
        interval: float,
        session_seconds: float,
    ) -> None:
        self.stack, self.echo, self.clock = stack, echo, clock
        self.count, self.interval, self.session_seconds = count, interval, session_seconds
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._users = itertools.count(1)

    def _run(self) -> None:
        while not self._stop.is_set():
            subject = f"user-{next(self._users)}"
            browser = CookieBrowser(self.stack.envoy.base_url, self.echo)
            sent = self.clock()
            outcome = Outcome(SIGN_IN, sent, 0.0, 0, subject=subject)
            try:
                answer = browser.sign_in("/app/home", sub=subject, groups="staff")
                outcome.status = answer.response.status
                judge_response(answer.response, outcome)
            except (AssertionError, OSError, http.client.HTTPException) as exc:
                outcome.error = f"{type(exc).__name__}: {str(exc)[:300]}"
            outcome.latency = self.clock() - sent
            self.outcomes.append(outcome)
            if outcome.status != 200:
                self._stop.wait(self.interval)
                continue
            until = self.clock() + self.session_seconds
            while self.clock() < until and not self._stop.wait(self.interval):
                sent = self.clock()
                outcome = Outcome("session", sent, 0.0, 0, subject=subject)
                try:
                    response = browser.get("/app/home").response
                    outcome.status = response.status
                    outcome.refreshed = response.header_values("set-cookie") != []
                    judge_response(response, outcome)
                except (OSError, http.client.HTTPException) as exc:
                    outcome.error = f"{type(exc).__name__}: {exc}"
                outcome.latency = self.clock() - sent
                self.outcomes.append(outcome)

    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._run, name=f"soak-browser-{i}") for i in range(self.count)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT * 4)


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    pid: int
    role: str  # "supervisor" or "worker"
    rss_mib: float
    fds: int


class Sampler:
    """RSS and open FDs of the supervisor and every worker, once a second."""

    def __init__(self, stack: Stack, clock: Callable[[], float], period: float = 1.0) -> None:
        self.stack, self.clock, self.period = stack, clock, period
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler")

    def sample_once(self) -> None:
        supervisor = self.stack.supervisor_pid
        for pid, role in [(supervisor, "supervisor"), *((w, "worker") for w in self.stack.workers())]:
            try:
                fds = len(os.listdir(f"/proc/{pid}/fd"))
                self.samples.append(Sample(self.clock(), pid, role, rss_mib(pid), fds))
            except (OSError, RuntimeError):
                continue  # it died between the listing and the reading

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample_once()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
