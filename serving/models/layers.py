"""Building blocks of the Llama family: RMSNorm and the gated SiLU MLP with fused gate_up.

Parameters are allocated uninitialised; `loader.load_model` fills every one of them.
Forward passes call `torch.nn.functional` directly to keep per-op overhead low.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serving.models.linear import linear, prepack


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
        self.gate_up_proj = empty_parameter(
            2 * intermediate_size, hidden_size, dtype=dtype, device=device
        )
        self.down_proj = empty_parameter(hidden_size, intermediate_size, dtype=dtype, device=device)
        self.gate_up_packed = self.down_packed = None

    def prepack(self) -> None:
        self.gate_up_packed = prepack(self.gate_up_proj)
        self.down_packed = prepack(self.down_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = linear(x, self.gate_up_proj, self.gate_up_packed)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return linear(F.silu(gate) * up, self.down_proj, self.down_packed)
