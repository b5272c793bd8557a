"""The development issuer's HTML: the login page, the signed-out page and the error page.

Everything reflected from a request is HTML-escaped (quotes included, as some of it lands in
attribute values). The element ids are stable: browser tests fill `sub` and `groups` and click
`sign-in`.
"""

from __future__ import annotations

from html import escape

from ext_authz.dev.login import AuthorizeRequest

_STYLE = (
    "body{font-family:sans-serif;max-width:32em;margin:2em auto}label{display:block;margin:.5em 0}"
    ".warn{background:#fee;border:1px solid #c00;padding:.5em}.error{color:#c00}"
)
_WARNING = '<p class="warn">ext-authz dev-issuer: <strong>DEVELOPMENT ONLY</strong>, no passwords.</p>'


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>{_WARNING}<h1>{escape(title)}</h1>{body}</body></html>\n"
    )


def login_page(pending_id: str, request: AuthorizeRequest, error: str | None = None) -> str:
    scopes = "".join(
        f'<label><input type="checkbox" id="scope-{escape(s)}" name="scope" value="{escape(s)}" checked> '
        f"{escape(s)}</label>"
        for s in request.scopes
    )
    message = f'<p class="error" id="error">{escape(error)}</p>' if error else ""
    body = (
        f'<p>Client <code id="client-id">{escape(request.client_id)}</code> asks you to sign in; it '
        f'will get the answer at <code id="redirect-uri">{escape(request.redirect_uri)}</code>.</p>'
        f"{message}"
        # A relative action: the page is at {issuer}/authorize, also behind a proxy's path prefix.
        '<form method="post" action="authorize" id="login">'
        f'<input type="hidden" id="pending" name="pending" value="{escape(pending_id)}">'
        '<label>Subject (sub) <input type="text" id="sub" name="sub" value="alice"></label>'
        '<label>Groups (comma-separated) <input type="text" id="groups" name="groups" value="staff">'
        "</label>"
        '<label>Email (empty: SUB@example.com) <input type="text" id="email" name="email" value="">'
        "</label>"
        f'<fieldset id="scopes"><legend>Scopes</legend>{scopes}</fieldset>'
        '<button type="submit" id="sign-in" name="action" value="sign-in">Sign in</button> '
        '<button type="submit" id="deny" name="action" value="deny">Deny</button>'
        "</form>"
    )
    return _page("Sign in", body)


def error_page(message: str) -> str:
    return _page("Sign-in request refused", f'<p class="error" id="error">{escape(message)}</p>')


def signed_out_page() -> str:
    return _page("Signed out", '<p id="signed-out">You are signed out of the development issuer.</p>')
