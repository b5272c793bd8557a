"""The unit tests' fixed clock never depends on today's date.

The clock-dependent unit tests are run again in a child pytest whose process sees the machine's
clock moved (libfaketime, Debian's `faketime`, which `make test` installs): years before the fixed
``NOW`` and years after it. Their answers must not change.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Every unit test module that builds tokens or caches from the fixed clock.
CLOCK_DEPENDENT = (
    "tests/unit/test_identity.py",
    "tests/unit/test_pipeline.py",
    "tests/unit/test_tokencache.py",
    "tests/unit/test_key_store.py",
    "tests/unit/test_response.py",
)


@pytest.mark.parametrize(
    "machine_date", ["2021-03-01 12:00:00", "2027-01-16 00:00:00", "2039-06-30 23:59:00"]
)
def test_clock_dependent_tests_pass_on_any_machine_date(machine_date: str) -> None:
    faketime = shutil.which("faketime")
    assert faketime is not None, "faketime is missing: `make test` installs it (Debian package faketime)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    command = [
        faketime,
        "-f",
        f"@{machine_date}",
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    result = subprocess.run(
        [*command, *CLOCK_DEPENDENT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=110
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
