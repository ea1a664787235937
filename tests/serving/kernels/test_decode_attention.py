"""`quiver::paged_attention_decode`, the decodes-only attention op that CUDA graphs capture:
its any-device kernel and its Triton kernel against the reference op.

The op reads its sizes from shapes, so its block tables may be wider than any request
needs (a graph's tables are `max_model_len` wide): rows must read nothing past their length.
The Triton kernel runs here through Triton's interpreter on CPU tensors (in a subprocess:
the interpreter is chosen when the module is imported), and on a GPU when there is one.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from serving.kernels import DECODE_ATTENTION, REFERENCE_ATTENTION
from serving.kernels.metadata import pack_step_index, unpack_decode_index
from tests.serving.kernels.test_paged_attention import SHAPES, Step, make_step

SEQ_LENS = [40, 1, 300, 17, 129, 64]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def decode_step(shape: tuple[int, int, int, int], dtype: torch.dtype, *, extra_blocks: int,
                seed: int = 0) -> Step:
    """Decodes over scrambled blocks, each block table padded with `extra_blocks` blocks of
    NaN past what the request owns."""
    num_heads, num_kv_heads, head_dim, block_size = shape
    step = make_step(query_lens=[1] * len(SEQ_LENS), seq_lens=SEQ_LENS, num_heads=num_heads,
                     num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
                     dtype=dtype, seed=seed)
    if not extra_blocks:
        return step
    _, _, tables = unpack_decode_index(step.metadata, len(SEQ_LENS))
    poisoned = step.kv_cache.shape[1] // block_size
    kv_cache = torch.cat([step.kv_cache, torch.full(
        (2, extra_blocks * block_size, *step.kv_cache.shape[2:]), float("nan"), dtype=dtype)], 1)
    width = -(-max(SEQ_LENS) // block_size) + extra_blocks
    wide = [row[:-(-n // block_size)] + list(range(poisoned, poisoned + extra_blocks))
            for row, n in zip(tables.tolist(), SEQ_LENS, strict=True)]
    wide = [row + [poisoned] * (width - len(row)) for row in wide]
    metadata = pack_step_index(query_lens=[1] * len(SEQ_LENS), seq_lens=SEQ_LENS,
                               block_tables=wide, block_size=block_size)
    return Step(step.query, step.key, step.value, kv_cache, metadata, block_size, step.scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "h{}-kv{}-d{}-bs{}".format(*shape))
def test_any_device_kernel_matches_reference(shape, dtype) -> None:
    step = decode_step(shape, dtype, extra_blocks=0)
    output, cache = step.run(DECODE_ATTENTION)
    expected, expected_cache = step.run(REFERENCE_ATTENTION)
    assert torch.equal(cache, expected_cache)
    torch.testing.assert_close(output.float(), expected.float(), atol=TOLERANCE[dtype],
                               rtol=TOLERANCE[dtype])


def test_index_of_the_wrong_size_is_refused() -> None:
    step = decode_step(SHAPES[0], torch.float32, extra_blocks=0)
    with pytest.raises(ValueError, match="does not hold 5 decodes"):
        unpack_decode_index(step.metadata, 5)


TRITON_CHECK = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from serving.kernels import REFERENCE_ATTENTION
    from serving.kernels.triton_decode import paged_attention_decode
    from tests.serving.kernels.test_decode_attention import SHAPES, TOLERANCE, decode_step

    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            wide = decode_step(shape, dtype, extra_blocks=3, seed=1)
            cache = wide.kv_cache.clone()
            output = paged_attention_decode(wide.query, wide.key, wide.value, cache,
                                            wide.metadata, wide.block_size, wide.scale)
            narrow = decode_step(shape, dtype, extra_blocks=0, seed=1)
            expected, expected_cache = narrow.run(REFERENCE_ATTENTION)
            slots = expected_cache.shape[1]
            assert torch.equal(cache[:, :slots], expected_cache), (shape, dtype)
            torch.testing.assert_close(output.float(), expected.float(),
                                       atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype],
                                       msg=lambda m: f"{shape} {dtype}: {m}")
    print("ok")
""")


def test_triton_kernel_matches_reference_in_the_interpreter(repo_root) -> None:
    """Every shape and dtype, block tables wider than the requests' with NaN blocks past
    their ends (which a read past a request's length would spread into its output)."""
    pytest.importorskip("triton", reason="Triton is not installed (it comes with torch)")
    result = subprocess.run([sys.executable, "-c", TRITON_CHECK], cwd=repo_root,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "h{}-kv{}-d{}-bs{}".format(*shape))
def test_triton_kernel_on_cuda_matches_reference(shape, dtype) -> None:
    from serving.kernels import triton_decode

    triton_decode.register()
    wide = decode_step(shape, dtype, extra_blocks=3, seed=2)
    cache = wide.kv_cache.cuda()
    output = DECODE_ATTENTION.op(wide.query.cuda(), wide.key.cuda(), wide.value.cuda(), cache,
                                 wide.metadata.cuda(), wide.block_size, wide.scale)
    narrow = decode_step(shape, dtype, extra_blocks=0, seed=2)
    expected, expected_cache = narrow.run(REFERENCE_ATTENTION)
    assert torch.equal(cache[:, :expected_cache.shape[1]].cpu(), expected_cache)
    torch.testing.assert_close(output.float().cpu(), expected.float(), atol=TOLERANCE[dtype],
                               rtol=TOLERANCE[dtype])
