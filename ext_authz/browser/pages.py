"""The answers of the sign-in flow that are not a rule's: redirects and small HTML pages.

Every page is ``no-store`` with a CSP that allows nothing but its own inline style, and escapes
what it shows (nothing it shows comes from the request). A redirect's Location is built by the
flow: a same-host path, the provider's endpoints, or the configured post-logout URL.
"""

from __future__ import annotations

import html
from dataclasses import replace

from ext_authz import errors
from ext_authz.model import Deny, Request

RETRY_AFTER_SECONDS = 5


def busy() -> errors.LoginUnavailable:
    """What a request thread answers when too many wait for the loop already (handoff.on_loop)."""
    return errors.LoginUnavailable(retry_after_seconds=RETRY_AFTER_SECONDS)


def same_origin(request: Request, *, post: bool) -> bool:
    """CSRF defence for logout: a POST's ``Origin`` is this origin (or, without one, the browser
    says same-origin); a GET only when the browser says it is same-origin or typed by the user."""
    site = request.headers.get("sec-fetch-site", "").strip().lower()
    origin = request.headers.get("origin")
    if post:
        if origin is not None:
            return origin.strip().lower() == f"{request.scheme.lower()}://{request.host.lower()}"
        return site == "same-origin"
    return site in ("same-origin", "none") and origin in (None, f"{request.scheme}://{request.host}")


_NO_STORE = ("cache-control", "no-store")
_PAGE_CSP = ("content-security-policy", "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'")


def redirect(location: str, set_cookies: list[str] | tuple[str, ...], code: str, rule: str) -> Deny:
    headers: list[tuple[str, str]] = [
        ("location", location),
        _NO_STORE,
        *(("set-cookie", c) for c in set_cookies),
    ]
    return Deny(302, errors.GRPC_UNAUTHENTICATED, code, tuple(headers), "", rule=rule)


def page(
    status: int, code: str, title: str, message: str, *, set_cookies: tuple[str, ...] | list[str] = ()
) -> Deny:
    body = (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title></head>"
        f"<body><h1>{html.escape(title)}</h1><p>{html.escape(message)}</p></body></html>\n"
    )
    headers: list[tuple[str, str]] = [
        ("content-type", "text/html; charset=utf-8"),
        _NO_STORE,
        _PAGE_CSP,
        *(("set-cookie", c) for c in set_cookies),
    ]
    grpc = errors.GRPC_UNAVAILABLE if status >= 500 else errors.GRPC_PERMISSION_DENIED
    return Deny(status, grpc, code, tuple(headers), body)


def unavailable(set_cookies: tuple[str, ...]) -> Deny:
    answer = page(
        503,
        errors.LoginUnavailable.code,
        "Sign-in unavailable",
        "The identity provider cannot be reached right now: try again in a moment.",
        set_cookies=set_cookies,
    )
    return replace(answer, headers=(*answer.headers, ("retry-after", str(RETRY_AFTER_SECONDS))))


def logout_form(logout_path: str) -> Deny:
    """A cross-site or unlabelled logout GET: a page whose button logs out (a same-origin POST)."""
    action = html.escape(logout_path, quote=True)
    body = (
        "<!doctype html><html><head><meta charset=utf-8><title>Log out</title></head><body>"
        f'<form method="post" action="{action}"><button id="logout" type="submit">Log out</button></form>'
        "</body></html>\n"
    )
    headers = (("content-type", "text/html; charset=utf-8"), _NO_STORE, _PAGE_CSP)
    return Deny(403, errors.GRPC_PERMISSION_DENIED, "logout_confirm", headers, body)
