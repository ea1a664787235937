"""`quiver::paged_attention_decode`, the decodes-only attention op that CUDA graphs capture:
its any-device kernel against the reference op (its Triton kernel: test_triton_attention.py).

The op reads its sizes from shapes, so its block tables may be wider than any request
needs (a graph's tables are `max_model_len` wide): rows must read nothing past their length.
"""

from __future__ import annotations

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
    """Also with tables wider than the requests' whose extra blocks hold NaN."""
    step = decode_step(shape, dtype, extra_blocks=3)
    output, cache = step.run(DECODE_ATTENTION)
    narrow = decode_step(shape, dtype, extra_blocks=0)
    expected, expected_cache = narrow.run(REFERENCE_ATTENTION)
    assert torch.equal(cache[:, :expected_cache.shape[1]], expected_cache)
    torch.testing.assert_close(output.float(), expected.float(), atol=TOLERANCE[dtype],
                               rtol=TOLERANCE[dtype])


def test_index_of_the_wrong_size_is_refused() -> None:
    step = decode_step(SHAPES[0], torch.float32, extra_blocks=0)
    with pytest.raises(ValueError, match="does not hold 5 decodes"):
        unpack_decode_index(step.metadata, 5)


def test_table_entries_past_a_request_are_never_read() -> None:
    """A CUDA graph's tables keep stale ids past each row's blocks (even ids past the cache,
    from a wider step): the any-device kernel must neither index nor read them."""
    step = decode_step(SHAPES[0], torch.float32, extra_blocks=2)
    num_blocks = step.kv_cache.shape[1] // step.block_size
    metadata = step.metadata.clone()
    _, seq_lens, tables = unpack_decode_index(metadata, len(SEQ_LENS))
    owned = -(-seq_lens // step.block_size)
    for row, count in enumerate(owned.tolist()):
        tables[row, count:] = num_blocks + 1000  # out of range
    stale = Step(step.query, step.key, step.value, step.kv_cache, metadata, step.block_size,
                 step.scale)
    output, _ = stale.run(DECODE_ATTENTION)
    expected, _ = decode_step(SHAPES[0], torch.float32, extra_blocks=0).run(REFERENCE_ATTENTION)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
