"""One JSON line per Check on standard output: what was decided, for whom, and why.

Never a token, cookie or Authorization value: the line is built from the decision and a few
request attributes named here, nothing else. The subject is logged plainly, hashed (the default)
or not at all (``log.subject``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import sys
import time
from collections.abc import Callable
from typing import TextIO

from ext_authz.config.model import LogSettings
from ext_authz.model import Allow, Decision, Request, reason_of


@functools.lru_cache(maxsize=4096)
def hash_subject(subject: str) -> str:
    """A stable pseudonym: the same subject gives the same value across replicas and restarts."""
    return "sha256:" + hashlib.sha256(subject.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class DecisionLog:
    def __init__(
        self,
        settings: LogSettings,
        *,
        stream: TextIO | None = None,
        sample: Callable[[], float] = random.random,
    ) -> None:
        self._settings = settings
        self._stream = stream
        self._sample = sample

    def wants(self, decision: Decision) -> bool:
        mode = self._settings.decisions
        if mode == "none" or (mode == "deny" and isinstance(decision, Allow)):
            return False
        rate = self._settings.sample_rate
        return rate >= 1.0 or self._sample() < rate

    def record(self, request: Request, request_id: str, decision: Decision, latency_us: int) -> None:
        if not self.wants(decision):
            return
        allowed = isinstance(decision, Allow)
        subject = decision.subject
        if subject is not None and self._settings.subject != "plain":
            subject = hash_subject(subject) if self._settings.subject == "hash" else None
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() % 1 * 1000):03d}Z",
            "request_id": request_id,
            "method": request.method,
            "host": request.host,
            "path": request.path,
            "decision": "allow" if allowed else "deny",
            "status": 200 if isinstance(decision, Allow) else decision.status,
            "reason": reason_of(decision),
            "provider": decision.provider,
            "rule": decision.rule,
            "subject": subject,
            "latency_us": latency_us,
        }
        stream = self._stream or sys.stdout
        stream.write(json.dumps(entry, separators=(",", ":")) + "\n")
        stream.flush()
