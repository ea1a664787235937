"""Quiver's own kernels for the native engine, as torch custom ops.

`select_kernels` decides once, at load, what the model calls: where the C++ library builds
(CPU; `serving.kernels.build` compiles and caches it per host), the C++ paged-attention
kernel and linear layers on weights laid out once (Quiver's tile kernel for bf16 on
AVX512-BF16 CPUs, else oneDNN's reordered layout); elsewhere the pure-torch
paged-attention reference (any device). The attention ops share one schema and meaning.
On CUDA, both attention ops get Triton kernels (`serving.kernels.triton_attention`) where
Triton imports and the kernels pass a start-up check against the reference; else the
reference serves. `DECODE_ATTENTION` is the decodes-only op that CUDA graphs capture.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from serving.kernels import ops
from serving.kernels.build import load_cpu_kernels

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttentionOp:
    """The paged-attention op a model calls, and which implementation it is."""

    name: str  # "cpp" or "torch"
    op: torch._ops.OpOverload


CPP_ATTENTION = AttentionOp("cpp", torch.ops.quiver.paged_attention.default)
REFERENCE_ATTENTION = AttentionOp("torch", torch.ops.quiver.paged_attention_reference.default)
# `quiver::paged_attention` once its CUDA kernel is registered (`triton_attention.register`)
TRITON_ATTENTION = AttentionOp("triton", torch.ops.quiver.paged_attention.default)
DECODE_ATTENTION = AttentionOp("decode", torch.ops.quiver.paged_attention_decode.default)


@dataclass(frozen=True)
class Kernels:
    """What a model runs: its attention op, and whether the C++ library (and with it
    `quiver::linear`) is loaded."""

    attention: AttentionOp
    has_cpp_library: bool


PURE_TORCH = Kernels(REFERENCE_ATTENTION, has_cpp_library=False)
# What the C++ decode kernel handles (csrc/paged_attention.cpp).
CPP_HEAD_DIMS = tuple(range(16, 129, 16))
CPP_MAX_QUERIES_PER_KV = 16


def select_kernels(device: torch.device, *, use_cpp: bool, cache_dir: Path, head_dim: int,
                   num_queries_per_kv: int, dtype: torch.dtype = torch.bfloat16) -> Kernels:
    """The C++ kernels on CPU when wanted and buildable, the Triton ones on CUDA where they
    answer a check in float32 and `dtype` (the model's), else pure torch (logged why)."""
    if device.type == "cuda":
        return _cuda_kernels(device, head_dim=head_dim, num_queries_per_kv=num_queries_per_kv,
                             dtypes=tuple(dict.fromkeys((torch.float32, dtype))))
    if device.type != "cpu" or not use_cpp:
        return PURE_TORCH
    loaded = load_cpu_kernels(cache_dir)
    if loaded.library is None:
        logger.warning("Quiver's C++ kernels are unavailable, using pure torch: %s",
                       loaded.reason)
        return PURE_TORCH
    logger.info("Quiver's C++ kernels: %s (%s)", loaded.library,
                "built now" if loaded.built else "cached")
    if head_dim not in CPP_HEAD_DIMS or num_queries_per_kv > CPP_MAX_QUERIES_PER_KV:
        logger.info("paged attention in pure torch: the C++ kernel takes head_dim %s and at "
                    "most %d query heads per KV head (this model: %d, %d)", CPP_HEAD_DIMS,
                    CPP_MAX_QUERIES_PER_KV, head_dim, num_queries_per_kv)
        return Kernels(REFERENCE_ATTENTION, has_cpp_library=True)
    return Kernels(CPP_ATTENTION, has_cpp_library=True)


def _cuda_kernels(device: torch.device, *, head_dim: int, num_queries_per_kv: int,
                  dtypes: tuple[torch.dtype, ...]) -> Kernels:
    """Each Triton kernel that passes its check becomes its op's CUDA kernel; the step op's
    decides what the model calls."""
    try:
        from serving.kernels import triton_attention
    except ImportError as exc:
        logger.warning("paged attention on CUDA in pure torch (no Triton: %s)", exc)
        return PURE_TORCH
    registered = []
    for op_name in ("paged_attention_decode", "paged_attention"):
        try:
            triton_attention.check(op_name, device, num_queries_per_kv=num_queries_per_kv,
                                   head_dim=head_dim, dtypes=dtypes)
        except Exception as exc:  # it fails here: the op's other kernel serves
            logger.warning("quiver::%s on CUDA without its Triton kernel, which failed its "
                           "check: %s", op_name, str(exc).strip().splitlines()[0]
                           if str(exc).strip() else repr(exc))
            continue
        triton_attention.register(op_name)
        registered.append(op_name)
    logger.info("Quiver's Triton kernels on CUDA: %s", ", ".join(registered) or "none")
    if "paged_attention" not in registered:
        return PURE_TORCH
    return Kernels(TRITON_ATTENTION, has_cpp_library=False)


__all__ = ["CPP_ATTENTION", "DECODE_ATTENTION", "PURE_TORCH", "REFERENCE_ATTENTION",
           "TRITON_ATTENTION", "AttentionOp", "Kernels", "ops", "select_kernels"]
