"""`ext-authz status`'s table and exit rule, from admin answers (no server)."""

from __future__ import annotations

from typing import Any

from ext_authz.status import healthy, render

NOW = 1_800_000_000.0


def provider(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "corp",
        "ready": True,
        "stale": False,
        "source": "discovery",
        "keys": [{"kid": "k1", "algorithms": ["RS256"]}, {"kid": None, "algorithms": ["ES256"]}],
        "age_seconds": 250.0,
        "next_refresh_at": NOW + 350,
        "last_fetch": {"outcome": "ok", "at": NOW - 250},
        "kid_refetches": {"suppressed": 3},
    }
    return {**base, **over}


def test_a_table_a_person_reads_at_a_glance() -> None:
    text = render("127.0.0.1:9002", {"ready": True, "providers": [provider()]}, now=NOW)
    header, row = text.splitlines()[1:3]
    assert header.split()[:3] == ["PROVIDER", "READY", "STALE"]
    assert "k1 RS256, (no kid) ES256" in row and "ok 4m ago" in row and "in 6m" in row and row.endswith("3")
    assert text.startswith("ext-authz at 127.0.0.1:9002: ready\n")


def test_stale_or_not_ready_is_unhealthy_and_said_loudly() -> None:
    stale = {"ready": False, "providers": [provider(ready=False, stale=True, keys=[])]}
    text = render("a:1", stale, now=NOW)
    assert "NOT READY" in text and "STALE" in text and " none " in text
    assert not healthy(stale)
    assert not healthy({"ready": True, "providers": [provider(stale=True)]})
    assert healthy({"ready": True, "providers": [provider(), provider(name="inline", source="inline")]})


def test_a_fleet_has_a_section_per_worker() -> None:
    fleet = {
        "ready": False,
        "workers": [{"worker": 0, "ready": True, "providers": [provider()]}, {"worker": 1, "ready": False}],
    }
    text = render("a:1", fleet, now=NOW)
    assert "(2 workers)" in text and "worker 0: ready" in text and "worker 1: NOT READY" in text
    assert not healthy(fleet)
