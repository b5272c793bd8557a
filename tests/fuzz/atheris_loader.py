"""atheris, imported without a static dependency: `make fuzz` installs it, `make test` (ruff, mypy)
runs without it. Import this before any ext_authz module, so that the fuzzers can instrument them."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


def _load() -> ModuleType:
    try:
        return importlib.import_module("atheris")
    except ImportError:
        sys.exit("atheris is not installed: `make fuzz` installs it into the venv")


atheris = _load()
