"""``ext-authz explain``: why one request is allowed or denied, step by step.

The final answer is ``Pipeline.decide()``'s own decision, adapted for display, so explain can
never disagree with the server. The steps beside it are what ``decide()`` recorded in its trace
(``trace.py``) as it ran: which rule, and why each earlier one did not match; the token verdict;
each requirement, nested for any_of / all_of / not, or why none was judged. Rendering is
``explainrender.py``.

Keys come from a JWKS file (offline: ``StaticKeys``, the same keys for every provider) or are
fetched like the server fetches them (``fetched_keys``: the real KeyStore, HttpFetcher and an
in-memory SharedKeyCache, waiting once for the first fetch).

The token is never printed: only where it was found, its verdict and its verified claims. Of the
request, header and query parameter names are shown, never their values.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

from ext_authz.compiled import compile
from ext_authz.config.model import (
    AllOf,
    AnyOf,
    JwksCacheSettings,
    Not,
    ProviderSettings,
    Requirement,
    Settings,
)
from ext_authz.config.values import HEADER_NAME
from ext_authz.explainrender import Explanation as Explanation
from ext_authz.explainrender import RequirementStep as RequirementStep
from ext_authz.explainrender import TokenVerdict
from ext_authz.explainrender import render_json as render_json
from ext_authz.explainrender import render_text as render_text
from ext_authz.identity import KeyResolver
from ext_authz.introspection import HttpIntrospector
from ext_authz.keys.cache import SharedKeyCache
from ext_authz.keys.fetch import HttpFetcher
from ext_authz.keys.jwks import JWKSError, parse_jwks
from ext_authz.keys.static import StaticKeys
from ext_authz.keys.store import KeyStore
from ext_authz.model import Decision, Request
from ext_authz.pipeline import Pipeline, issuing_provider
from ext_authz.requirements import Truth
from ext_authz.sources import DPOP_AUTHORIZATION, HeaderToken, TokenSource, provider_sources
from ext_authz.trace import TokenSeen, Trace

# Extra time, beyond the providers' own fetch timeouts, to let a failed first fetch report back.
FIRST_FETCH_MARGIN_SECONDS = 0.5


class UsageError(Exception):
    """A bad command-line value (the CLI exits 2 with this message)."""


# ---- the request ----


def parse_header(text: str) -> tuple[str, str]:
    """``'name: value'`` → (lower-case name, value)."""
    name, sep, value = text.partition(":")
    name = name.strip().lower()
    if not sep or not HEADER_NAME.match(name):
        raise UsageError(f"--header {text!r}: write 'name: value' with a valid header name")
    return name, value.strip()


def parse_context(text: str) -> tuple[str, str]:
    """``'key=value'`` → (key, value), as Envoy's context_extensions carry them."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--context {text!r}: write key=value")
    return key.strip(), value


def build_request(
    method: str,
    path: str,
    *,
    host: str = "",
    headers: Sequence[tuple[str, str]] = (),
    context: Mapping[str, str] | None = None,
    scheme: str = "",
    peer_certificate: str = "",
) -> Request:
    """A Request as the transport adapter would build it: the query split off, repeated headers
    joined with "," (Envoy's encoding), the peer certificate URL-encoded PEM (Envoy's form)."""
    path, _, query = path.partition("?")
    joined: dict[str, str] = {}
    for name, value in headers:
        joined[name] = f"{joined[name]},{value}" if name in joined else value
    return Request(
        method.upper(),
        path,
        query,
        host,
        joined,
        dict(context or {}),
        scheme=scheme,
        peer_certificate=peer_certificate,
    )


def read_peer_certificate(file: str) -> str:
    """A PEM certificate file as Envoy sends the peer certificate (URL-encoded PEM)."""
    try:
        text = Path(file).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--peer-certificate: cannot read {file}: {exc}") from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise UsageError(f"--peer-certificate: {file} holds no PEM certificate")
    return quote(text, safe="")


def dpop_location() -> TokenSource:
    """Where a token pasted as ``DPoP <token>`` goes (``Authorization: DPoP``)."""
    return HeaderToken(*DPOP_AUTHORIZATION)


def token_location(provider: ProviderSettings) -> TokenSource:
    """The first place ``provider`` reads tokens from: its first header, else cookie, else parameter."""
    return provider_sources(provider)[0]


def with_token(request: Request, location: TokenSource, token: str) -> Request:
    """``request`` carrying ``token`` at ``location`` (added to what is there, as a client would)."""
    return location.carry(request, token)


def provider_for_token(settings: Settings, token: str) -> ProviderSettings:
    """Where to put a given token: with the provider its ``iss`` names, else the first."""
    return issuing_provider(settings, token) or settings.providers[0]


# ---- keys ----


def load_jwks_file(file: str) -> StaticKeys:
    try:
        document = json.loads(Path(file).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"--jwks {file}: cannot read the file: {exc.strerror or exc}") from None
    except ValueError:
        raise UsageError(f"--jwks {file}: not JSON") from None
    try:
        keys = parse_jwks(document, source=file)
    except JWKSError as exc:
        raise UsageError(f"--jwks {file}: {exc}") from None
    if not keys.keys:
        raise UsageError(f"--jwks {file}: contains no usable signature key")
    return StaticKeys(keys=keys)


@contextlib.asynccontextmanager
async def fetched_keys(
    settings: Settings, *, clock: Callable[[], float] = time.time
) -> AsyncIterator[KeyStore]:
    """The providers' keys fetched as the server fetches them, after the first fetch of each
    (bounded by the providers' fetch timeouts); everything is closed on exit."""
    remote = [p for p in settings.providers if p.static_keys is None]
    fetcher = HttpFetcher() if remote else None
    cache = SharedKeyCache(JwksCacheSettings()) if remote else None
    changed = asyncio.Event()
    store = KeyStore(settings.providers, fetcher=fetcher, cache=cache, clock=clock, on_change=changed.set)

    def first_fetch_done(name: str) -> bool:
        keys = store.provider(name)
        return keys.usable() or sum(keys.stats.fetches.values()) > 0

    try:
        store.start()
        if remote:
            bound = max(p.keys.fetch_timeout_seconds for p in remote) + FIRST_FETCH_MARGIN_SECONDS
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(bound):
                    while not all(first_fetch_done(p.name) for p in remote):
                        changed.clear()
                        await changed.wait()
        yield store
    finally:
        await store.stop()
        if fetcher is not None:
            await fetcher.close()
        if cache is not None:
            await cache.close()


# ---- the explanation, from the pipeline's trace ----

_NOT_JUDGED = {
    "no_rule": "no rule matches the request",
    "anonymous": "none: the rule allows anonymous requests (a token is used when valid, ignored when not)",
    "not_verified": "not evaluated: the token was not verified",
    "no_token": "not evaluated: no token",
    "session_endpoint": "none: ext-authz answers its sign-in callback and logout paths itself",
    "no_session": "not evaluated: no token and no session",
    "session_invalid": "not evaluated: the session cookie is tampered, truncated, expired or foreign",
    "session_expired": "not evaluated: the session is past its max_age or its tokens expired",
    "session_other_provider": "not evaluated: the session is another provider's",
    "refresh_refused": "not evaluated: the identity provider refused to refresh the session",
    "login_unavailable": "not evaluated: the session needs the identity provider, which is unavailable",
}


async def explain(pipeline: Pipeline, request: Request) -> Explanation:
    trace = Trace()
    decision = await pipeline.decide(request, trace)
    return explanation(request, trace, decision)


def explanation(request: Request, trace: Trace, decision: Decision) -> Explanation:
    """What ``trace`` recorded of deciding ``request``, with ``decide()``'s own answer."""
    judged = {j.path: j for j in trace.judged}
    readings = tuple(
        replace(r, requirements_hold=judged[r.path].denial is None) if r.path in judged else r
        for r in trace.readings
    )
    requirements = None
    if trace.matched is not None and trace.judged:
        requirements = _without_wrappers(trace.matched.require, trace.judged[0].steps)
    return Explanation(
        request=request,
        normalised_path=trace.normalised_path if trace.normalised_path is not None else request.path,
        rules=trace.rules,
        matched=trace.matched,
        params=trace.params,
        token=_token_verdict(trace.token),
        requirements=requirements,
        requirements_note=_note(trace),
        dry_run=trace.dry_run,
        decision=decision,
        readings=readings,
    )


def _note(trace: Trace) -> str | None:
    """Why the requirements were not judged, as the pipeline recorded it."""
    if trace.not_judged == "refused" and trace.refused is not None:
        return f"not evaluated: {trace.refused.detail} (400 {trace.refused.code})"
    return _NOT_JUDGED.get(trace.not_judged) if trace.not_judged is not None else None


def _preorder(requirement: Requirement) -> Iterator[Requirement]:
    """The nodes in the order ``explain_requirement`` lists them."""
    yield requirement
    if isinstance(requirement, AllOf | AnyOf):
        for child in requirement.children:
            yield from _preorder(child)
    elif isinstance(requirement, Not):
        yield from _preorder(requirement.child)


def _without_wrappers(
    root: Requirement, steps: Sequence[tuple[int, str, Truth, str | None]]
) -> tuple[RequirementStep, ...]:
    """The steps, leaving out the "all of" that wraps each single requirement map inside
    any_of / all_of / not (it holds exactly when its one child does)."""
    shown: list[RequirementStep] = []
    lifted: list[int] = []  # depths of the wrappers left out, innermost last
    for node, (depth, text, value, reason) in zip(_preorder(root), steps, strict=True):
        while lifted and depth <= lifted[-1]:
            lifted.pop()
        if node is not root and isinstance(node, AllOf) and len(node.children) == 1:
            lifted.append(depth)
            continue
        shown.append(RequirementStep(depth - len(lifted), text, value is True, reason))
    return tuple(shown)


def _token_verdict(seen: TokenSeen | None) -> TokenVerdict:
    if seen is None or (seen.principal is None and seen.error is None):
        return TokenVerdict(False)
    locations = tuple(str(location) for location in seen.locations)
    if seen.principal is not None:
        principal = seen.principal
        return TokenVerdict(
            True,
            locations,
            verified=True,
            provider=principal.provider,
            claims=dict(principal.claims),
            checks=principal.checks,
        )
    assert seen.error is not None
    return TokenVerdict(
        True,
        locations,
        code=seen.error.code,
        description=seen.error.detail,
        status=seen.error.status,
        claimed_provider=seen.claimed_provider,
    )


# ---- the command ----


async def run(
    settings: Settings,
    request: Request,
    keys: KeyResolver | None,
    *,
    clock: Callable[[], float] = time.time,
) -> Explanation:
    """Explain ``request`` with these keys, or with keys fetched like the server's when None."""
    if keys is not None:
        return await explain(Pipeline(compile(settings, clock), keys, clock=clock), request)
    async with fetched_keys(settings, clock=clock) as store, _introspector(settings, clock) as introspector:
        pipeline = Pipeline(compile(settings, clock), store, clock=clock, introspector=introspector)
        return await explain(pipeline, request)


@contextlib.asynccontextmanager
async def _introspector(
    settings: Settings, clock: Callable[[], float]
) -> AsyncIterator[HttpIntrospector | None]:
    """An introspection client like the server's, when a provider introspects (online only:
    with --jwks, an opaque token is answered as the server answers an unreachable endpoint)."""
    if not any(p.introspection is not None for p in settings.providers):
        yield None
        return
    fetcher = HttpFetcher()
    try:
        yield HttpIntrospector(fetcher, clock=clock)
    finally:
        await fetcher.close()
