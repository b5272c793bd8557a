"""`ext-authz status`: a running server's providers at a glance, from its admin listener's
`GET /debug/providers` (README: Operations). Exit status 0 when ready and no provider is stale,
1 otherwise, 2 when the admin listener cannot be asked."""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

DEFAULT_ADMIN = "127.0.0.1:9002"
TIMEOUT_SECONDS = 5.0


class StatusError(Exception):
    """The admin listener could not be asked (the message says why, for a person)."""


def fetch(admin: str, *, ca_file: str | None = None) -> Mapping[str, Any]:
    scheme = "https" if ca_file else "http"
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    url = f"{scheme}://{admin}/debug/providers"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS, context=context) as response:  # noqa: S310
            document = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise StatusError(f"{url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"cannot reach {url}: {reason}") from None
    except ValueError:
        raise StatusError(f"{url}: the answer is not JSON") from None
    if not isinstance(document, dict):
        raise StatusError(f"{url}: unexpected answer")
    return document


def healthy(document: Mapping[str, Any]) -> bool:
    """Ready, and no provider (of any worker) stale."""
    parts = document.get("workers", [document])
    return bool(document.get("ready")) and all(
        not p.get("stale") for part in parts for p in part.get("providers", [])
    )


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = abs(seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _row(provider: Mapping[str, Any], now: float) -> list[str]:
    keys = provider.get("keys") or []
    key_text = (
        ", ".join(f"{k.get('kid') or '(no kid)'} {'/'.join(k.get('algorithms', []))}" for k in keys) or "none"
    )
    last = provider.get("last_fetch") or {}
    last_at = last.get("at")
    last_text = f"{last.get('outcome')} {_ago(now - last_at)} ago" if last.get("outcome") and last_at else "-"
    next_at = provider.get("next_refresh_at")
    next_text = f"in {_ago(next_at - now)}" if next_at and provider.get("source") != "inline" else "-"
    suppressed = (provider.get("kid_refetches") or {}).get("suppressed", 0)
    return [
        str(provider.get("name")),
        "yes" if provider.get("ready") else "NO",
        "STALE" if provider.get("stale") else "no",
        str(provider.get("source")),
        key_text,
        _ago(provider.get("age_seconds")),
        last_text,
        next_text,
        str(suppressed),
    ]


_HEADER = ["PROVIDER", "READY", "STALE", "SOURCE", "KEYS", "AGE", "LAST FETCH", "NEXT REFRESH", "SUPPRESSED"]


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def render(admin: str, document: Mapping[str, Any], *, now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = []
    parts = document.get("workers")
    sections = parts if isinstance(parts, list) else [document]
    state = "ready" if document.get("ready") else "NOT READY"
    lines.append(f"ext-authz at {admin}: {state}" + (f" ({len(sections)} workers)" if parts else ""))
    for part in sections:
        if parts:
            lines.append(f"worker {part.get('worker')}: {'ready' if part.get('ready') else 'NOT READY'}")
        providers = part.get("providers") or []
        if providers:
            lines.append(_table([_HEADER, *(_row(p, now) for p in providers)]))
    return "\n".join(lines) + "\n"


def run(admin: str, *, as_json: bool, ca_file: str | None, out: TextIO, err: TextIO) -> int:
    try:
        document = fetch(admin, ca_file=ca_file)
    except StatusError as exc:
        print(f"ext-authz status: {exc}", file=err)
        return 2
    out.write(json.dumps(document, indent=2) + "\n" if as_json else render(admin, document))
    return 0 if healthy(document) else 1
