"""One JSON line per Check on standard output: what was decided, for whom, and why.

Never a token, cookie or Authorization value: the line is built from the decision and a few
request attributes named here, nothing else. The subject is logged plainly, hashed (the default)
or not at all (``log.subject``). Lines go to the process's line writer (ext_authz.linewriter):
the Check only queues its line; a thread writes them in batches.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import time
from collections.abc import Callable
from typing import TextIO

from ext_authz.config.model import LogSettings
from ext_authz.linewriter import LineWriter, stdout_writer
from ext_authz.model import Allow, Decision, Request, reason_of


@functools.lru_cache(maxsize=4096)
def hash_subject(subject: str) -> str:
    """A stable pseudonym: the same subject gives the same value across replicas and restarts."""
    return "sha256:" + hashlib.sha256(subject.encode("utf-8", "surrogatepass")).hexdigest()[:16]


# json's own string escaping (C): the line is the same text json.dumps(entry, separators=(",", ":"))
# gives, without building a dict and walking it for every Check.
_quote: Callable[[str], str] = json.encoder.encode_basestring_ascii


def _optional(value: str | None) -> str:
    return "null" if value is None else _quote(value)


class _Clock:
    """``ts`` values (UTC, milliseconds); the part up to the second is formatted once a second."""

    def __init__(self) -> None:
        self._cached = (-1, "")  # (second, its text): one object, so threads never see half of it

    def timestamp(self) -> str:
        now = time.time()
        second, prefix = self._cached
        if int(now) != second:
            second = int(now)
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._cached = (second, prefix)
        return f"{prefix}.{int(now % 1 * 1000):03d}Z"


class DecisionLog:
    def __init__(
        self,
        settings: LogSettings,
        *,
        stream: TextIO | None = None,
        writer: LineWriter | None = None,
        sample: Callable[[], float] = random.random,
    ) -> None:
        """``stream``: write each line there at once (tests); else queue it on ``writer``
        (default: the process's standard-output writer)."""
        self._settings = settings
        self._stream = stream
        self._writer = writer if writer is not None or stream is not None else stdout_writer()
        self._sample = sample
        self._clock = _Clock()

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
        status = 200 if isinstance(decision, Allow) else decision.status
        line = (
            f'{{"ts":"{self._clock.timestamp()}","request_id":{_quote(request_id)}'
            f',"method":{_quote(request.method)},"host":{_quote(request.host)}'
            f',"path":{_quote(request.path)},"decision":"{"allow" if allowed else "deny"}"'
            f',"status":{int(status)},"reason":{_quote(reason_of(decision))}'
            f',"provider":{_optional(decision.provider)},"rule":{_optional(decision.rule)}'
            f',"subject":{_optional(subject)},"latency_us":{int(latency_us)}}}\n'
        )
        if self._writer is not None:
            self._writer.write(line)
        elif self._stream is not None:
            self._stream.write(line)
            self._stream.flush()
