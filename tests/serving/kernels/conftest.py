"""The C++ kernel library, built once per session from the tests' compile cache."""

from __future__ import annotations

import pytest
import torch

from serving.kernels import Kernels, select_kernels


@pytest.fixture(scope="session")
def cpp_kernels(compiled_config) -> Kernels:
    """The library for a GQA model (3 queries per KV head); `quiver::linear` comes with it."""
    kernels = select_kernels(torch.device("cpu"), use_cpp=True,
                             cache_dir=compiled_config.cache_dir, head_dim=64,
                             num_queries_per_kv=3)
    assert kernels.has_cpp_library, "a C++ compiler is present but the kernels did not build"
    return kernels
