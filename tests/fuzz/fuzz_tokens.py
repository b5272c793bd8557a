"""Coverage-guided fuzzing of tokens: `parse_token`, `Verifier`, and issuer-signed claims through the
whole decision and the answer to Envoy.

Run by `make fuzz` (`python -m tests.fuzz.fuzz_tokens [libFuzzer flags] [corpus dir]`). The last
byte of an input picks how the rest becomes a token: UTF-8 text, Latin-1 bytes, a valid token with
a few characters changed, segments built from fuzzer-chosen text and signature bytes, or
fuzzer-chosen payload text SIGNED with the issuer's key (so the claim checks, identity headers
and dynamic metadata see arbitrary claims). A crash is any exception other than a denial
(errors.AuthError), an answer that is not well-formed, and any token accepted whose signed part
(header and payload segments) the issuer did not sign.
"""

from __future__ import annotations

import contextlib
import json
import sys

from tests.fuzz.atheris_loader import atheris

# Only modules first imported inside this block get coverage instrumentation.
with atheris.instrument_imports(include=["ext_authz"]):
    from ext_authz import errors
    from ext_authz.identity import parse_token
    from ext_authz.jws import b64url
    from ext_authz.model import Credential, Request
    from ext_authz.sources import HeaderToken
    from ext_authz.transport.adapter import to_response
    from tests.fuzz.common import Fixture, write_seeds
    from tests.support.attacks import assert_well_formed
    from tests.support.tokens import sign_raw

FIXTURE = Fixture()
MAX_TOKEN_BYTES = FIXTURE.settings.max_token_bytes
LOCATION = HeaderToken("authorization", "Bearer ")
SIGNED_PARTS = frozenset(t.rsplit(".", 1)[0] for t in FIXTURE.valid_tokens)
HEADER = {"alg": "RS256", "typ": "JWT", "kid": FIXTURE.keys.rsa.kid}
MODES = 5
SIGNED = 4


def token_from(data: bytes) -> tuple[int, str]:
    if not data:
        return 0, ""
    mode, body = data[-1] % MODES, data[:-1]
    if mode == 0:
        return mode, body.decode("utf-8", "replace")
    if mode == 1:
        return mode, body.decode("latin-1")
    fdp = atheris.FuzzedDataProvider(body)
    if mode == 2:  # a valid token with a few characters changed
        token = list(FIXTURE.valid_tokens[fdp.ConsumeIntInRange(0, len(FIXTURE.valid_tokens) - 1)])
        for _ in range(fdp.ConsumeIntInRange(1, 4)):
            token[fdp.ConsumeIntInRange(0, len(token) - 1)] = chr(fdp.ConsumeIntInRange(0, 255))
        return mode, "".join(token)
    if mode == 3:  # anything in the segments, a signature that cannot verify
        header = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 300))
        payload = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 600))
        signature = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 600))
        return mode, ".".join([b64url(header.encode()), b64url(payload.encode()), b64url(signature)])
    # Issuer-signed arbitrary claims: lone surrogates, huge integers and 1e400 must all be answered.
    payload = body.decode("utf-8", "replace")
    return mode, sign_raw(HEADER, payload, FIXTURE.keys.rsa)


def fuzz_one_input(data: bytes) -> None:
    mode, token = token_from(data)
    with contextlib.suppress(errors.AuthError):
        parse_token(token, MAX_TOKEN_BYTES)
    if mode == SIGNED:
        # The whole decision and the answer Envoy gets, for claims the issuer vouches for.
        request = Request("GET", "/orders", headers={"authorization": f"Bearer {token}"})
        assert_well_formed(to_response(FIXTURE.run(FIXTURE.pipeline.decide(request))))
        return
    try:
        FIXTURE.run(FIXTURE.pipeline.verifier.verify(Credential(token, (LOCATION,))))
    except errors.AuthError:
        return
    # Accepted: it must carry the very bytes the issuer signed (its signature may differ in the
    # bits base64url decoding ignores, or be another valid ECDSA signature over them).
    if token.rsplit(".", 1)[0] not in SIGNED_PARTS:
        raise AssertionError(f"a token the issuer did not sign was accepted: {token!r}")


def seeds() -> list[bytes]:
    """Each valid token as text, and claim sets to be signed, plus a start for the other modes."""
    tokens = [t.encode() + bytes([0]) for t in FIXTURE.valid_tokens]
    claim_sets = [
        {**FIXTURE.claims(), "note": "n", "roles": ["a", "b"], "email": "e@x", "tenant": {"id": 1}},
        {**FIXTURE.claims(), "sub": "line\r\nbreak", "scope": "admin", "nbf": 0.5},
        {**FIXTURE.claims(), "aud": ["api", "x"], "exp": "soon"},
    ]
    signed = [json.dumps(c, ensure_ascii=False).encode() + bytes([SIGNED]) for c in claim_sets]
    return [*tokens, *signed, b"\xff\xfe\x01", b"\x02\x01\x02", b'{"alg": "none"}\x03']


def main() -> None:
    write_seeds(sys.argv, seeds)
    atheris.Setup(sys.argv, fuzz_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
