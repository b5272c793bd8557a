"""Coverage-guided fuzzing of request adaptation: CheckRequest bytes → `to_request` → pipeline.

Run by `make fuzz` (`python -m tests.fuzz.fuzz_check_request [libFuzzer flags] [corpus dir]`).
Each input is parsed as a serialized CheckRequest (bytes that are not one are skipped, as gRPC
would refuse them), adapted, decided and answered; the seeds are requests Envoy sends in both
header encodings, with valid, forged and doubled tokens. A crash is any exception on the way, an
answer that is not well-formed, or an allow without one of the issuer's valid tokens on a route
that needs one.
"""

from __future__ import annotations

import sys

from google.protobuf.message import DecodeError

from tests.fuzz.atheris_loader import atheris

# Only modules first imported inside this block get coverage instrumentation.
with atheris.instrument_imports(include=["ext_authz"]):
    from ext_authz._proto.envoy.service.auth.v3 import external_auth_pb2
    from ext_authz.model import Allow
    from ext_authz.transport.adapter import to_request, to_response
    from ext_authz.transport.servicer import AuthorizationServicer
    from tests.fuzz.common import Fixture, write_seeds
    from tests.support.attacks import assert_well_formed, bearer, check, check_request

FIXTURE = Fixture()
SERVICER = AuthorizationServicer(FIXTURE.pipeline)
# The rules of test_attacks.RULES that let a request through without a valid token.
OPEN_RULES = frozenset({"rules[0]", "dry"})


def fuzz_one_input(data: bytes) -> None:
    try:
        request = external_auth_pb2.CheckRequest.FromString(data)
    except DecodeError:
        return
    adapted = to_request(request)
    decision = FIXTURE.run(FIXTURE.pipeline.decide(adapted))
    to_response(decision).SerializeToString()
    answer = FIXTURE.run(check(SERVICER, request))
    assert_well_formed(answer)
    if isinstance(decision, Allow) and decision.rule not in OPEN_RULES:
        assert decision.provider is not None, f"allowed without identity: {request}"
    if isinstance(decision, Allow) and decision.provider is not None:
        # Signed bytes of one of the issuer's tokens must be in the request (the signature may
        # differ in the bits base64url decoding ignores, or be another valid ECDSA signature).
        assert any(t.rsplit(".", 1)[0].encode() in data for t in FIXTURE.valid_tokens), (
            f"identity without a valid token: {request}"
        )


def seeds() -> list[bytes]:
    valid = FIXTURE.valid_tokens[0]
    forged = valid[:-8] + "AAAAAAAA"
    requests = [
        bearer(valid),
        bearer(forged),
        bearer(valid, path="/public/x", **{"x-user-id": "forged"}),
        bearer(valid, path="/admin/x"),
        bearer(valid, path="/tenant/x"),
        check_request({"authorization": f"Bearer {valid}, Bearer {forged}"}),
        check_request(path=f"/orders?access_token={valid}"),
        check_request({"cookie": "a=b", "x-user-id": "forged"}, path="/dry/x"),
        check_request(raw=[("Authorization", f"Bearer {valid}".encode()), ("X-User-Id", b"forged")]),
        check_request(raw=[("authorization", b"Bearer \xff"), ("cookie", b"a=1"), ("cookie", b"b=2")]),
        external_auth_pb2.CheckRequest(),
    ]
    return [r.SerializeToString() for r in requests]


def main() -> None:
    write_seeds(sys.argv, seeds)
    atheris.Setup(sys.argv, fuzz_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
