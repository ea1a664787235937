"""Projections whose kernel is chosen once at load: oneDNN with prepacked weights on CPU.

On CPU, `F.linear` goes through MKL sgemm, which handles the LM head's tall, thin shape
(49152 x 576) poorly; oneDNN with a weight reordered once at load is ~1.7x faster on it and
no slower on the decoder's projections. Elsewhere (CUDA, dtypes oneDNN lacks) `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def onednn_supports(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight in oneDNN's layout, or None where oneDNN is not the faster kernel."""
    if not onednn_supports(weight.device, weight.dtype):
        return None
    return weight.detach().to_mkldnn()


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T + bias`, through the prepacked weight when there is one."""
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
