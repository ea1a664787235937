"""Building blocks of the Llama family: RMSNorm and the gated SiLU MLP with fused gate_up.

Parameters are allocated uninitialised; `loader.load_model` fills every one of them, and
swaps a projection for a quantized one (`serving.models.quant`) where the checkpoint holds
one. Forward passes call `torch.nn.functional` directly to keep per-op overhead low.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serving.models.quant import FloatProjection, Projection


def empty_parameter(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 per row, scaled in the model dtype (as transformers)."""

    def __init__(
        self, hidden_size: int, eps: float, *, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__()
        self.weight = empty_parameter(hidden_size, dtype=dtype, device=device)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            variance = x.pow(2).mean(-1, keepdim=True)
            return self.weight * (x * torch.rsqrt(variance + self.eps))
        x32 = x.float()
        variance = x32.pow(2).mean(-1, keepdim=True)
        return self.weight * (x32 * torch.rsqrt(variance + self.eps)).to(x.dtype)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one `[2 * I, H]` weight."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj: Projection = FloatProjection(
            2 * intermediate_size, hidden_size, bias=False, dtype=dtype, device=device
        )
        self.down_proj: Projection = FloatProjection(
            hidden_size, intermediate_size, bias=False, dtype=dtype, device=device
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)
