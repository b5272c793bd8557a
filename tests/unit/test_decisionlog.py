"""The decision log line and the metrics a decision produces."""

from __future__ import annotations

import io
import json

from ext_authz.config.model import LogSettings
from ext_authz.decisionlog import DecisionLog, hash_subject
from ext_authz.metrics import Metrics
from ext_authz.model import Allow, Deny, Request

REQUEST = Request(
    "GET", "/orders", query="token=secret", host="api.example.com", headers={"x-request-id": "r1"}
)
ALLOW = Allow(rule="rules[1]", provider="idp", subject="alice")
DENY = Deny(status=401, grpc_code=16, code="token_expired", headers=(), body="{}", rule="rules[1]")


def lines(settings: LogSettings, *decisions: Allow | Deny, sample: float = 0.0) -> list[dict[str, object]]:
    out = io.StringIO()
    log = DecisionLog(settings, stream=out, sample=lambda: sample)
    for decision in decisions:
        log.record(REQUEST, "r1", decision, 123)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_fields() -> None:
    (allow, deny) = lines(LogSettings(), ALLOW, DENY)
    assert set(allow) == {
        "ts", "request_id", "method", "host", "path", "decision", "status", "reason", "provider", "rule",
        "subject", "latency_us",
    }  # fmt: skip
    assert allow["path"] == "/orders"  # never the query string
    assert (allow["decision"], allow["status"], allow["reason"]) == ("allow", 200, "token")
    assert allow["subject"] == hash_subject("alice") != "alice"
    assert (deny["decision"], deny["status"], deny["reason"], deny["subject"]) == (
        "deny",
        401,
        "token_expired",
        None,
    )
    assert allow["request_id"] == "r1" and allow["latency_us"] == 123


def test_subject_modes_and_filters() -> None:
    assert lines(LogSettings(subject="plain"), ALLOW)[0]["subject"] == "alice"
    assert lines(LogSettings(subject="omit"), ALLOW)[0]["subject"] is None
    assert [e["decision"] for e in lines(LogSettings(decisions="deny"), ALLOW, DENY)] == ["deny"]
    assert lines(LogSettings(decisions="none"), ALLOW, DENY) == []
    assert len(lines(LogSettings(sample_rate=0.5), ALLOW, DENY, sample=0.4)) == 2
    assert lines(LogSettings(sample_rate=0.5), ALLOW, DENY, sample=0.6) == []


def test_metrics_after_known_decisions() -> None:
    metrics = Metrics(lambda: {})
    for decision in (ALLOW, ALLOW, DENY):
        metrics.record(decision, 0.0002)
    text = metrics.exposition().decode()
    allow = 'decision="allow",provider="idp",reason="token",rule="rules[1]",status="200"'
    deny = 'decision="deny",provider="",reason="token_expired",rule="rules[1]",status="401"'
    assert f"ext_authz_checks_total{{{allow}}} 2.0" in text
    assert f"ext_authz_checks_total{{{deny}}} 1.0" in text
    assert "ext_authz_check_duration_seconds_count 3.0" in text
    assert 'ext_authz_build_info{version="' in text
    assert "alice" not in text and "/orders" not in text


ODD = [
    "", 'quote" back\\slash', "ünïcødé ✓ 😀", "\x00\x01\x1f\x7f ctl",
    "\u2028\u2029 sep", "\ud800 lone", "</script>",
]  # fmt: skip


def test_line_is_exactly_what_json_dumps_gives() -> None:
    """The line is built by hand for speed; it must be the text json.dumps gives, byte for byte."""
    out = io.StringIO()
    log = DecisionLog(LogSettings(subject="plain"), stream=out)
    expected = []
    for i, text in enumerate(ODD):
        request = Request(text or "GET", "/p" + text, host=text, headers={})
        for decision in (
            Allow(rule=text, provider=text or None, subject=text or None),
            Deny(status=403, grpc_code=7, code="rule_denied", headers=(), body="", rule=text),
        ):
            log.record(request, text + str(i), decision, i)
            allowed = isinstance(decision, Allow)
            entry = {
                "request_id": text + str(i),
                "method": request.method,
                "host": request.host,
                "path": request.path,
                "decision": "allow" if allowed else "deny",
                "status": 200 if allowed else 403,
                "reason": "token" if allowed else "rule_denied",
                "provider": decision.provider,
                "rule": decision.rule,
                "subject": decision.subject,
                "latency_us": i,
            }
            expected.append(entry)
    got = out.getvalue().splitlines()
    assert len(got) == len(expected)
    for line, entry in zip(got, expected, strict=True):
        parsed = json.loads(line)
        ts = parsed.pop("ts")
        assert ts.endswith("Z")
        assert line == json.dumps({"ts": ts} | entry, separators=(",", ":"))
        assert parsed == entry
