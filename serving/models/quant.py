"""Projections (`y = x @ W.T + b`) whose kernel is chosen once at load.

- `FloatProjection`: a float weight, on CPU through Quiver's tile kernel or oneDNN on a twin
  laid out once (`serving.models.linear`).
- `Int4Projection` (CPU, 4-bit, group size a multiple of 32 or per channel): the weight
  stays packed two values a byte; `torch._weight_int4pack_mm_for_cpu` dequantizes tiles
  inside the matmul. Its convention is `w = (u - 8) * scale + zero` with `u` unsigned in
  [0, 15]; compressed-tensors' `w = (q - zp) * scale` with signed `q` maps onto it as
  `u = q + 8`, `zero = -zp * scale`. The kernel needs `K % group == 0`, a group of 32, 64,
  128 or 256 and `N % 16 == 0`: a partial last group (K not a multiple of the group size)
  is padded with zero columns at load and the activation with zeros per call, N with zero
  rows whose outputs are dropped; a larger group is split into kernel-sized groups that
  repeat its scale.
- `Int8Projection` (CPU, any other 1-8 bit weight): int8 values, `torch._weight_int8pack_mm`
  (per-row scales) once per channel or once per group, summed; an asymmetric zero point
  is one small correction matmul over per-group sums of the activation. A symmetric
  per-channel weight (what `quiver optimize int8` writes) is packed at load for Quiver's
  own kernel instead (`quiver::int8_linear`; bf16 models on AVX512-BF16 CPUs, float32 models
  on AVX2 CPUs): in bf16 0.33-0.5x oneDNN bf16's time at one row, about even at 32, where
  torch's kernel took 2-2.8x; in float32 (AVX2 Zen 2) 0.12-0.26x oneDNN float32's at one
  row, 0.6-0.8x at 32, where torch's scalar kernel took 1.1-2x at one row
  (`benchmarks/linear_kernels.py`).
  A bf16 or float32 model's int4 weights are repacked alike for `quiver::int4_linear`.
- `DequantProjection` (CUDA and other devices): keeps int8 values and dequantizes per call.

The CPU kernels are GEMV-shaped: their time grows with every row, while the other way — a
call rebuilds the float weight from the stored integers, runs the float GEMM and drops the
weight — pays a fixed rebuild first. Past `kernel_max_tokens` rows the rebuild wins: in
bf16/fp16, 32 rows for int8 and 256 for int4 (whose unpacking costs ~3 ms a 1536x576 weight
on a 2-core AVX-512 host, against ~0.011 ms per row in the kernel); in float32, whose
torch low-bit kernels are scalar code, past one row; never in bf16 where it is emulated
(the rebuilt weight's GEMM is slower still). Quiver's own kernels take every batch (int4 in
bf16: up to 256 rows).

No path turns a quantized weight back into a stored float copy.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from serving.kernels.ops import lowbit_kernels_run
from serving.models.compressed import QuantizedTensor, WeightQuantArgs, dequantize
from serving.models.linear import Packing, effective_packing, linear, onednn_supports, prepack

logger = logging.getLogger(__name__)

INT4_KERNEL_GROUP_SIZES = (256, 128, 64, 32)
INT4_KERNEL_ROW_BLOCK = 64  # padded N: a multiple of every row block torch packs int4 in
# Rows a block of torch's CPU int4 packing holds: its kernel's vector width in bytes (64 with
# AVX-512, 32 with AVX2: ATen picks at run time, so `int4_row_block` probes it).
_INT4_ROW_BLOCKS = (64, 32)
INT4_OFFSET = 8
# Largest batch (tokens) given to a low-bit CPU kernel, by kernel; larger batches (prefill)
# rebuild the float weight per call and use the float GEMM (break-even points measured on
# SmolLM2's projection shapes: see the module docstring). Float32: scalar kernels, 1 row.
_KERNEL_MAX_TOKENS = {"int8pack_mm": 32, "int4pack_mm": 256}
_VECTORISED_DTYPES = (torch.bfloat16, torch.float16)
# Whether oneDNN runs bf16 GEMMs natively here (AVX512-BF16, AMX), read once at import: a
# compiled graph reads a constant, not an op call.
_NATIVE_BF16 = onednn_supports(torch.device("cpu"), torch.bfloat16)


def int8_tiles(values: torch.Tensor) -> torch.Tensor:
    """int8 `[N, K]` -> `quiver::int8_linear`'s tiles `[N/16, K/2, 32]`: per 16 output
    columns and input-feature pair, column j's two values at bytes 2j and 2j + 1."""
    rows, features = values.shape
    return (values.view(rows // 16, 16, features // 2, 2).permute(0, 2, 1, 3).contiguous()
            .view(rows // 16, features // 2, 32))


def int8_untiled(tiles: torch.Tensor) -> torch.Tensor:
    """The inverse of `int8_tiles`: `[N, K]`."""
    num_tiles, pairs, _ = tiles.shape
    return tiles.view(num_tiles, pairs, 16, 2).permute(0, 2, 1, 3).reshape(-1, 2 * pairs)


def int4_tiles(unsigned: torch.Tensor) -> torch.Tensor:
    """Values in [0, 15] `[N, K]` -> `quiver::int4_linear`'s tiles `[N/16, K/2, 16]` uint8:
    column j's features 2p and 2p + 1 in byte j's low and high nibbles."""
    rows, features = unsigned.shape
    pairs = unsigned.to(torch.uint8).view(rows // 16, 16, features // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).transpose(1, 2).contiguous()


def int4_untiled(tiles: torch.Tensor) -> torch.Tensor:
    """The inverse of `int4_tiles`: uint8 `[N, K]`."""
    num_tiles, pairs, _ = tiles.shape
    columns = tiles.transpose(1, 2)  # [N/16, 16, K/2]
    return torch.stack([columns & 0xF, columns >> 4], dim=-1).reshape(16 * num_tiles, 2 * pairs)


def kernel_max_tokens(kernel: str, dtype: torch.dtype) -> int | None:
    """Rows past which a call to torch's low-bit `kernel` rebuilds the float weight instead;
    None: never (bf16 on a CPU that emulates it, where the rebuilt weight's GEMM is slow too:
    on a 2-core AVX2 Zen 2, 1536 x 576, torch's int8 kernel 7.4 / 28 ms at 128 / 512 rows
    against 38 / 142 ms rebuilding, int4 31 against 106 ms at 512)."""
    if dtype == torch.bfloat16 and not _NATIVE_BF16:
        return None
    return _KERNEL_MAX_TOKENS[kernel] if dtype in _VECTORISED_DTYPES else 1


class Projection(nn.Module):
    """A linear map; subclasses differ in how the weight is stored and multiplied."""

    kernel = "none"

    def __init__(self, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def describe(self) -> str:
        """The kernel and its layout, for the load-time log."""
        return self.kernel

    def prepack(self, packing: Packing) -> None:
        """Reorder the weight for the kernel `packing` names (float weights only)."""

    def max_kernel_tokens(self, dtype: torch.dtype) -> int | None:
        """The largest batch (tokens) the kernel takes before another path does, if any:
        a compiled graph splits there (`serving.models.compiled`)."""
        return None

    def _add_bias(self, output: torch.Tensor) -> torch.Tensor:
        return output if self.bias is None else output + self.bias


class FloatProjection(Projection):
    """A float weight `[N, K]`, uninitialised until the loader fills it."""

    kernel = "float"

    def __init__(self, out_features: int, in_features: int, *, bias: bool,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__(torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device),
            requires_grad=False,
        )
        self.packing = Packing.NONE
        self.packed: torch.Tensor | None = None

    def describe(self) -> str:
        if self.packing is Packing.KERNEL:
            layout = torch.ops.quiver.packed_linear_layout(self.weight)
            return {"tiles": "quiver tiles (quiver op)",
                    "panels": "quiver bf16 panels (quiver op)",
                    "onednn": "onednn (prepacked, quiver op)"}.get(layout, "F.linear (quiver op)")
        return {Packing.NONE: "F.linear", Packing.EAGER: "onednn (prepacked)"}[self.packing]

    def prepack(self, packing: Packing) -> None:
        self.packing = effective_packing(self.weight, packing)
        self.packed = prepack(self.weight, self.packing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, packing=self.packing, packed=self.packed)


class Int8Projection(Projection):
    """`torch._weight_int8pack_mm` per group: int8 values `[num_groups, N, group]`."""

    kernel = "int8pack_mm"

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None,
                 dtype: torch.dtype) -> None:
        super().__init__(bias)
        num_rows, self.in_features = weight.shape
        self.group_size = weight.effective_group_size
        self.num_groups = weight.scale.shape[1]
        self.padded_features = self.num_groups * self.group_size
        values = F.pad(weight.values, (0, self.padded_features - self.in_features))
        grouped = values.view(num_rows, self.num_groups, self.group_size).transpose(0, 1)
        self.register_buffer("values", grouped.contiguous())
        self.register_buffer("scales", weight.scale.t().contiguous().to(dtype))  # [G, N]
        zero_scales = None
        if weight.zero_point is not None:  # (q - zp) * s = q * s - zp * s, in float32
            zero_scales = weight.zero_point.float() * weight.scale.float()
        self.register_buffer("zero_scales", zero_scales)  # [N, G]
        self.register_buffer("kernel_scale", None)  # float32 [N] where quiver::int8_linear runs

    def describe(self) -> str:
        zero = ", zero-point correction" if self.zero_scales is not None else ""
        groups = "per channel" if self.num_groups == 1 else f"group {self.group_size}"
        return f"{self.kernel} ({groups}{zero})"

    def prepack(self, packing: Packing) -> None:
        """Pack a symmetric per-channel weight of a bf16 or float32 model for
        `quiver::int8_linear` (the C++ library's kernel): tiles of 16 output columns, each
        input-feature pair's 32 values together (`[N/16, K/2, 32]`, which replaces `values`).
        Anything else, or a CPU the kernel refuses for the model's dtype, keeps torch's
        kernel."""
        num_rows = self.values.shape[1]
        if (packing is not Packing.KERNEL or self.kernel_scale is not None
                or self.num_groups != 1 or self.zero_scales is not None
                or self.padded_features != self.in_features  # one group wider than K
                or not lowbit_kernels_run(self.scales.dtype)):  # this dtype on this CPU
            return
        if num_rows % 16 or self.in_features % 2:
            # `model_dtype` chose the dtype by scheme; shapes like this are rare (and slow
            # in float32, where torch's kernel is a scalar loop)
            logger.warning("an int8 weight [%d, %d] keeps torch's kernel: Quiver's takes "
                           "N %% 16 == 0 and even K", num_rows, self.in_features)
            return
        self.values = int8_tiles(self.values[0])
        self.kernel_scale = self.scales[0].float()
        self.kernel = "quiver_int8"

    def max_kernel_tokens(self, dtype: torch.dtype) -> int | None:
        # Quiver's kernel takes every batch (past 16 rows through the tile kernel's blocks:
        # 0.92-1.03x oneDNN bf16's time at 512-2048 rows); rebuilding the bf16 weight per
        # call would split the compiled graph, and that path's compiled and eager answers
        # drifted apart (0.16-0.34 relative error at start).
        return None if self.kernel_scale is not None else kernel_max_tokens(self.kernel, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_scale is not None:
            return torch.ops.quiver.int8_linear(x, self.values, self.kernel_scale, self.bias)
        if self.padded_features != self.in_features:
            x = F.pad(x, (0, self.padded_features - self.in_features))
        limit = kernel_max_tokens(self.kernel, x.dtype)
        if limit is not None and x.shape[0] > limit:
            return F.linear(x, self.dequantized(x.dtype), self.bias)
        if self.num_groups == 1:
            output = torch._weight_int8pack_mm(x, self.values[0], self.scales[0])
        else:
            chunks = x.view(-1, self.num_groups, self.group_size).transpose(0, 1).contiguous()
            output = torch._weight_int8pack_mm(chunks[0], self.values[0], self.scales[0])
            for group in range(1, self.num_groups):
                output += torch._weight_int8pack_mm(
                    chunks[group], self.values[group], self.scales[group]
                )
        if self.zero_scales is not None:
            group_sums = x.view(-1, self.num_groups, self.group_size).float().sum(-1)
            output -= F.linear(group_sums, self.zero_scales).to(output.dtype)
        return self._add_bias(output)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight `[N, K']`, rebuilt for one call (prefill-sized batches)."""
        values = self.values if self.kernel_scale is None else int8_untiled(self.values)[None]
        weight = values.float() * self.scales.float().unsqueeze(-1)  # [G, N, group]
        if self.zero_scales is not None:
            weight -= self.zero_scales.t().unsqueeze(-1)
        return weight.transpose(0, 1).reshape(-1, self.padded_features).to(dtype)


def int4_kernel_group_size(weight: QuantizedTensor | WeightQuantArgs) -> int | None:
    """The int4 kernel's group size for `weight` (or weights quantized as it says), or None
    where that kernel can't run it."""
    if weight.num_bits != 4:
        return None
    if weight.group_size is None:
        return INT4_KERNEL_GROUP_SIZES[1]
    return next(
        (size for size in INT4_KERNEL_GROUP_SIZES if weight.group_size % size == 0), None
    )


def quiver_kernel_takes(args: WeightQuantArgs) -> bool:
    """Whether Quiver's own low-bit CPU kernels take weights quantized as `args` (on a CPU
    they are built for, shapes permitting): symmetric per-channel int8, or int4 in a group
    the int4 kernel runs where torch's int4 packing is one `unpack_int4` reads."""
    if args.num_bits == 8:
        return args.symmetric and args.group_size is None
    return int4_kernel_group_size(args) is not None and int4_row_block() is not None


class Int4Projection(Projection):
    """`torch._weight_int4pack_mm_for_cpu` over a weight packed at load (uint8 `[N', K'/2]`),
    or, once `prepack` repacked it (bf16 models on AVX512-BF16, float32 ones on AVX2),
    `quiver::int4_linear` over uint8 `[N'/16, K'/2, 16]` tiles."""

    kernel = "int4pack_mm"

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None,
                 dtype: torch.dtype) -> None:
        super().__init__(bias)
        group_size = int4_kernel_group_size(weight)
        if group_size is None:
            raise ValueError(f"the int4 kernel cannot run a {weight.num_bits}-bit weight "
                             f"with group size {weight.group_size}")
        self.out_features, self.in_features = weight.shape
        self.group_size = group_size
        source_group = weight.group_size or group_size
        self.padded_features = math.ceil(self.in_features / source_group) * source_group
        row_multiple = INT4_KERNEL_ROW_BLOCK
        self.padded_rows = math.ceil(self.out_features / row_multiple) * row_multiple
        pad_rows = self.padded_rows - self.out_features
        unsigned = F.pad(
            (weight.values + INT4_OFFSET).to(torch.int32),
            (0, self.padded_features - self.in_features, 0, pad_rows),
            value=INT4_OFFSET,
        )
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(unsigned, 1))
        # probed here, not in forward: the probe makes a torch.Generator, which a compiled
        # graph cannot trace (the whole model would run eagerly)
        self.row_block = int4_row_block()
        self.row_blocked = self.row_block is not None
        self.register_buffer("scales_and_zeros", _scales_and_zeros(
            weight, group_size, self.padded_features, pad_rows
        ).to(dtype))
        # set where quiver::int4_linear runs (prepack): float32 [K' / group, N'] each
        self.register_buffer("kernel_scale", None)
        self.register_buffer("kernel_offset", None)

    def describe(self) -> str:
        padding = ""
        if self.padded_features != self.in_features or self.padded_rows != self.out_features:
            padding = (f", padded [{self.out_features}, {self.in_features}] -> "
                       f"[{self.padded_rows}, {self.padded_features}]")
        return f"{self.kernel} (group {self.group_size}{padding})"

    def prepack(self, packing: Packing) -> None:
        """Repack a bf16 or float32 model's weight for `quiver::int4_linear` (the C++
        library's kernel): tiles of 16 output columns, each input-feature pair's 16 bytes
        together (low nibble feature 2p, high 2p + 1), `[N'/16, K'/2, 16]`, replacing torch's
        packing; scale and zero become float32 (w = u * scale + offset). fp16 models, a CPU
        the kernel refuses for the model's dtype (bf16: no AVX512-BF16; float32: no AVX2 and
        FMA) or a torch whose layout is unknown keep torch's kernel; once repacked, a later
        `prepack` leaves the kernel as it is."""
        if (packing is not Packing.KERNEL or self.kernel_scale is not None
                or not self.row_blocked or not lowbit_kernels_run(self.scales_and_zeros.dtype)):
            return
        scale, zero = self.scales_and_zeros.float().unbind(-1)  # [K' / group, N']
        self.kernel_scale = scale.contiguous()
        self.kernel_offset = (zero - INT4_OFFSET * scale).contiguous()
        self.packed = int4_tiles(unpack_int4(self.packed, self.padded_rows,
                                             self.padded_features, self.row_block))
        self.kernel = "quiver_int4"

    def max_kernel_tokens(self, dtype: torch.dtype) -> int | None:
        # Past torch's break-even (256 rows in bf16) either kernel gives way to oneDNN on the
        # rebuilt weight: with Quiver's for every row, a 32-request run of 32-token answers
        # (mostly prefill) made 215-224 tok/s against 244-248 this way (wide blocks
        # included). Quiver's float32 kernel takes every row: at 512 rows 1.1-1.2x oneDNN's
        # float32 time on SmolLM2's shapes, where a rebuild costs ~3 ms a weight before its
        # GEMM even starts.
        if not self.row_blocked or (self.kernel_scale is not None and dtype == torch.float32):
            return None
        return kernel_max_tokens("int4pack_mm", dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padded_features != self.in_features:
            x = F.pad(x, (0, self.padded_features - self.in_features))
        limit = self.max_kernel_tokens(x.dtype)
        if limit is not None and x.shape[0] > limit:
            output = F.linear(x, self.dequantized(x.dtype))
        elif self.kernel_scale is not None:
            output = torch.ops.quiver.int4_linear(x, self.packed, self.group_size,
                                                  self.kernel_scale, self.kernel_offset)
        else:
            output = torch._weight_int4pack_mm_for_cpu(
                x.contiguous(), self.packed, self.group_size, self.scales_and_zeros
            )
        if self.padded_rows != self.out_features:
            output = output[:, : self.out_features]
        return self._add_bias(output)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight `[N', K']` from whichever packing holds it (torch's: see
        `unpack_int4`; Quiver's tiles after `prepack`)."""
        unsigned = (int4_untiled(self.packed) if self.kernel_scale is not None
                    else unpack_int4(self.packed, self.padded_rows, self.padded_features,
                                     self.row_block))
        scale, zero = self.scales_and_zeros.float().unbind(-1)  # [K' / group, N']
        scale = scale.t().repeat_interleave(self.group_size, dim=1)
        zero = zero.t().repeat_interleave(self.group_size, dim=1)
        return ((unsigned.float() - INT4_OFFSET) * scale + zero).to(dtype)


def unpack_int4(packed: torch.Tensor, num_rows: int, num_cols: int,
                row_block: int | None = None) -> torch.Tensor:
    """Unsigned values `[N, K]` of `_convert_weight_to_int4pack_for_cpu`'s layout for N a
    multiple of 64: per block of `row_block` rows (this CPU's, `int4_row_block`, by default),
    `[K, row_block / 2]` bytes whose low nibbles are the block's first half of rows and high
    nibbles its second half."""
    row_block = row_block or int4_row_block()
    if row_block is None:
        raise ValueError("this torch build packs int4 in a layout unpack_int4 does not know")
    blocks = packed.view(num_rows // row_block, num_cols, row_block // 2)
    unsigned = torch.cat([blocks & 0xF, blocks >> 4], dim=-1)  # [N / block, K, block]
    return unsigned.transpose(1, 2).reshape(num_rows, num_cols)


@functools.cache
def int4_row_block() -> int | None:
    """The rows per block in which this torch build, on this CPU, packs int4 as
    `unpack_int4` reads it, or None where no known layout matches (then no dequant path)."""
    probe = torch.randint(0, 16, (2 * INT4_KERNEL_ROW_BLOCK, 64), dtype=torch.int32,
                          generator=torch.Generator().manual_seed(0))
    packed = torch._convert_weight_to_int4pack_for_cpu(probe, 1)
    for row_block in _INT4_ROW_BLOCKS:
        if torch.equal(unpack_int4(packed, *probe.shape, row_block).to(torch.int32), probe):
            return row_block
    return None


def _scales_and_zeros(weight: QuantizedTensor, group_size: int, padded_features: int,
                      pad_rows: int) -> torch.Tensor:
    """`[K' / group, N', 2]` float32: the kernel's (scale, zero) per group and row."""
    scale = weight.scale.float()
    zero = torch.zeros_like(scale)
    if weight.zero_point is not None:
        zero = -weight.zero_point.float() * scale
    num_groups = padded_features // group_size
    if weight.group_size is None:  # one scale per row, repeated over every kernel group
        scale, zero = scale.expand(-1, num_groups), zero.expand(-1, num_groups)
    else:  # each source group split into kernel-sized groups
        repeats = weight.group_size // group_size
        scale, zero = scale.repeat_interleave(repeats, 1), zero.repeat_interleave(repeats, 1)
    scale = F.pad(scale, (0, 0, 0, pad_rows), value=1.0)
    zero = F.pad(zero, (0, 0, 0, pad_rows))
    return torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()


class DequantProjection(Projection):
    """Integer values kept as int8; the float weight is rebuilt on every call."""

    kernel = "dequantize-per-call"

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None) -> None:
        super().__init__(bias)
        self.num_bits = weight.num_bits
        self.group_size = weight.group_size
        self.register_buffer("values", weight.values)
        self.register_buffer("scale", weight.scale)
        self.register_buffer("zero_point", weight.zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = QuantizedTensor(
            self.values, self.scale, self.zero_point, self.num_bits, self.group_size
        )
        return F.linear(x, dequantize(weight, x.dtype), self.bias)


def make_projection(weight: QuantizedTensor, bias: torch.Tensor | None, *,
                    dtype: torch.dtype, device: torch.device) -> Projection:
    """The fastest real low-bit kernel for `weight` on `device` (see the module doc)."""
    bias = None if bias is None else bias.to(dtype=dtype, device=device)
    if device.type != "cpu":
        weight = QuantizedTensor(  # scales stay float32: dequantize computes in float32
            weight.values.to(device), weight.scale.to(device=device, dtype=torch.float32),
            None if weight.zero_point is None else weight.zero_point.to(device),
            weight.num_bits, weight.group_size,
        )
        return DequantProjection(weight, bias)
    if int4_kernel_group_size(weight) is not None:
        return Int4Projection(weight, bias, dtype)
    return Int8Projection(weight, bias, dtype)
