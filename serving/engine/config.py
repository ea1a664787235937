"""Engine configuration: KV cache shape, scheduler limits and how the model is compiled."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _require_at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Paged KV cache: `num_blocks` blocks of `block_size` token slots each."""

    block_size: int = 16
    num_blocks: int
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _require_at_least("block_size", self.block_size, 1)
        _require_at_least("num_blocks", self.num_blocks, 1)

    @property
    def num_token_slots(self) -> int:
        return self.block_size * self.num_blocks


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Continuous-batching limits for one engine step and for the waiting queue."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int
    max_waiting_requests: int = 1024

    def __post_init__(self) -> None:
        _require_at_least("max_num_seqs", self.max_num_seqs, 1)
        _require_at_least("max_model_len", self.max_model_len, 2)
        _require_at_least("max_waiting_requests", self.max_waiting_requests, 1)
        # Every running request needs one token per step to decode; a smaller budget
        # would starve the requests at the back of the running list.
        _require_at_least("max_num_batched_tokens", self.max_num_batched_tokens, self.max_num_seqs)


def num_blocks_for_budget(
    budget_bytes: int,
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype_bytes: int,
) -> int:
    """How many KV blocks fit in `budget_bytes`: each block holds K and V for every layer."""
    for name, value in (
        ("num_layers", num_layers),
        ("num_kv_heads", num_kv_heads),
        ("head_dim", head_dim),
        ("block_size", block_size),
        ("dtype_bytes", dtype_bytes),
    ):
        _require_at_least(name, value, 1)
    bytes_per_block = 2 * num_layers * block_size * num_kv_heads * head_dim * dtype_bytes
    num_blocks = budget_bytes // bytes_per_block
    if num_blocks < 1:
        raise ValueError(
            f"KV cache budget of {budget_bytes} bytes fits no block: one block of "
            f"{block_size} tokens needs {bytes_per_block} bytes (K and V x {num_layers} layers "
            f"x {num_kv_heads} KV heads x {head_dim} dims x {dtype_bytes} bytes); "
            "raise the KV cache memory budget or lower block_size"
        )
    return num_blocks


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/quiver`, else `~/.cache/quiver`: built kernels and compiled graphs."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "quiver"


@dataclass(frozen=True, kw_only=True)
class CompilationConfig:
    """How the model runner runs the model: compiled by inductor (default) or eagerly, with
    Quiver's C++ attention kernel (default) or its pure-torch fallback. Either falls back on
    its own when it cannot be built on this host; `cache_dir` keeps what was built."""

    enforce_eager: bool = False
    use_cpp_kernels: bool = True
    cache_dir: Path = field(default_factory=default_cache_dir)
