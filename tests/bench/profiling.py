"""A py-spy profile of a running process, summed up by function.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;frame count``), each frame
``function (file:line)``. Self time is where the sample's innermost frame is; inclusive time counts
a function once per sample in which it appears anywhere. Lines are dropped so that a function is one
entry. py-spy needs ptrace (root, or CAP_SYS_PTRACE); without it the profile is left out.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>.*?)(?::\d+)?\)$")


@dataclass(frozen=True, slots=True)
class Profile:
    samples: int
    self_counts: Counter[str]
    inclusive_counts: Counter[str]


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def _short(frame: str) -> str:
    found = _FRAME.match(frame.strip())
    if found is None:
        return frame.strip()
    path = found.group("file")
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = "/".join(Path(path).parts[-2:])
    return f"{found.group('function')} ({path})"


def parse(raw: str) -> Profile:
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # The first frame is the thread ("process 123:\"python\"" / "thread (0x...)"), then outermost first.
        frames = [
            _short(f) for f in stack.split(";") if "(" in f and not f.startswith(("process ", "thread "))
        ]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    return Profile(total, self_counts, inclusive)


def record(pid: int, seconds: float, output: Path, *, native: bool = False) -> tuple[Profile | None, str]:
    """Sample ``pid`` for ``seconds``; return the profile or why there is none."""
    binary = py_spy()
    if binary is None:
        return None, "py-spy is not installed"
    argv = [
        binary,
        "record",
        "-d",
        f"{seconds:g}",
        "-p",
        str(pid),
        "-f",
        "raw",
        "-o",
        str(output),
    ]
    # --native unwinds C frames too (gRPC core, protobuf, OpenSSL), which needs the process paused
    # at each sample; without it, sampling does not pause the process.
    argv.append("--native" if native else "--nonblocking")
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if completed.returncode != 0 or not output.exists():
        return None, f"py-spy failed ({completed.returncode}): {completed.stderr.strip()[-300:]}"
    return parse(output.read_text(errors="replace")), ""
