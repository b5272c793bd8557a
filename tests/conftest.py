"""For every test: Hypothesis keeps its example database in the environment (.venv), not in the
repository's top level (the tool caches are set in pyproject.toml)."""

from __future__ import annotations

from pathlib import Path

from hypothesis.configuration import set_hypothesis_home_dir

set_hypothesis_home_dir(str(Path(__file__).resolve().parent.parent / ".venv" / "cache" / "hypothesis"))
