"""The I/O-free pieces of starting a sign-in (ext_authz/sessions/signin.py)."""

from __future__ import annotations

import base64
import hashlib
from urllib.parse import parse_qs, urlsplit

import pytest

from ext_authz.sessions.signin import authorization_url, is_navigation, new_transaction, return_path


@pytest.mark.parametrize(
    ("method", "headers", "navigation"),
    [
        ("GET", {"accept": "text/html,application/xhtml+xml"}, True),
        ("HEAD", {"accept": "TEXT/HTML"}, True),
        ("GET", {"sec-fetch-mode": "navigate"}, True),
        ("GET", {"sec-fetch-mode": "navigate", "accept": "*/*"}, True),
        ("GET", {"sec-fetch-mode": "cors", "accept": "text/html"}, False),  # a fetch() asking for HTML
        ("GET", {"accept": "application/json"}, False),
        ("GET", {}, False),
        ("POST", {"accept": "text/html", "sec-fetch-mode": "navigate"}, False),
        ("get", {"accept": "text/html"}, True),
    ],
)
def test_only_a_browser_navigation_is_sent_to_sign_in(
    method: str, headers: dict[str, str], navigation: bool
) -> None:
    assert is_navigation(method, headers) is navigation


@pytest.mark.parametrize(
    ("path", "query", "expected"),
    [
        ("/app/orders", "page=2", "/app/orders?page=2"),
        ("/", "", "/"),
        ("/app/", "", "/app/"),
        ("//evil.example/x", "", "/"),
        ("/\\evil.example", "", "/"),
        ("/\t/evil.example", "", "/"),
        ("/\n/evil.example", "", "/"),
        ("/ /evil.example", "", "/"),
        ("https://evil.example/", "", "/"),
        ("evil.example", "", "/"),
        ("", "", "/"),
        ("/app\\..\\x", "", "/"),
        ("/caf\u00e9", "", "/"),
        ("/app", "next=//evil.example", "/app?next=//evil.example"),  # a query is the app's own business
        ("/a" * 2000, "", "/"),
    ],
)
def test_the_return_path_is_only_ever_a_path_on_this_host(path: str, query: str, expected: str) -> None:
    assert return_path(path, query) == expected


def test_transactions_are_fresh_and_pkce_is_s256() -> None:
    a, b = new_transaction("/app"), new_transaction("/app")
    assert len({a.state, b.state, a.nonce, b.nonce, a.verifier, b.verifier}) == 6
    assert 43 <= len(a.verifier) <= 128 and a.return_to == "/app"
    digest = base64.urlsafe_b64encode(hashlib.sha256(a.verifier.encode()).digest()).rstrip(b"=").decode()
    assert a.challenge == digest
    assert new_transaction("//evil.example").return_to == "/"


def test_the_authorization_url_keeps_the_endpoints_own_parameters() -> None:
    t = new_transaction("/app")
    url = authorization_url(
        "https://login.example.com/tenant/oauth2/v2.0/authorize?p=b2c_signin&state=stale",
        client_id="orders-web",
        redirect_uri="https://app.example.com/oauth2/callback",
        scopes=["openid", "profile", "email"],
        transaction=t,
    )
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == (
        "https",
        "login.example.com",
        "/tenant/oauth2/v2.0/authorize",
    )
    q = parse_qs(parts.query)
    assert q["p"] == ["b2c_signin"] and q["state"] == [t.state]  # ours replaces theirs
    assert q["response_type"] == ["code"] and q["code_challenge_method"] == ["S256"]
    assert q["scope"] == ["openid profile email"] and q["nonce"] == [t.nonce]
    assert q["code_challenge"] == [t.challenge] and "code_verifier" not in q
    assert q["redirect_uri"] == ["https://app.example.com/oauth2/callback"]
