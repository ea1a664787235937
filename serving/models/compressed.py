"""Read compressed-tensors `pack-quantized` checkpoints (what llmcompressor saves).

A quantized Linear `<name>` is stored as `<name>.weight_packed` (int32, values offset to
unsigned and packed densely along K: element i sits at bit i * num_bits of the row),
`<name>.weight_scale` `[N, num_groups]` (`[N, 1]` per channel), `<name>.weight_shape`
`[N, K]` and, when asymmetric, `<name>.weight_zero_point` (signed, packed the same way but
along N). The weight is `(q - zero_point) * scale`, q and zero_point signed.

`read_quantized` turns one module's tensors into a `QuantizedTensor` of signed int8 values,
which `serving.models.quant` hands to a low-bit kernel. Nothing here dequantizes at load;
`dequantize` exists for the on-the-fly fallback and for tests.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

QUANT_METHOD = "compressed-tensors"
PACKED_FORMAT = "pack-quantized"
_STRATEGIES = ("channel", "group")


@dataclass(frozen=True)
class WeightQuantArgs:
    """Weight-only integer quantization of one config group."""

    num_bits: int
    symmetric: bool
    group_size: int | None  # None: one scale per output channel


@dataclass(frozen=True)
class QuantizationConfig:
    """`quantization_config` of a compressed-tensors `pack-quantized` checkpoint."""

    groups: tuple[tuple[tuple[str, ...], WeightQuantArgs], ...]  # (targets, args)
    ignore: tuple[str, ...]

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> QuantizationConfig | None:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        return cls.from_dict(config.get("quantization_config"))

    @classmethod
    def from_dict(cls, config: Mapping[str, Any] | None) -> QuantizationConfig | None:
        """None when the checkpoint is not quantized; `ValueError` naming what we can't run."""
        if not config:
            return None
        method = config.get("quant_method")
        if method != QUANT_METHOD:
            raise ValueError(
                f"quantization_config.quant_method {method!r} is not supported; "
                f"expected {QUANT_METHOD!r}"
            )
        groups = tuple(
            _parse_group(name, group, config.get("format"))
            for name, group in (config.get("config_groups") or {}).items()
        )
        if not groups:
            raise ValueError("quantization_config.config_groups is empty")
        return cls(groups=groups, ignore=tuple(config.get("ignore") or ()))

    def weight_args(self, module_name: str) -> WeightQuantArgs:
        """The quantization of `module_name` (an HF Linear name); `ValueError` if none."""
        for targets, args in self.groups:
            if any(_matches(target, module_name) for target in targets):
                return args
        raise ValueError(f"no quantization_config.config_groups entry targets {module_name!r}")


def _parse_group(name: str, group: Mapping[str, Any], default_format: str | None) -> Any:
    where = f"quantization_config.config_groups.{name}"
    fmt = group.get("format") or default_format
    if fmt != PACKED_FORMAT:
        raise ValueError(f"{where}: format {fmt!r} is not supported; expected {PACKED_FORMAT!r}")
    if group.get("input_activations") or group.get("output_activations"):
        raise ValueError(f"{where}: activation quantization is not supported (weight-only)")
    weights = group.get("weights") or {}
    if weights.get("type", "int") != "int" or not 1 <= int(weights.get("num_bits", 0)) <= 8:
        raise ValueError(f"{where}.weights: only 1-8 bit int weights are supported")
    strategy = weights.get("strategy")
    if strategy not in _STRATEGIES:
        raise ValueError(f"{where}.weights.strategy {strategy!r} is not supported")
    if weights.get("actorder") not in (None, False, "static"):
        raise ValueError(f"{where}.weights.actorder {weights['actorder']!r} is not supported")
    group_size = int(weights["group_size"]) if strategy == "group" else None
    args = WeightQuantArgs(int(weights["num_bits"]), bool(weights.get("symmetric")), group_size)
    return tuple(group.get("targets") or ()), args


def _matches(target: str, module_name: str) -> bool:
    if target == "Linear":
        return True
    if target.startswith("re:"):
        return re.match(target[3:], module_name) is not None
    return target == module_name


@dataclass
class QuantizedTensor:
    """A weight `[N, K]` as signed integer values with per-row, per-group scales."""

    values: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float [N, num_groups]
    zero_point: torch.Tensor | None  # int8 [N, num_groups], None when symmetric
    num_bits: int
    group_size: int | None  # None: per channel (num_groups == 1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape[0], self.values.shape[1]

    @property
    def effective_group_size(self) -> int:
        """Columns per scale: the group size, or K for per-channel scales."""
        return self.group_size or self.values.shape[1]


def unpack_from_int32(packed: torch.Tensor, num_bits: int, length: int,
                      packed_dim: int = 1) -> torch.Tensor:
    """Signed int8 values, `length` of them along `packed_dim`, of a dense int32 packing."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed tensor must be int32, got {packed.dtype}")
    if packed_dim == 0:
        return unpack_from_int32(packed.t().contiguous(), num_bits, length).t().contiguous()
    rows, num_words = packed.shape
    if num_words * 32 < length * num_bits:
        raise ValueError(f"{num_words} int32 words cannot hold {length} x {num_bits} bits")
    if num_bits in (4, 8) and sys.byteorder == "little":  # bytes are in element order
        as_bytes = packed.contiguous().view(torch.uint8)
        if num_bits == 4:
            as_bytes = torch.stack([as_bytes & 0xF, as_bytes >> 4], dim=-1)
        unsigned = as_bytes.reshape(rows, -1)[:, :length]
        return (unsigned.to(torch.int16) - (1 << (num_bits - 1))).to(torch.int8)
    if 32 % num_bits == 0:  # whole values per word: one shift per value
        shifts = torch.arange(0, 32, num_bits, dtype=torch.int32, device=packed.device)
        unsigned = (packed.unsqueeze(-1) >> shifts) & ((1 << num_bits) - 1)
    else:  # values straddle words: go through single bits
        shifts = torch.arange(32, dtype=torch.int32, device=packed.device)
        bits = ((packed.unsqueeze(-1) >> shifts) & 1).view(rows, num_words * 32)
        bits = bits[:, : length * num_bits].view(rows, length, num_bits)
        unsigned = (bits << torch.arange(num_bits, dtype=torch.int32, device=packed.device)).sum(-1)
    unsigned = unsigned.reshape(rows, -1)[:, :length]
    return (unsigned - (1 << (num_bits - 1))).to(torch.int8)


def read_quantized(read: Callable[[str], torch.Tensor], name: str,
                   args: WeightQuantArgs) -> QuantizedTensor:
    """The quantized weight of module `name` from its `weight_packed` & co. tensors."""
    num_rows, num_cols = (int(size) for size in read(f"{name}.weight_shape").tolist())
    values = unpack_from_int32(read(f"{name}.weight_packed"), args.num_bits, num_cols)
    if values.shape[0] != num_rows:
        raise ValueError(f"{name}.weight_packed has {values.shape[0]} rows, expected {num_rows}")
    num_groups = math.ceil(num_cols / args.group_size) if args.group_size else 1
    scale = read(f"{name}.weight_scale").reshape(num_rows, -1)
    if scale.shape[1] != num_groups:
        raise ValueError(
            f"{name}.weight_scale has {scale.shape[1]} groups per row, expected {num_groups}"
        )
    zero_point = None
    if not args.symmetric:
        stored = read(f"{name}.weight_zero_point")
        zero_point = (
            unpack_from_int32(stored, args.num_bits, num_rows, packed_dim=0)
            if stored.dtype == torch.int32 else stored.to(torch.int8)
        ).reshape(num_rows, num_groups)
    return QuantizedTensor(values, scale, zero_point, args.num_bits, args.group_size)


def cat_rows(parts: list[QuantizedTensor], names: list[str]) -> QuantizedTensor:
    """Stack weights along N (fused q/k/v, gate/up): scales and zero points are per row."""
    first = parts[0]
    for part, name in zip(parts, names, strict=True):
        same = (part.num_bits, part.group_size, part.shape[1]) == (
            first.num_bits, first.group_size, first.shape[1]
        )
        if not same:
            raise ValueError(f"{names} are fused but {name!r} is quantized differently")
    zero_points = None
    if any(part.zero_point is not None for part in parts):
        zero_points = torch.cat([
            part.zero_point if part.zero_point is not None
            else torch.zeros_like(part.scale, dtype=torch.int8)
            for part in parts
        ])
    return QuantizedTensor(
        values=torch.cat([part.values for part in parts]),
        scale=torch.cat([part.scale for part in parts]),
        zero_point=zero_points,
        num_bits=first.num_bits,
        group_size=first.group_size,
    )


def expand_groups(per_group: torch.Tensor, group_size: int, num_cols: int) -> torch.Tensor:
    """`[N, num_groups]` -> `[N, num_cols]`: each group's value repeated over its columns."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :num_cols]


def dequantize(weight: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """The float weight `[N, K]`: `(values - zero_point) * scale`, computed in float32."""
    num_cols = weight.shape[1]
    group_size = weight.effective_group_size
    values = weight.values.float()
    if weight.zero_point is not None:
        values = values - expand_groups(weight.zero_point.float(), group_size, num_cols)
    return (values * expand_groups(weight.scale.float(), group_size, num_cols)).to(dtype)
