"""What both fuzzers share: the test issuer's keys, a pipeline over them, seeds, an event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from ext_authz.compiled import compile
from ext_authz.keys.jwks import parse_jwks
from ext_authz.keys.static import StaticKeys
from ext_authz.pipeline import Pipeline
from tests.support.attacks import PROVIDER, RULES
from tests.support.tokens import Keys, claims, clock, make_settings, sign_raw

T = TypeVar("T")


# Denials and dry-run notes are logged at warning; a fuzzer's output is for its own findings. A bug
# that the servicer turns into a 500 still fails: the harnesses check every answer.
logging.disable(logging.WARNING)


class Fixture:
    """The issuer's keys, a pipeline that trusts them, and valid tokens to mutate."""

    def __init__(self) -> None:
        self.keys = Keys()
        resolver = StaticKeys({"idp": parse_jwks(self.keys.jwks())})
        self.settings = make_settings(provider=PROVIDER, rules=RULES)
        self.pipeline = Pipeline(compile(self.settings), resolver, clock=clock)
        self.loop = asyncio.new_event_loop()
        claims_variants: list[dict[str, Any]] = [
            {},
            {"email": "a@example.com", "note": "n", "roles": ["r1", "r2"], "tenant": "t"},
            {"scope": "admin read", "nbf": 1_799_999_000, "aud": ["x", "api"]},
        ]
        self.valid_tokens = [
            sign_raw({"alg": key.alg, "typ": "JWT", "kid": key.kid}, {**claims(), **extra}, key)
            for key in (self.keys.rsa, self.keys.ec, self.keys.ed)
            for extra in claims_variants
        ]

    @staticmethod
    def claims() -> dict[str, Any]:
        """Valid claims for the unit tests' fixed clock (the pipeline's clock)."""
        return claims()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)


def write_seeds(argv: list[str], seeds: Callable[[], list[bytes]]) -> None:
    """Put seed inputs into the corpus directories named on the command line (libFuzzer's
    positional arguments), so a run starts from meaningful inputs rather than from nothing."""
    for arg in argv[1:]:
        if arg.startswith("-"):
            continue
        corpus = Path(arg)
        corpus.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds()):
            (corpus / f"seed-{i:03d}").write_bytes(seed)
