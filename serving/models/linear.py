"""Float projections whose kernel is chosen once at load, on weights laid out once.

On CPU, oneDNN runs a GEMM fastest on a weight reordered into its blocked layout: ~1.7x on
the LM head's tall, thin shape (49152 x 576) against MKL's sgemm in float32, and at the
decode shapes inside a compiled bf16 graph batch 1 took 17 ms a step with reordered weights
against 28 ms without (SmolLM2, 2-core Zen 4). Three ways to hold that weight (`Packing`):

- `KERNEL`: Quiver's C++ op (`serving.kernels`) keeps the twin — its own tile layout for a
  bf16 weight on AVX512-BF16 CPUs (`csrc/tile_linear.h`), else oneDNN's reordered one — and
  `torch.ops.quiver.linear` uses it: works eagerly and inside a compiled graph.
- `EAGER`: the module keeps an opaque mkldnn twin and calls oneDNN itself: eager only (no
  compiled graph can trace an mkldnn tensor); the fallback where the C++ library is absent.
- `NONE`: `F.linear` on the plain weight (CUDA, dtypes oneDNN lacks, or a compiled graph
  without the C++ library).
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F

# The batch size oneDNN picks its weight layout for (`_reorder_linear_weight`'s hint).
PACK_BATCH_SIZE_HINT = 1


class Packing(Enum):
    NONE = "none"
    EAGER = "eager"
    KERNEL = "kernel"


def onednn_supports(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def effective_packing(weight: torch.Tensor, packing: Packing) -> Packing:
    """`packing`, or NONE where oneDNN cannot run this weight."""
    return packing if onednn_supports(weight.device, weight.dtype) else Packing.NONE


def prepack(weight: torch.Tensor, packing: Packing) -> torch.Tensor | None:
    """Reorder `weight` for `packing`; returns the module's own twin (EAGER) or None."""
    if packing is Packing.KERNEL:
        torch.ops.quiver.pack_linear_weight(weight.detach(), PACK_BATCH_SIZE_HINT)
    if packing is Packing.EAGER:
        return weight.detach().to_mkldnn()
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
           packing: Packing, packed: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T + bias` through the kernel `packing` names."""
    if packing is Packing.KERNEL:
        return torch.ops.quiver.linear(x, weight, bias)
    if packing is Packing.EAGER and packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)
