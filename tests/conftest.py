"""Shared fixtures: the tiny model and the real SmolLM2, built once and cached under models/.

Both builders are idempotent (a marker file says the dir is complete and verified), so the
suite converts SmolLM2 only on the first run of a checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = Path(os.environ.get("QUIVER_TEST_MODELS", REPO_ROOT / "models"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from quiver.models.tiny import build_tiny

    return build_tiny(MODELS_DIR / "tiny-llama")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from quiver.models.smollm2 import fetch_smollm2

    return fetch_smollm2(MODELS_DIR / "smollm2-135m-instruct")
