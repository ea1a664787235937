"""The paged-attention ops: the C++ kernel against the pure-torch reference, and the
reference against attention written out by hand.

Batches mix decodes and prefill chunks (with and without cached context) over scrambled
block tables of many lengths, with grouped-query attention, in float32, bfloat16 and float16.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from serving.kernels import CPP_ATTENTION, REFERENCE_ATTENTION, AttentionOp
from serving.kernels.metadata import StepIndex, pack_step_index

pytestmark = pytest.mark.isa  # against torch references: run under lower ISAs (make test-isa)


@pytest.fixture(scope="session")
def cpp_attention(cpp_kernels) -> AttentionOp:
    return cpp_kernels.attention


@dataclass
class Step:
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    kv_cache: torch.Tensor
    metadata: torch.Tensor
    block_size: int
    scale: float

    def run(self, op: AttentionOp) -> tuple[torch.Tensor, torch.Tensor]:
        """The op's output and the cache it leaves (the step is not changed)."""
        cache = self.kv_cache.clone()
        output = op.op(self.query, self.key, self.value, cache, self.metadata,
                       self.block_size, self.scale)
        return output, cache


def make_step(*, query_lens: list[int], seq_lens: list[int], num_heads: int, num_kv_heads: int,
              head_dim: int, block_size: int, dtype: torch.dtype, seed: int = 0) -> Step:
    """A step over a random cache whose requests own scrambled blocks; q/k/v come fused
    (row stride > heads * D), as the model's qkv projection leaves them."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 4
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in seq_lens]
    shape = (2, num_blocks * block_size, num_kv_heads, head_dim)
    kv_cache = torch.randn(shape, generator=generator).to(dtype)
    num_tokens = sum(query_lens)
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim,
                      generator=generator).to(dtype)
    query, key, value = qkv.split((num_heads, num_kv_heads, num_kv_heads), dim=1)
    metadata = pack_step_index(query_lens=query_lens, seq_lens=seq_lens, block_tables=tables,
                               block_size=block_size)
    return Step(query, key, value, kv_cache, metadata, block_size, head_dim**-0.5)


def naive_attention(step: Step) -> torch.Tensor:
    """Per request and query row: write K/V to the cache, then softmax over its context."""
    index = StepIndex.unpack(step.metadata)
    cache = step.kv_cache.clone().float()
    cache[0, index.slot_mapping] = step.key.float()
    cache[1, index.slot_mapping] = step.value.float()
    num_heads, head_dim = step.query.shape[1:]
    group = num_heads // step.key.shape[1]
    rows = []
    for seq in range(index.num_seqs):
        start, end = index.query_start[seq].item(), index.query_start[seq + 1].item()
        seq_len = index.seq_lens[seq].item()
        table = index.block_tables[seq]
        slots = [table[p // step.block_size].item() * step.block_size + p % step.block_size
                 for p in range(seq_len)]
        keys, values = cache[0, slots], cache[1, slots]  # [seq_len, KV, D]
        for row in range(start, end):
            visible = seq_len - (end - row) + 1
            for head in range(num_heads):
                q = step.query[row, head].float()
                k, v = keys[:visible, head // group], values[:visible, head // group]
                weights = ((k @ q) * step.scale).softmax(0)
                rows.append(weights @ v)
    return torch.stack(rows).view(step.query.shape[0], num_heads * head_dim)


MIXED = {"query_lens": [1, 1, 1, 1, 7, 20], "seq_lens": [40, 1, 300, 17, 7, 50]}
SHAPES = [  # (num_heads, num_kv_heads, head_dim, block_size)
    (9, 3, 64, 16),  # SmolLM2: GQA 3
    (4, 4, 16, 4),  # the tiny model: no GQA, small blocks
    (8, 1, 128, 8),  # multi-query, head_dim 128
    (16, 2, 80, 32),  # GQA 8, head_dim 80
    (12, 2, 64, 3),  # GQA 6 (query heads in tiles of 4 and 2), blocks not a power of two
    (14, 2, 96, 16),  # GQA 7, head_dim 96 (tiles of 2 and 1)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "h{}-kv{}-d{}-bs{}".format(*shape))
def test_cpp_kernel_matches_reference(cpp_attention, shape, dtype) -> None:
    num_heads, num_kv_heads, head_dim, block_size = shape
    step = make_step(**MIXED, num_heads=num_heads, num_kv_heads=num_kv_heads,
                     head_dim=head_dim, block_size=block_size, dtype=dtype)
    output, cache = step.run(cpp_attention)
    expected, expected_cache = step.run(REFERENCE_ATTENTION)
    assert torch.equal(cache, expected_cache)
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(output.float(), expected.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_kernel_attends_long_chunks_row_by_row(cpp_attention, dtype) -> None:
    """A chunk of hundreds of rows (fresh, or after a cached context spanning many blocks)
    goes through the same row-by-row kernel as decodes: every row sees exactly the
    positions up to its own, as the reference's causal SDPA does."""
    step = make_step(query_lens=[1, 1, 300, 260], seq_lens=[500, 3, 300, 777], num_heads=9,
                     num_kv_heads=3, head_dim=64, block_size=16, dtype=dtype, seed=5)
    output, cache = step.run(cpp_attention)
    expected, expected_cache = step.run(REFERENCE_ATTENTION)
    assert torch.equal(cache, expected_cache)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(output.float(), expected.float(), atol=tolerance, rtol=tolerance)


@pytest.fixture
def two_threads():
    """torch's pool at two threads (the kernel's split between them depends on the count)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq_lens", [[40, 300, 17, 129, 64, 1, 33, 90], [900, 12, 30]],
                         ids=["whole-rows", "one-long-row"])
def test_cpp_kernel_rows_do_not_depend_on_their_step(cpp_attention, two_threads, dtype,
                                                     seq_lens) -> None:
    """On two threads a step of one row splits it by KV head, a step whose rows can keep both
    threads busy gives each task a whole row, and one with a row longer than half of all
    positions splits again: a decode's output bits are the same every way (what
    batch-independent sampling stands on)."""
    step = make_step(query_lens=[1] * len(seq_lens), seq_lens=seq_lens, num_heads=9,
                     num_kv_heads=3, head_dim=64, block_size=16, dtype=dtype, seed=3)
    together, _ = step.run(cpp_attention)
    index = StepIndex.unpack(step.metadata)
    for row, seq_len in enumerate(seq_lens):
        table = index.block_tables[row][:-(-seq_len // step.block_size)].tolist()
        alone = Step(step.query[row:row + 1], step.key[row:row + 1], step.value[row:row + 1],
                     step.kv_cache, pack_step_index(query_lens=[1], seq_lens=[seq_len],
                                                    block_tables=[table],
                                                    block_size=step.block_size),
                     step.block_size, step.scale)
        output, _ = alone.run(cpp_attention)
        assert torch.equal(output[0], together[row]), f"row {row}"


def test_cpp_kernel_refuses_an_index_that_points_outside(cpp_attention) -> None:
    """The kernel reads rows and blocks through raw pointers, so an index whose rows do
    not cover the step, whose request is longer than its table, or whose table names a
    block past the cache is refused before anything is read."""
    step = make_step(query_lens=[1, 5], seq_lens=[20, 5], num_heads=4, num_kv_heads=2,
                     head_dim=16, block_size=4, dtype=torch.float32, seed=9)
    num_tokens, num_seqs = 6, 2
    query_start = 4 + num_tokens  # the packed index's sections (metadata.index_sections)
    seq_lens = query_start + num_seqs + 1
    tables = seq_lens + num_seqs
    num_blocks = step.kv_cache.shape[1] // step.block_size
    step.run(cpp_attention)  # the index as built runs
    for entry, value, message in [(query_start + num_seqs, num_tokens - 1, "query_start must"),
                                  (seq_lens, 21, "positions in"),
                                  (tables + 1, num_blocks, "outside the cache")]:
        good = step.metadata
        step.metadata = good.clone()
        step.metadata[entry] = value
        with pytest.raises(RuntimeError, match=message):
            step.run(cpp_attention)
        step.metadata = good


@pytest.mark.parametrize("op", [REFERENCE_ATTENTION, CPP_ATTENTION], ids=lambda op: op.name)
def test_ops_compute_attention_over_their_blocks(request, op) -> None:
    if op is CPP_ATTENTION:
        request.getfixturevalue("cpp_attention")
    step = make_step(**MIXED, num_heads=6, num_kv_heads=2, head_dim=32, block_size=4,
                     dtype=torch.float32, seed=3)
    output, _ = step.run(op)
    torch.testing.assert_close(output, naive_attention(step), atol=1e-5, rtol=1e-5)


def test_decode_reads_only_its_context(cpp_attention) -> None:
    """Garbage past a request's length, in its last block or in other blocks, changes
    nothing: only positions < seq_len are read."""
    step = make_step(query_lens=[1, 1], seq_lens=[5, 37], num_heads=4, num_kv_heads=2,
                     head_dim=64, block_size=16, dtype=torch.bfloat16, seed=5)
    output, _ = step.run(cpp_attention)
    index = StepIndex.unpack(step.metadata)
    written = set(index.slot_mapping.tolist())
    block_size = step.block_size
    for seq in range(2):
        table = index.block_tables[seq]
        for position in range(index.seq_lens[seq].item(), len(table) * block_size):
            slot = table[position // block_size].item() * block_size + position % block_size
            if slot not in written:
                step.kv_cache[:, slot] = float("nan")
    again, _ = step.run(cpp_attention)
    assert torch.equal(output, again)


def test_metadata_round_trip() -> None:
    metadata = pack_step_index(query_lens=[1, 3], seq_lens=[6, 3], block_tables=[[7, 2], [5]],
                               block_size=4)
    index = StepIndex.unpack(metadata)
    assert (index.num_tokens, index.num_seqs, index.num_decodes) == (4, 2, 1)
    assert index.slot_mapping.tolist() == [2 * 4 + 1, 20, 21, 22]
    assert index.query_start.tolist() == [0, 1, 4]
    assert index.seq_lens.tolist() == [6, 3]
    assert index.block_tables.tolist() == [[7, 2], [5, 0]]


def test_prefill_before_decode_is_refused() -> None:
    with pytest.raises(ValueError, match="decodes must come before"):
        pack_step_index(query_lens=[3, 1], seq_lens=[3, 4], block_tables=[[0], [1]],
                        block_size=4)
