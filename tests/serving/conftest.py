"""Fixtures shared by the serving tests: where built kernels and compiled graphs are cached.

One cache for the whole session (and across sessions: the production default,
`~/.cache/quiver`, unless QUIVER_TEST_CACHE_DIR says otherwise), so the C++ kernels build
and the tiny model compiles once, not once per test.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from serving.engine.config import CompilationConfig, default_cache_dir
from serving.kernels.build import compiler


@pytest.fixture(scope="session")
def quiver_cache_dir() -> Path:
    return Path(os.environ.get("QUIVER_TEST_CACHE_DIR") or default_cache_dir())


@pytest.fixture(scope="session")
def compiled_config(quiver_cache_dir: Path) -> CompilationConfig:
    """The production default: compiled layers, C++ kernels."""
    if shutil.which(compiler()) is None:
        pytest.skip(f"no C++ compiler ({compiler()}) on this machine")
    return CompilationConfig(cache_dir=quiver_cache_dir)


@pytest.fixture(scope="session")
def eager_config(quiver_cache_dir: Path) -> CompilationConfig:
    """The fallback: eager, pure-torch attention, no C++ library."""
    return CompilationConfig(enforce_eager=True, use_cpp_kernels=False,
                             cache_dir=quiver_cache_dir)
