"""What each request must get, and the windows in which a valid credential may be refused.

The rules (README "Keys", issue 18):
- a request that must be denied is never allowed (any 2xx is a wrong decision);
- an allowed request reaches the backend with the expected identity (x-user-id);
- a valid token is allowed, except: a token whose key the IdP no longer publishes may get 401
  once that removal happened (the next refresh drops it); while an IdP is down or slow (and one
  refetch interval plus a fetch timeout after), its tokens may get ext-authz's own 503
  (`temporarily_unavailable`, with Retry-After: key pending or keys unavailable);
- no other 5xx; no Envoy `status_on_error` answer (STATUS_ON_ERROR, a failed Check), counted
  apart when inside a worker's SIGKILL window.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from tests.soak.faults import Window
from tests.soak.load import MUST_DENY, SIGN_IN, Outcome
from tests.soak.stack import STATUS_ON_ERROR

KILL_WINDOW = 3.0  # after a SIGKILL, Checks on the dead worker's streams fail until Envoy reconnects
EXAMPLES = 8


@dataclass
class Verdict:
    total: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    by_status: Counter[int] = field(default_factory=Counter)
    wrong_allow: list[str] = field(default_factory=list)  # must be denied, was allowed
    wrong_identity: list[str] = field(default_factory=list)  # allowed with the wrong identity
    valid_refused: list[str] = field(default_factory=list)  # valid, refused outside any window
    wrong_denial: list[str] = field(default_factory=list)  # must be denied, with the wrong status
    unexpected_5xx: list[str] = field(default_factory=list)
    status_on_error: list[str] = field(default_factory=list)
    status_on_error_kill: list[str] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)
    in_window: Counter[str] = field(default_factory=Counter)  # refusals the windows allow, by reason
    refreshes: int = 0

    def wrong_decisions(self) -> int:
        return len(self.wrong_allow) + len(self.wrong_identity) + len(self.valid_refused)


def _describe(outcome: Outcome) -> str:
    return (
        f"t={outcome.sent:.2f}s {outcome.kind} kid={outcome.kid} -> {outcome.status}"
        f" error={outcome.error} seen={outcome.seen!r} want={outcome.subject!r}"
        f" ({outcome.latency * 1000:.0f} ms)"
    )


class Checker:
    def __init__(self, windows: Sequence[Window], *, idp_margin: float) -> None:
        self.outages = [(w.start, w.end + idp_margin) for w in windows if w.kind in ("idp down", "idp slow")]
        self.kills = [
            (w.start, w.start + KILL_WINDOW + (w.end - w.start))
            for w in windows
            if w.kind == "worker SIGKILL"
        ]
        self.removed: dict[str, float] = {
            w.detail.split(": ", 1)[1]: w.start for w in windows if w.kind == "key removed"
        }

    @staticmethod
    def _inside(spans: Sequence[tuple[float, float]], start: float, end: float) -> bool:
        return any(a <= end and start <= b for a, b in spans)

    def judge(self, outcomes: Sequence[Outcome]) -> Verdict:
        verdict = Verdict()
        for outcome in outcomes:
            self._one(outcome, verdict)
        return verdict

    def _one(self, o: Outcome, v: Verdict) -> None:
        v.total += 1
        v.by_kind[o.kind] += 1
        v.by_status[o.status] += 1
        v.refreshes += o.refreshed
        end = o.sent + o.latency
        text = _describe(o)
        ok_2xx = 200 <= o.status < 300
        if o.status == 0:
            v.transport_errors.append(text)
            return
        if o.status == STATUS_ON_ERROR:
            (v.status_on_error_kill if self._inside(self.kills, o.sent, end) else v.status_on_error).append(
                text
            )
            return
        documented_503 = o.status == 503 and o.authz_denial and o.error == "temporarily_unavailable"
        in_outage = self._inside(self.outages, o.sent, end)
        if o.kind in MUST_DENY:
            if ok_2xx:
                v.wrong_allow.append(text)
            elif o.status != MUST_DENY[o.kind] or not o.authz_denial:
                if documented_503 and in_outage:
                    v.in_window["deny: 503 while an IdP was down or slow"] += 1
                elif o.status >= 500:
                    v.unexpected_5xx.append(text)
                else:
                    v.wrong_denial.append(text)
            return
        # Must be allowed: a valid token, an anonymous route, a session navigation or a sign-in.
        if ok_2xx:
            want = "" if o.kind == "anonymous" else o.subject
            if o.seen != want:
                v.wrong_identity.append(text)
            return
        removed_at = self.removed.get(o.kid or "")
        if o.kind == "retired" and removed_at is not None and removed_at <= end and o.status == 401:
            v.in_window["retired key: 401 after its removal"] += 1
        elif documented_503 and in_outage and o.kind not in (SIGN_IN, "session", "anonymous"):
            v.in_window["valid: 503 while an IdP was down or slow"] += 1
        elif o.status >= 500 and not documented_503:
            v.unexpected_5xx.append(text)
        else:
            v.valid_refused.append(text)
