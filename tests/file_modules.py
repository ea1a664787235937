"""Import a file that is not in a package (a script, a generator) as a module, for tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_file_module(path: Path, name: str) -> ModuleType:
    """`path` (absolute, or relative to the repository) executed as module `name`, registered
    in sys.modules first: dataclasses look their module up there."""
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
