"""A headless Chromium for tests, driven over W3C WebDriver by Debian's chromedriver.

``headless_chromium()`` starts /usr/bin/chromedriver on an ephemeral loopback port, opens one
session on /usr/bin/chromium (a fresh profile in a temporary directory) and yields a ``Browser``
with the few operations the sign-in tests need. Leaving the block always ends the session, stops
chromedriver and kills every process still running on that profile, then removes the profile, even
when the test failed. Every call has a deadline.

The client is a few HTTP calls with urllib rather than Selenium: nothing to download at install or
at run time (no Selenium Manager), and the processes it starts are its own to stop. Both programs
come from Debian's chromium and chromium-driver packages (`make tools`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tests.support.processes import ManagedProcess

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PAGE_LOAD_TIMEOUT = 15.0
DEFAULT_WAIT = 10.0
STARTUP_TIMEOUT = 15.0
# One WebDriver command: a page load waits up to PAGE_LOAD_TIMEOUT inside chromedriver.
COMMAND_TIMEOUT = PAGE_LOAD_TIMEOUT + 10.0
STOP_TIMEOUT = 5.0

# The flags every test browser runs with: headless, no sandbox (tests run as root), and nothing
# that reaches out by itself (no component updates, sync, QUIC, first-run or background fetches).
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    # A developer's http_proxy would otherwise carry names like app.test to the proxy.
    "--no-proxy-server",
)
# Even with the flags above Chromium looks up Google's hosts (accounts, clients2, update and
# autofill services) at start. It resolves only loopback names and the test's own mapped ones:
# every other name fails inside Chromium, before any DNS query leaves the machine.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")

_ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"  # the W3C web element identifier
_STARTED = re.compile(r"ChromeDriver was started successfully on port (\d+)")

T = TypeVar("T")


class BrowserError(RuntimeError):
    """chromedriver answered with an error, or did not answer in time."""


class BrowserTimeout(BrowserError):
    """A ``wait_until`` condition did not hold before its deadline."""


@dataclass(frozen=True)
class Cookie:
    """One cookie as the browser keeps it for the current page (HttpOnly ones included)."""

    name: str
    value: str
    domain: str
    path: str
    secure: bool
    http_only: bool
    same_site: str | None

    @classmethod
    def from_webdriver(cls, raw: dict[str, Any]) -> Cookie:
        same_site = raw.get("sameSite")
        return cls(
            name=str(raw["name"]),
            value=str(raw["value"]),
            domain=str(raw.get("domain", "")),
            path=str(raw.get("path", "")),
            secure=bool(raw.get("secure", False)),
            http_only=bool(raw.get("httpOnly", False)),
            same_site=None if same_site is None else str(same_site),
        )


class Browser:
    """One WebDriver session; made by ``headless_chromium()``, not directly."""

    def __init__(self, endpoint: str, session_id: str) -> None:
        self._session = f"{endpoint}/session/{session_id}"

    def open(self, url: str) -> None:
        """Navigate and wait for the load (redirects followed), at most PAGE_LOAD_TIMEOUT."""
        self._command("POST", "/url", {"url": url})

    @property
    def current_url(self) -> str:
        return str(self._command("GET", "/url"))

    def page_text(self) -> str:
        """The rendered text of the page body (``innerText``)."""
        return str(self.execute("return document.body ? document.body.innerText : '';"))

    def execute(self, script: str, *args: Any) -> Any:
        """Run a synchronous script in the page; its ``return`` value, JSON-decoded."""
        return self._command("POST", "/execute/sync", {"script": script, "args": list(args)})

    def fill(self, element_id: str, text: str) -> None:
        """Clear the input with this id and type `text` into it."""
        element = self._element(element_id)
        self._command("POST", f"/element/{element}/clear", {})
        self._command("POST", f"/element/{element}/value", {"text": text})

    def click(self, element_id: str) -> None:
        """Click the element with this id; a navigation it starts is waited for like ``open``."""
        self._command("POST", f"/element/{self._element(element_id)}/click", {})

    def cookies(self) -> list[Cookie]:
        """The cookies the browser would send to the current page's URL."""
        raw = self._command("GET", "/cookie")
        return [Cookie.from_webdriver(item) for item in raw]

    def cookie(self, name: str) -> Cookie | None:
        return next((c for c in self.cookies() if c.name == name), None)

    def wait_until(
        self,
        condition: Callable[[Browser], T | None],
        *,
        timeout: float = DEFAULT_WAIT,
        what: str = "the condition held",
        interval: float = 0.1,
    ) -> T:
        """Poll `condition(browser)` until it returns something truthy, and return that.

        Raises BrowserTimeout (with the current URL and text) once `timeout` seconds have passed.
        """
        deadline = time.monotonic() + timeout
        while True:
            value = condition(self)
            if value:
                return value
            if time.monotonic() >= deadline:
                raise BrowserTimeout(f"not {what} within {timeout:g}s; {self._describe()}")
            time.sleep(interval)

    def _describe(self) -> str:
        try:
            return f"at {self.current_url!r}, page text {self.page_text()[:500]!r}"
        except BrowserError as exc:
            return f"(page unreadable: {exc})"

    def _element(self, element_id: str) -> str:
        found = self._command("POST", "/element", {"using": "css selector", "value": f"[id={element_id!r}]"})
        return str(found[_ELEMENT_KEY])

    def _command(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return _call(method, self._session + path, body)


def _call(method: str, url: str, body: dict[str, Any] | None, *, timeout: float = COMMAND_TIMEOUT) -> Any:
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json; charset=utf-8")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            text = exc.read().decode("utf-8", "replace")
        try:
            error = json.loads(text)["value"]
            message = str(error.get("message", "")).splitlines()
            detail = f"{error.get('error')}: {message[0] if message else ''}"
        except (ValueError, KeyError, TypeError, AttributeError):
            detail = text[:500]
        raise BrowserError(f"{method} {url}: HTTP {exc.code} {detail}") from None
    except (OSError, ValueError) as exc:  # URLError, timeouts, a reset, a body that is not JSON
        raise BrowserError(f"{method} {url}: {exc}") from exc
    return payload.get("value") if isinstance(payload, dict) else payload


@contextlib.contextmanager
def headless_chromium(
    *,
    host_map: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    page_load_timeout: float = PAGE_LOAD_TIMEOUT,
) -> Iterator[Browser]:
    """A fresh headless Chromium for one ``with`` block; everything it started ends with the block.

    `host_map` names hosts Chromium resolves to the given address, e.g. ``{"app.test": "127.0.0.1"}``
    (no DNS, no hosts file); every other name but the loopback ones fails to resolve. `extra_args`
    are further Chromium flags (not ``--host-resolver-rules``: that is built from `host_map`).
    """
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not os.access(binary, os.X_OK):
            raise BrowserError(f"{binary} is missing: `make tools` installs Debian's chromium packages")
    profile = Path(tempfile.mkdtemp(prefix="ext-authz-chromium-"))
    driver: ManagedProcess | None = None
    endpoint = ""
    session_id: str | None = None
    try:
        driver = ManagedProcess(
            "chromedriver",
            [CHROMEDRIVER, "--port=0"],
            # Chromium's own writes (crash reports, caches) stay under the throwaway profile.
            env={"HOME": str(profile), "XDG_CONFIG_HOME": str(profile), "XDG_CACHE_HOME": str(profile)},
        )
        line = driver.wait_for_line(
            lambda text: _STARTED.search(text) is not None, timeout=STARTUP_TIMEOUT, what="listening"
        )
        match = _STARTED.search(line)
        assert match is not None
        endpoint = f"http://127.0.0.1:{match.group(1)}"
        args = [*CHROMIUM_FLAGS, _resolver_rules(host_map or {}), f"--user-data-dir={profile}", *extra_args]
        capabilities = {
            "browserName": "chrome",
            "pageLoadStrategy": "normal",
            "timeouts": {"pageLoad": int(page_load_timeout * 1000), "script": 5000, "implicit": 0},
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }
        created = _call(
            "POST",
            f"{endpoint}/session",
            {"capabilities": {"alwaysMatch": capabilities}},
            timeout=STARTUP_TIMEOUT + 5.0,
        )
        session_id = str(created["sessionId"])
        yield Browser(endpoint, session_id)
    finally:
        if session_id is not None:
            with contextlib.suppress(BrowserError):
                _call("DELETE", f"{endpoint}/session/{session_id}", None, timeout=STOP_TIMEOUT)
        if driver is not None:
            driver.stop(grace=STOP_TIMEOUT)
            # chromedriver leads its own process group; Chromium and its helpers were forked into it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(driver.pid, signal.SIGKILL)
        try:
            _kill_profile_processes(profile)
        finally:
            shutil.rmtree(profile, ignore_errors=True)


def _resolver_rules(host_map: Mapping[str, str]) -> str:
    rules = [f"MAP {host} {address}" for host, address in host_map.items()]
    rules += [f"EXCLUDE {name}" for name in LOOPBACK_NAMES]
    rules.append("MAP * ~NOTFOUND")
    return "--host-resolver-rules=" + ", ".join(rules)


def _profile_processes(profile: Path) -> list[int]:
    """Live (not zombie) processes whose command line names the profile directory."""
    marker = str(profile).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker not in (entry / "cmdline").read_bytes():
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found


def _kill_profile_processes(profile: Path) -> None:
    """SIGKILL whatever still runs on this profile (e.g. a helper that left the process group)."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while pids := _profile_processes(profile):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() >= deadline:
            raise BrowserError(f"Chromium processes {pids} outlived their profile {profile}")
        time.sleep(0.05)
