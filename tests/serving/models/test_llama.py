"""Our Llama against transformers' on the tiny model in float32.

The paged case runs several requests of different lengths together, each over a scrambled
(non-contiguous) block table, mixing prefill chunks and decodes in one batch, and compares
every computed row with the logits of one full-sequence transformers forward.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from serving.models import AttentionMetadata, LlamaForCausalLM, load_model

pytestmark = pytest.mark.isa  # kernels and rounding: run under lower ISAs by `make test-isa`

BLOCK_SIZE = 4
NUM_BLOCKS = 256
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path) -> tuple[LlamaForCausalLM, torch.nn.Module]:
    ours = load_model(tiny_model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return ours, reference


def reference_logits(reference: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return reference(torch.tensor([token_ids])).logits[0].float()


@dataclass
class Sequence:
    token_ids: list[int]
    block_table: list[int]
    chunk_sizes: list[int]  # tokens computed per step; 1 = a decode step
    num_computed: int = 0
    logits: list[torch.Tensor] = field(default_factory=list)


def run_step(
    model: LlamaForCausalLM, kv_caches: list[torch.Tensor], sequences: list[Sequence]
) -> None:
    """One batched forward over the next chunk of every unfinished sequence."""
    work = [(seq, seq.chunk_sizes.pop(0)) for seq in sequences if seq.chunk_sizes]
    work.sort(key=lambda item: item[1] > 1)  # decodes first
    input_ids, positions = [], []
    for seq, size in work:
        input_ids += seq.token_ids[seq.num_computed : seq.num_computed + size]
        positions += range(seq.num_computed, seq.num_computed + size)
    metadata = AttentionMetadata.build(
        query_lens=[size for _, size in work],
        seq_lens=[seq.num_computed + size for seq, size in work],
        block_tables=[seq.block_table for seq, _ in work],
        block_size=BLOCK_SIZE,
    )
    with torch.inference_mode():
        hidden = model(torch.tensor(input_ids), torch.tensor(positions), kv_caches, metadata)
        logits = model.compute_logits(hidden)
    row = 0
    for seq, size in work:
        seq.logits.append(logits[row : row + size])
        seq.num_computed += size
        row += size


def test_full_prefill_matches_transformers(models) -> None:
    ours, reference = models
    token_ids = random.Random(0).choices(range(ours.arch.vocab_size), k=57)
    kv_caches = ours.make_kv_caches(NUM_BLOCKS, BLOCK_SIZE)
    seq = Sequence(token_ids, block_table=list(range(20, 40)), chunk_sizes=[57])
    run_step(ours, kv_caches, [seq])
    expected = reference_logits(reference, token_ids)
    assert (seq.logits[0] - expected).abs().max().item() < TOLERANCE


def test_chunked_prefill_and_decode_in_mixed_batch_match_full_sequence(models) -> None:
    ours, reference = models
    rng = random.Random(1)
    free_blocks = list(range(NUM_BLOCKS))
    rng.shuffle(free_blocks)
    plans = [
        [13, 20, 7, 1, 1, 1],  # three prefill chunks, then decodes
        [1, 1, 1, 1, 1, 1],  # a one-token prompt decoding from the start
        [40, 1, 1, 1],
        [5, 5, 5, 5, 5, 1, 1],
        [2, 1, 30, 1],  # a decode-sized chunk in the middle of a prefill
    ]
    sequences = []
    for chunk_sizes in plans:
        num_tokens = sum(chunk_sizes)
        num_blocks = -(-num_tokens // BLOCK_SIZE) + 1  # one spare block, like an allocator
        table = [free_blocks.pop() for _ in range(num_blocks)]
        token_ids = rng.choices(range(ours.arch.vocab_size), k=num_tokens)
        sequences.append(Sequence(token_ids, table, list(chunk_sizes)))
    kv_caches = ours.make_kv_caches(NUM_BLOCKS, BLOCK_SIZE)
    while any(seq.chunk_sizes for seq in sequences):
        run_step(ours, kv_caches, sequences)
    for seq in sequences:
        expected = reference_logits(reference, seq.token_ids)
        actual = torch.cat(seq.logits)
        assert actual.shape == expected.shape
        assert (actual - expected).abs().max().item() < TOLERANCE


def test_logits_only_at_requested_rows(models) -> None:
    ours, _ = models
    hidden = torch.randn(6, ours.arch.hidden_size)
    with torch.inference_mode():
        full = ours.compute_logits(hidden)
        picked = ours.compute_logits(hidden, torch.tensor([5, 2]))
    assert picked.dtype == torch.float32
    torch.testing.assert_close(picked, full[[5, 2]], atol=1e-5, rtol=1e-5)


def test_missing_tensor_is_named(tmp_path: Path, tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(tiny_model_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        load_model(tmp_path)


def test_sharded_checkpoint_loads_like_single_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    import json

    from safetensors.torch import load_file, save_file

    tensors = load_file(tiny_model_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2]}
    shards["model-00002-of-00002.safetensors"] = names[1::2]
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({name: tensors[name] for name in shard_names}, tmp_path / shard)
        weight_map.update(dict.fromkeys(shard_names, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    sharded = load_model(tmp_path, dtype="auto")
    single = load_model(tiny_model_dir, dtype="auto")
    assert sharded.dtype == torch.float32
    for (name, a), (_, b) in zip(
        sharded.state_dict().items(), single.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def full_prefill_logits(model: LlamaForCausalLM, token_ids: list[int]) -> torch.Tensor:
    seq = Sequence(token_ids, block_table=list(range(8)), chunk_sizes=[len(token_ids)])
    run_step(model, model.make_kv_caches(NUM_BLOCKS, BLOCK_SIZE), [seq])
    return seq.logits[0]


def test_layer_blocks_compute_the_same_and_divide_the_layers(models) -> None:
    from serving.models.compiled import MAX_LAYERS_PER_GRAPH, layers_per_graph

    ours, _ = models
    token_ids = [1, 15, 42, 7, 99, 3]
    try:
        ours.group_layers(1)
        single = full_prefill_logits(ours, token_ids)
        ours.group_layers(2)                     # the tiny model's 2 layers in one block
        assert [len(block.layers) for block in ours.blocks] == [2]
        assert torch.equal(full_prefill_logits(ours, token_ids), single)
        with pytest.raises(ValueError, match="do not divide"):
            ours.group_layers(3)
    finally:
        ours.group_layers(1)
    assert MAX_LAYERS_PER_GRAPH == 3
    # the largest divisor up to 3, so every block is the same graph
    assert [layers_per_graph(n) for n in (30, 24, 32, 22, 7, 2)] == [3, 3, 2, 2, 1, 2]


def test_bf16_checkpoint_in_float32_runs_bf16_panels(tmp_path: Path, tiny_model_dir: Path,
                                                     quiver_cache_dir: Path) -> None:
    """A bf16 checkpoint served in float32 (`--dtype auto` on an AVX2-only CPU) keeps its
    projections and LM head as bf16 panels (the same numbers in half the bytes) where the
    C++ kernels build them (AVX2 without AVX-512): the logits of a prefill and of decode
    steps are still transformers' in float32."""
    import shutil

    from safetensors.torch import load_file, save_file

    from serving.kernels.build import builds_panel_kernel, load_cpu_kernels
    from serving.models.linear import Packing
    from serving.models.quant import FloatProjection

    if load_cpu_kernels(quiver_cache_dir).library is None:
        pytest.skip("no C++ compiler: the C++ library (and its panel kernel) cannot build")
    for path in tiny_model_dir.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, tmp_path / path.name)
    weights = load_file(tiny_model_dir / "model.safetensors")
    save_file({name: w.bfloat16().float().contiguous() for name, w in weights.items()},
              tmp_path / "model.safetensors")
    ours = load_model(tmp_path, dtype=torch.float32, packing=Packing.KERNEL)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    layouts = {torch.ops.quiver.packed_linear_layout(module.weight)
               for module in ours.modules() if isinstance(module, FloatProjection)}
    panels = builds_panel_kernel()  # AVX2 without AVX-512; elsewhere oneDNN's float32
    assert layouts == ({"panels"} if panels else {"onednn"})
    assert torch.ops.quiver.packed_linear_layout(ours.lm_head) == ("panels" if panels
                                                                   else "onednn")
    token_ids = [1, 15, 42, 7, 99, 3, 64, 12]
    kv_caches = ours.make_kv_caches(NUM_BLOCKS, BLOCK_SIZE)
    seq = Sequence(token_ids, block_table=list(range(8)), chunk_sizes=[5, 1, 1, 1])
    while seq.chunk_sizes:  # a 5-token prefill, then three one-row decode steps
        run_step(ours, kv_caches, [seq])
    expected = reference_logits(reference, token_ids)
    torch.testing.assert_close(torch.cat(seq.logits), expected, atol=TOLERANCE, rtol=TOLERANCE)
