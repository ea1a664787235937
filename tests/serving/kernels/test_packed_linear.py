"""`quiver::linear` (Quiver's tile and panel kernels or oneDNN on a weight laid out once)
and the library's build fallback."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from serving.kernels.build import builds_panel_kernel, load_cpu_kernels
from serving.kernels.ops import lowbit_kernels_run
from serving.models.linear import onednn_supports
from serving.models.quant import int4_tiles, int8_tiles

pytestmark = pytest.mark.isa  # against torch references: run under lower ISAs (make test-isa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [1, 7, 64])
def test_packed_linear_matches_f_linear(cpp_kernels, dtype, num_rows) -> None:
    generator = torch.Generator().manual_seed(num_rows)
    weight = torch.randn(96, 80, generator=generator).to(dtype)
    bias = torch.randn(96, generator=generator).to(dtype)
    x = torch.randn(num_rows, 80, generator=generator).to(dtype)
    tiles = dtype == torch.bfloat16 and lowbit_kernels_run()  # 96 x 80 suits the tiles
    if tiles or onednn_supports(torch.device("cpu"), dtype):
        torch.ops.quiver.pack_linear_weight(weight, 1)
    else:  # oneDNN cannot reorder bf16 on this ISA: the model never packs; no twin = at::linear
        with pytest.raises(RuntimeError, match="bf16 path needs"):
            torch.ops.quiver.pack_linear_weight(weight, 1)
    expected = F.linear(x.float(), weight.float(), bias.float())
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    for b in (bias, None):
        output = torch.ops.quiver.linear(x, weight, b)
        reference = expected if b is not None else expected - bias.float()
        torch.testing.assert_close(output.float(), reference, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("in_features", [80, 81, 576, 1000])
@pytest.mark.parametrize("leading", [(1,), (2,), (1, 2)])
def test_a_few_bf16_rows_round_the_exact_product_once(cpp_kernels, in_features,
                                                      leading) -> None:
    """One or two rows (a small decode step) take skinny_linear.cpp's kernel on the plain
    weight: float32 sums rounded to bf16 once, so every output is the exact product's bf16
    rounding, or its neighbour where float32's order of additions tips it — whatever the
    row length (whole 32-value chunks, a masked tail) and with or without a bias."""
    generator = torch.Generator().manual_seed(in_features)
    weight = torch.randn(136, in_features, generator=generator).bfloat16()
    bias = torch.randn(136, generator=generator).bfloat16()
    x = torch.randn(*leading, in_features, generator=generator).bfloat16()
    for b in (bias, None):
        exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
        output = torch.ops.quiver.linear(x, weight, b)
        assert output.shape == (*leading, 136) and output.dtype == torch.bfloat16
        one_ulp = exact.abs().clamp_min(1e-3) * 2.0**-7  # bf16 keeps 8 significant bits
        assert ((output.double() - exact).abs() <= one_ulp).all()
        assert (output.double() - exact).abs().mean() < (one_ulp / 4).mean()


def test_the_skinny_kernel_can_be_switched_off_and_back(cpp_kernels) -> None:
    """`set_skinny_max_rows(0)` sends one-row calls to oneDNN (the engine A/B's switch): the
    same products within bf16 rounding, and the limit it returns puts the kernel back."""
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(200, 576, generator=generator).bfloat16()
    x = torch.randn(1, 576, generator=generator).bfloat16()
    skinny = torch.ops.quiver.linear(x, weight, None)
    previous = torch.ops.quiver.set_skinny_max_rows(0)
    try:
        assert previous == 2
        onednn = torch.ops.quiver.linear(x, weight, None)
    finally:
        assert torch.ops.quiver.set_skinny_max_rows(previous) == 0
    torch.testing.assert_close(onednn.float(), skinny.float(), atol=2e-2, rtol=2**-7)
    with pytest.raises(RuntimeError, match="takes 0 to 2 rows, not 3"):
        torch.ops.quiver.set_skinny_max_rows(3)


def _one_ulp_of_exact(output: torch.Tensor, exact: torch.Tensor) -> None:
    """Every bf16 output within one unit in the last place of the exact product (two where
    float32 sums of over a thousand terms cancel), and most far closer."""
    one_ulp = exact.abs().clamp_min(1e-3) * 2.0**-7  # bf16 keeps 8 significant bits
    error = (output.double() - exact).abs()
    assert (error <= 2 * one_ulp).all() and (error <= one_ulp).float().mean() > 0.999
    assert error.mean() < (one_ulp / 4).mean()


def _tiles_or_skip() -> None:
    if not lowbit_kernels_run():
        pytest.skip("the tile kernel is built for AVX512-BF16 CPUs only; this one lacks it")


@pytest.mark.parametrize("shape", [(64, 80), (960, 576), (576, 1536)])
@pytest.mark.parametrize("leading", [(3,), (8,), (15,), (33,), (300,), (2, 9)])
def test_tile_kernel_rounds_the_exact_product_once(cpp_kernels, shape, leading) -> None:
    """From three rows up a bf16 weight packed into tiles takes tile_linear.h's kernel: every
    row block (8, 4, 2, 1), a second chunk of rows (past 256), 3-D and non-contiguous x, with
    and without a bias — float32 sums rounded to bf16 once, as accurate as oneDNN."""
    _tiles_or_skip()
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(out_features + sum(leading))
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    bias = torch.randn(out_features, generator=generator).bfloat16()
    wide = torch.randn(*leading, 2 * in_features, generator=generator).bfloat16()
    x = wide[..., ::2]  # non-contiguous rows
    torch.ops.quiver.pack_linear_weight(weight, 1)
    assert torch.ops.quiver.packed_linear_layout(weight) == "tiles"
    for b in (bias, None):
        exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
        output = torch.ops.quiver.linear(x, weight, b)
        assert output.shape == (*leading, out_features) and output.dtype == torch.bfloat16
        _one_ulp_of_exact(output, exact)


def test_tile_kernel_answers_a_row_alike_in_any_batch(cpp_kernels) -> None:
    """From three rows up a row's outputs are bit for bit the same whichever rows share its
    call (one or two rows take the skinny kernel, whose order of additions differs)."""
    _tiles_or_skip()
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(192, 576, generator=generator).bfloat16()
    x = torch.randn(40, 576, generator=generator).bfloat16()
    torch.ops.quiver.pack_linear_weight(weight, 1)
    assert torch.ops.quiver.packed_linear_layout(weight) == "tiles"
    whole = torch.ops.quiver.linear(x, weight, None)
    for first, rows in [(0, 3), (5, 8), (7, 13), (17, 23)]:
        part = torch.ops.quiver.linear(x[first:first + rows], weight, None)
        assert torch.equal(part, whole[first:first + rows]), (first, rows)


@pytest.mark.parametrize("shape", [(136, 80), (96, 81)])
def test_shapes_the_tiles_refuse_keep_onednn(cpp_kernels, shape) -> None:
    """Output columns not a multiple of 32, or an odd row length: the weight packs for
    oneDNN (or, where oneDNN has no bf16, not at all) and the product is still right."""
    generator = torch.Generator().manual_seed(sum(shape))
    weight = torch.randn(*shape, generator=generator).bfloat16()
    x = torch.randn(5, shape[1], generator=generator).bfloat16()
    if onednn_supports(torch.device("cpu"), torch.bfloat16):
        torch.ops.quiver.pack_linear_weight(weight, 1)
        assert torch.ops.quiver.packed_linear_layout(weight) == "onednn"
    else:
        with pytest.raises(RuntimeError, match="bf16 path needs"):
            torch.ops.quiver.pack_linear_weight(weight, 1)
    _one_ulp_of_exact(torch.ops.quiver.linear(x, weight, None),
                      F.linear(x.double(), weight.double()))


def test_tiles_can_be_switched_off_for_later_packs(cpp_kernels) -> None:
    """`set_linear_tiles(False)` (the engine A/B's switch) packs later weights for oneDNN:
    where oneDNN has no bf16 path that pack refuses, as it would without tiles; the setting
    it returns puts the tiles back."""
    _tiles_or_skip()
    generator = torch.Generator().manual_seed(11)
    weight = torch.randn(64, 576, generator=generator).bfloat16()
    x = torch.randn(9, 576, generator=generator).bfloat16()
    previous = torch.ops.quiver.set_linear_tiles(False)
    try:
        assert previous is True
        if onednn_supports(torch.device("cpu"), torch.bfloat16):
            torch.ops.quiver.pack_linear_weight(weight, 1)
            assert torch.ops.quiver.packed_linear_layout(weight) == "onednn"
            onednn = torch.ops.quiver.linear(x, weight, None)
        else:
            with pytest.raises(RuntimeError, match="bf16 path needs"):
                torch.ops.quiver.pack_linear_weight(weight, 1)
            onednn = F.linear(x, weight)
    finally:
        assert torch.ops.quiver.set_linear_tiles(previous) is False
    torch.ops.quiver.pack_linear_weight(weight, 1)  # tiles again: replaces the twin
    assert torch.ops.quiver.packed_linear_layout(weight) == "tiles"
    tiles = torch.ops.quiver.linear(x, weight, None)
    torch.testing.assert_close(tiles.float(), onednn.float(), atol=2e-2, rtol=2**-7)


def _panels_or_skip() -> None:
    if not builds_panel_kernel():
        pytest.skip("the panel kernel is built for targets with AVX2 + FMA but not AVX-512 "
                    "(where --dtype auto runs bf16); this library's target (this CPU, or "
                    "QUIVER_KERNEL_MARCH) is not one")


def _bf16_valued(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """float32 values that are all bf16 numbers: a bf16 checkpoint upcast to float32."""
    return torch.randn(*shape, generator=generator).bfloat16().float()


@pytest.mark.parametrize("shape", [(16, 80), (960, 576), (576, 1536), (48, 7)])
@pytest.mark.parametrize("leading", [(1,), (2,), (3,), (5,), (8,), (13,), (70,), (2, 9)])
def test_panel_kernel_is_the_float32_product_of_bf16_weights(cpp_kernels, shape,
                                                              leading) -> None:
    """A float32 weight of bf16 values (a bf16 checkpoint served in float32) packs into bf16
    panels and panel_linear.h's kernel multiplies float32 rows by it: every row block (6 down
    to 1 rows; one and two rows with split sums), a second chunk of rows (past 64), an odd
    row length, 3-D and non-contiguous x, with and without a bias — the float32 product, as
    accurate as float32 sums can be."""
    _panels_or_skip()
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(out_features + in_features + sum(leading))
    weight = _bf16_valued(out_features, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator)
    x = torch.randn(*leading, 2 * in_features, generator=generator)[..., ::2]  # non-contiguous
    torch.ops.quiver.pack_linear_weight(weight, 1)
    assert torch.ops.quiver.packed_linear_layout(weight) == "panels"
    for b in (bias, None):
        exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
        output = torch.ops.quiver.linear(x, weight, b)
        assert output.shape == (*leading, out_features) and output.dtype == torch.float32
        # float32 sums of K products: error ~ K * 2^-24 of the terms' magnitudes
        scale = F.linear(x.double().abs(), weight.double().abs()).clamp_min(1e-3)
        assert ((output.double() - exact).abs() <= scale * in_features * 2.0**-23).all()


def test_panel_kernel_answers_a_row_alike_in_any_block(cpp_kernels) -> None:
    """From three rows up a row's sums run in one chain per column in feature order: a
    row's outputs are the same whichever block of rows (6 down to 1), or chunk of 64, it is
    in."""
    _panels_or_skip()
    generator = torch.Generator().manual_seed(5)
    weight = _bf16_valued(64, 576, generator=generator)
    x = torch.randn(40, 576, generator=generator)
    torch.ops.quiver.pack_linear_weight(weight, 1)
    whole = torch.ops.quiver.linear(x, weight, None)
    for first, rows in [(0, 3), (5, 4), (7, 13), (17, 23), (1, 5), (3, 6), (2, 32)]:
        part = torch.ops.quiver.linear(x[first:first + rows], weight, None)
        assert torch.equal(part, whole[first:first + rows]), (first, rows)
    # 66 rows: a second chunk of two rows keeps the one-chain sums of a longer call
    longer = torch.randn(66, 576, generator=generator)
    assert torch.equal(torch.ops.quiver.linear(longer, weight, None)[64:],
                       torch.ops.quiver.linear(longer[60:], weight, None)[4:])


@pytest.mark.parametrize("case", ["not bf16 values", "columns not a multiple of 16"])
def test_weights_the_panels_refuse_keep_onednn(cpp_kernels, case) -> None:
    """A float32 weight with any value a bf16 cannot hold (a float32 checkpoint: halving it
    would change the model), or whose columns do not fill panels, packs for oneDNN."""
    generator = torch.Generator().manual_seed(13)
    if case == "not bf16 values":
        weight = _bf16_valued(64, 80, generator=generator)
        weight[3, 5] += 2.0**-20  # one value off the bf16 grid
    else:
        weight = _bf16_valued(72, 80, generator=generator)
    x = torch.randn(3, 80, generator=generator)
    torch.ops.quiver.pack_linear_weight(weight, 1)
    assert torch.ops.quiver.packed_linear_layout(weight) == "onednn"
    torch.testing.assert_close(torch.ops.quiver.linear(x, weight, None), F.linear(x, weight),
                               atol=1e-5, rtol=1e-5)


def test_panels_can_be_switched_off_for_later_packs(cpp_kernels) -> None:
    """`set_linear_tiles(False)` (the engine A/B's switch) packs a bf16-valued float32 weight
    for oneDNN too; the setting it returns brings the panels back."""
    _panels_or_skip()
    generator = torch.Generator().manual_seed(17)
    weight = _bf16_valued(48, 576, generator=generator)
    previous = torch.ops.quiver.set_linear_tiles(False)
    try:
        torch.ops.quiver.pack_linear_weight(weight, 1)
        assert torch.ops.quiver.packed_linear_layout(weight) == "onednn"
    finally:
        torch.ops.quiver.set_linear_tiles(previous)
    torch.ops.quiver.pack_linear_weight(weight, 1)
    assert torch.ops.quiver.packed_linear_layout(weight) == "panels"


LOWBIT_REFUSALS = {torch.bfloat16: "needs a CPU with AVX512-BF16",
                   torch.float32: "needs a CPU with AVX2 and FMA"}


def close_to_exact(output: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor,
                   terms: int) -> bool:
    """bf16 output: within one bf16 ulp of the exact product (float32 sums rounded once).
    float32: within float32 summation's bound, `terms` roundings of the sum of |products|
    (`magnitude`) — the order of the sums is the kernel's, so no tighter bound holds."""
    if output.dtype == torch.bfloat16:
        return bool(((output.double() - exact).abs() <= exact.abs().clamp_min(1e-2) * 2.0**-7)
                    .all())
    return bool(((output.double() - exact).abs() <= (terms + 2) * 2.0**-24 * magnitude).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("in_features", [64, 176, 578])
@pytest.mark.parametrize("leading", [(1,), (2,), (3,), (5,), (6,), (12,), (15,), (31,), (37,),
                                     (300,), (2, 8)])
def test_int8_linear_is_the_scaled_integer_product(cpp_kernels, in_features, leading,
                                                   dtype) -> None:
    """Per-channel int8 weights: (x @ q^T) * scale + bias for any row count and any even row
    length. bf16 rows: float32 sums rounded to bf16 once (blocks of 16, 8, 4, 2 and 1 rows;
    past 16, pairs of tiles widened into the bf16 tile kernel's blocks, in chunks of 256
    rows, the odd third tile of the 48 columns on its own). float32 rows: one or two rows
    alone, blocks of up to 4 from the packing, past 5 rows a chunk's tile widened into a
    float32 panel (while 5 rows read it, or first) and blocks of up to 6 from it, chunks of
    256."""
    generator = torch.Generator().manual_seed(in_features + len(leading))
    values = torch.randint(-127, 128, (48, in_features), dtype=torch.int8, generator=generator)
    scale = torch.rand(48, generator=generator) * 0.02
    bias = torch.randn(48, generator=generator).to(dtype)
    x = torch.randn(*leading, in_features, generator=generator).to(dtype)
    if not lowbit_kernels_run(dtype):
        with pytest.raises(RuntimeError, match=LOWBIT_REFUSALS[dtype]):
            torch.ops.quiver.int8_linear(x, int8_tiles(values), scale, bias)
        return
    for b in (bias, None):
        exact = (x.double() @ values.double().t()) * scale.double()
        magnitude = (x.double().abs() @ values.double().abs().t()) * scale.double()
        if b is not None:
            exact, magnitude = exact + b.double(), magnitude + b.double().abs()
        output = torch.ops.quiver.int8_linear(x, int8_tiles(values), scale, b)
        assert output.shape == (*leading, 48) and output.dtype == dtype
        assert close_to_exact(output, exact, magnitude, in_features)
    with pytest.raises(RuntimeError, match="x must be bf16 or float32"):
        torch.ops.quiver.int8_linear(x.half(), int8_tiles(values), scale, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        torch.ops.quiver.int8_linear(x, int8_tiles(values), scale, bias.half())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("leading", [(1,), (2,), (3,), (5,), (7,), (8,), (9,), (11,), (15,),
                                     (17,), (37,), (300,), (2, 8)])
def test_int4_linear_applies_group_scales_and_offsets_exactly(cpp_kernels, group_size,
                                                             leading, dtype) -> None:
    """Grouped int4 with zero points, w = u * scale + offset per group and column, for every
    row block. bf16 rows: float32 sums rounded to bf16 once (8, 4, 2, 1 rows; past 16 rows,
    pairs of tiles widened into blocks of 32 columns, 4, 2 and 1 rows at a time, in chunks
    of 256 rows, the odd third tile of the 48 columns on its own). float32 rows: one or two
    alone summing x . u per group, scaled after; from three rows up every weight dequantized
    as it is read (one rounding) in blocks of up to 4 from the packing, past 8 rows a chunk's
    tile dequantized into a float32 panel (while 3 rows read it, or first) and blocks of up
    to 6 from it, chunks of 64 to 256 rows (about 1 MiB of x)."""
    generator = torch.Generator().manual_seed(group_size + len(leading))
    in_features = group_size * (3 if group_size < 256 else 2)
    unsigned = torch.randint(0, 16, (48, in_features), generator=generator)
    groups = in_features // group_size
    scale = torch.rand(groups, 48, generator=generator) * 0.02
    offset = torch.randn(groups, 48, generator=generator) * 0.02
    x = torch.randn(*leading, in_features, generator=generator).to(dtype)
    if not lowbit_kernels_run(dtype):
        with pytest.raises(RuntimeError, match=LOWBIT_REFUSALS[dtype]):
            torch.ops.quiver.int4_linear(x, int4_tiles(unsigned), group_size, scale, offset)
        return
    per_column = lambda t: t.double().t().repeat_interleave(group_size, 1)  # noqa: E731
    weight = unsigned.double() * per_column(scale) + per_column(offset)
    exact = x.double() @ weight.t()
    # bf16 rows and one or two float32 rows sum x . u per group, then scale; more float32
    # rows dequantize each weight first: either way each term is bounded by this
    magnitude = (x.double().abs() @ (unsigned.double() * per_column(scale).abs()
                                     + per_column(offset).abs()).t())
    output = torch.ops.quiver.int4_linear(x, int4_tiles(unsigned), group_size, scale, offset)
    assert output.shape == (*leading, 48) and output.dtype == dtype
    assert close_to_exact(output, exact, magnitude, in_features)
    with pytest.raises(RuntimeError, match="group size must be even and divide"):
        torch.ops.quiver.int4_linear(x, int4_tiles(unsigned), 33, scale, offset)


@pytest.mark.parametrize("in_features", [128, 2048])
def test_float32_lowbit_rows_do_not_depend_on_their_call(cpp_kernels, in_features) -> None:
    """From three rows up, a float32 row's int8 or int4 product is the same bits whichever
    rows share its call: read from the packing (few rows), by the block that widens it into
    a float32 panel or from that panel (more; 12 and 18 rows widen it first), in a later
    chunk (256 rows at K = 128, 128 at K = 2,048; 257 rows leave a chunk of one) — the
    seeded-sampling guarantee the bf16 panels also keep."""
    if not lowbit_kernels_run(torch.float32):
        pytest.skip("float32 low-bit kernels need AVX2 and FMA; this CPU lacks them")
    generator = torch.Generator().manual_seed(3)
    groups = in_features // 64
    values = torch.randint(-127, 128, (32, in_features), dtype=torch.int8, generator=generator)
    unsigned = torch.randint(0, 16, (32, in_features), generator=generator)
    scale8 = torch.rand(32, generator=generator)
    scale4 = torch.rand(groups, 32, generator=generator)
    offset4 = torch.randn(groups, 32, generator=generator)
    x = torch.randn(270, in_features, generator=generator)
    kernels = [lambda rows: torch.ops.quiver.int8_linear(rows, int8_tiles(values), scale8, None),
               lambda rows: torch.ops.quiver.int4_linear(rows, int4_tiles(unsigned), 64, scale4,
                                                         offset4)]
    for kernel in kernels:
        whole = kernel(x)
        for first, count in [(0, 3), (0, 4), (1, 5), (0, 6), (2, 8), (0, 9), (10, 17),
                             (0, 12), (6, 18), (0, 20), (64, 6), (120, 20), (256, 6),
                             (250, 20), (0, 257)]:
            assert torch.equal(kernel(x[first:first + count]), whole[first:first + count])


def test_unpacked_or_freed_weights_take_plain_linear(cpp_kernels) -> None:
    """A weight never packed, or one allocated where a packed (now freed) weight was,
    gets its own product, never a stale reordered twin."""
    x = torch.randn(4, 32)
    assert torch.equal(torch.ops.quiver.linear(x, (w := torch.randn(16, 32)), None),
                       F.linear(x, w))
    old = torch.randn(16, 32)
    torch.ops.quiver.pack_linear_weight(old, 1)
    address = old.data_ptr()
    del old
    gc.collect()
    for _ in range(20):  # the allocator usually hands the freed block straight back
        new = torch.randn(16, 32)
        torch.testing.assert_close(torch.ops.quiver.linear(x, new, None), F.linear(x, new))
        if new.data_ptr() == address:
            break


def test_missing_or_failing_compiler_is_a_reason_not_an_error(tmp_path: Path,
                                                              monkeypatch) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    missing = load_cpu_kernels(tmp_path / "a")
    assert missing.library is None and "no-such-compiler" in missing.reason
    failing = tmp_path / "failing-c++"
    failing.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'c++ 0' && exit 0\n"
                       "echo 'error: this compiler always fails' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CXX", str(failing))
    failed = load_cpu_kernels(tmp_path / "b")
    assert failed.library is None and "always fails" in failed.reason
    assert not list((tmp_path / "b").rglob("*.so")), "no half-built library is left behind"
