"""Attack tests from the review of 85991f3..HEAD: each asserts the correct behaviour."""

from __future__ import annotations

import io
import sys
import threading

import pytest

from ext_authz._proto.envoy.service.auth.v3 import external_auth_pb2
from ext_authz.linewriter import LineWriter
from ext_authz.model import Allow
from ext_authz.transport.adapter import _Responses, to_response


class _FailsOnce(io.StringIO):
    """A stream whose first write raises something other than OSError/ValueError."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def write(self, s: str) -> int:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("unexpected stream failure")
        return super().write(s)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_writer_survives_an_unexpected_stream_exception() -> None:
    stream = _FailsOnce()
    writer = LineWriter(stream)
    writer.write("lost\n")
    writer.flush(timeout=1.0)
    writer.write("kept\n")
    assert writer.flush(timeout=1.0), "writer thread died: every later line is lost"
    assert stream.getvalue() == "kept\n"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_writer_survives_stdout_being_none(monkeypatch: pytest.MonkeyPatch) -> None:
    # fd 1 closed at start-up (or pythonw): sys.stdout is None → AttributeError in the thread.
    monkeypatch.setattr(sys, "stdout", None)
    writer = LineWriter()
    writer.write("a\n")
    writer.flush(timeout=1.0)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    writer.write("b\n")
    assert writer.flush(timeout=1.0), "writer thread died on sys.stdout None"
    assert out.getvalue() == "b\n"


class _Blocked(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def write(self, s: str) -> int:
        self.entered.set()
        self.release.wait()
        return super().write(s)


def test_writer_queue_is_bounded_when_the_stream_blocks() -> None:
    # Envoy sidecar / log shipper stops reading stdout: every Check still queues its line.
    stream = _Blocked()
    writer = LineWriter(stream)
    try:
        writer.write("first\n")
        assert stream.entered.wait(2.0)
        for _ in range(300_000):
            writer.write('{"ts":"x","request_id":"' + "r" * 64 + '"}\n')
        assert len(writer._queue) <= 100_000, "queue grows without bound on a blocked stdout"
    finally:
        stream.release.set()
        writer.flush(timeout=10.0)


def test_response_cache_keeps_negative_zero_apart() -> None:
    # (name, float, 0.0) == (name, float, -0.0) and they hash alike: one answer served for the other.
    responses = _Responses()
    responses.serialized(Allow(metadata={"score": 0.0}), "")
    got = external_auth_pb2.CheckResponse.FromString(
        responses.serialized(Allow(metadata={"score": -0.0}), "")
    )
    assert got == to_response(Allow(metadata={"score": -0.0}))
    assert str(got.dynamic_metadata.fields["score"].number_value) == "-0.0"
