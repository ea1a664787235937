"""Compressed-tensors `pack-quantized` checkpoints on our low-bit kernels.

Dirs come from llmcompressor (RTN, no calibration), as `quiver optimize int8|awq` writes
them, or, for shapes llmcompressor refuses (a partial last group), from `write_rtn_dirs`,
which packs with compressed-tensors' own `pack_to_int32` and writes a float twin holding the
exact dequantized weights. References are independent of our dequantization: transformers
loading the compressed dir (it dequantizes) or our float loader on the twin.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import (
    pack_to_int32,
    unpack_from_int32,
)
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

from serving.kernels.ops import lowbit_kernels_run
from serving.models import AttentionMetadata, LlamaForCausalLM, compressed, load_model
from serving.models.compressed import QuantizationConfig, read_quantized
from serving.models.quant import (
    DequantProjection,
    FloatProjection,
    Int4Projection,
    Int8Projection,
    Projection,
    kernel_max_tokens,
)
from tests.greedy_paths import FP32_KERNELS, path_problems, steps_from_logits

pytestmark = pytest.mark.isa  # kernels and rounding: run under lower ISAs by `make test-isa`

BLOCK_SIZE = 16
FP32_TOLERANCE = 1e-4  # relative to the largest logit: fp32 accumulation order only
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "2 + 2 ="]


def scheme(num_bits: int, symmetric: bool, group_size: int | None) -> dict:
    strategy = {"strategy": "group", "group_size": group_size} if group_size else {
        "strategy": "channel"
    }
    return {"num_bits": num_bits, "type": "int", "symmetric": symmetric, **strategy}


def llmcompressor_dir(source: Path, out: Path, weights: dict, ignore: list[str]) -> Path:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    recipe = QuantizationModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=ignore
    )
    oneshot(model=model, recipe=recipe)
    model.save_pretrained(out, save_compressed=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def rtn(weight: torch.Tensor, num_bits: int, symmetric: bool, group_size: int | None):
    """compressed-tensors' convention: q = round(w / s) + zp, w' = (q - zp) * s."""
    num_rows, num_cols = weight.shape
    size = group_size or num_cols
    num_groups = math.ceil(num_cols / size)
    groups = torch.nn.functional.pad(weight.float(), (0, num_groups * size - num_cols))
    groups = groups.view(num_rows, num_groups, size)
    q_min, q_max = -(1 << (num_bits - 1)), (1 << (num_bits - 1)) - 1
    if symmetric:
        scale, zero = groups.abs().amax(-1) / (q_max + 0.5), torch.zeros(num_rows, num_groups)
    else:
        low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
        scale = (high - low) / (q_max - q_min)
        zero = (q_min - low / scale.clamp(min=1e-8)).round().clamp(q_min, q_max)
    scale = scale.clamp(min=1e-8).to(weight.dtype).float()
    q = (groups / scale[..., None]).round().add(zero[..., None]).clamp(q_min, q_max)
    dequantized = ((q - zero[..., None]) * scale[..., None]).view(num_rows, -1)[:, :num_cols]
    q = q.view(num_rows, -1)[:, :num_cols].to(torch.int8)
    return q, scale.to(weight.dtype), zero.to(torch.int8), dequantized.to(weight.dtype)


def write_rtn_dirs(source: Path, out: Path, weights: dict) -> tuple[Path, Path]:
    """A hand-packed compressed dir and its float twin with the same dequantized weights."""
    quant_dir, float_dir = out / "quantized", out / "float"
    quantized, floats = {}, {}
    with safe_open(source / "model.safetensors", "pt") as handle:
        for name in handle.keys():  # noqa: SIM118
            tensor = handle.get_tensor(name)
            floats[name] = quantized[name] = tensor
            if not name.endswith("_proj.weight"):
                continue
            module = name.removesuffix(".weight")
            q, scale, zero, floats[name] = rtn(
                tensor, weights["num_bits"], weights["symmetric"], weights.get("group_size")
            )
            del quantized[name]
            quantized[f"{module}.weight_packed"] = pack_to_int32(q, weights["num_bits"])
            quantized[f"{module}.weight_scale"] = scale
            quantized[f"{module}.weight_shape"] = torch.tensor(tensor.shape)
            if not weights["symmetric"]:
                zero_point = pack_to_int32(zero, weights["num_bits"], packed_dim=0)
                quantized[f"{module}.weight_zero_point"] = zero_point
    config = json.loads((source / "config.json").read_text())
    for path, tensors in ((float_dir, floats), (quant_dir, quantized)):
        path.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors")
        (path / "config.json").write_text(json.dumps(config))
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
            "ignore": ["lm_head"],
        }
    return quant_dir, float_dir


def prefill_logits(model: LlamaForCausalLM, token_ids: list[int]) -> torch.Tensor:
    kv_caches = model.make_kv_caches(-(-len(token_ids) // BLOCK_SIZE), BLOCK_SIZE)
    logits, _ = _step(model, kv_caches, token_ids, 0)
    return logits


def _step(model: LlamaForCausalLM, kv_caches: list[torch.Tensor], token_ids: list[int],
          start: int) -> tuple[torch.Tensor, float]:
    positions = torch.arange(start, start + len(token_ids))
    metadata = AttentionMetadata.build(
        query_lens=[len(token_ids)], seq_lens=[start + len(token_ids)],
        block_tables=[list(range(kv_caches[0].shape[1] // BLOCK_SIZE))],
        block_size=BLOCK_SIZE,
    )
    began = time.perf_counter()
    with torch.inference_mode():
        hidden = model(torch.tensor(token_ids), positions, kv_caches, metadata)
        logits = model.compute_logits(hidden)
    return logits, time.perf_counter() - began


def decode_logits(model: LlamaForCausalLM, token_ids: list[int], num_prefill: int):
    """Logits of the last prefill row, then of one decode step per remaining token."""
    kv_caches = model.make_kv_caches(-(-len(token_ids) // BLOCK_SIZE), BLOCK_SIZE)
    rows = [_step(model, kv_caches, token_ids[:num_prefill], 0)[0][-1:]]
    for position in range(num_prefill, len(token_ids)):
        rows.append(_step(model, kv_caches, token_ids[position : position + 1], position)[0])
    return torch.cat(rows)


def greedy(model: LlamaForCausalLM, token_ids: list[int], num_tokens: int, *,
           stop_at_eos: bool = True) -> tuple[list[int], float]:
    """Generated ids (up to and including an EOS) and the median decode step time."""
    kv_caches = model.make_kv_caches(-(-(len(token_ids) + num_tokens) // BLOCK_SIZE), BLOCK_SIZE)
    logits, _ = _step(model, kv_caches, token_ids, 0)
    generated, step_times = [int(logits[-1].argmax())], []
    while len(generated) < num_tokens:
        if stop_at_eos and generated[-1] in model.arch.eos_token_ids:
            break
        position = len(token_ids) + len(generated) - 1
        logits, seconds = _step(model, kv_caches, generated[-1:], position)
        generated.append(int(logits[-1].argmax()))
        step_times.append(seconds)
    return generated, sorted(step_times)[len(step_times) // 2]


def reference_logits(model_dir: Path, token_ids: list[int]) -> torch.Tensor:
    reference = transformers_reference(model_dir)
    with torch.inference_mode():
        return reference(torch.tensor([token_ids])).logits[0].float()


def transformers_reference(model_dir: Path) -> torch.nn.Module:
    config = CompressedTensorsConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, quantization_config=config
    ).eval()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def projections(model: LlamaForCausalLM) -> list[Projection]:
    return [module for module in model.modules() if isinstance(module, Projection)]


def weight_bytes(model: torch.nn.Module) -> int:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def assert_no_float_weights(model: LlamaForCausalLM) -> None:
    for projection in projections(model):
        assert isinstance(projection, Int8Projection | Int4Projection)
        assert not hasattr(projection, "weight")
        for buffer in projection.buffers():
            assert not buffer.is_floating_point() or buffer.numel() < 0.2 * (
                projection.values.numel() if isinstance(projection, Int8Projection)
                else 2 * projection.packed.numel()
            )
        if isinstance(projection, Int8Projection):
            assert projection.values.dtype == torch.int8
        else:
            assert projection.packed.dtype == torch.uint8


# --- unpacking ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("num_cols", [64, 176, 33])
def test_unpack_matches_compressed_tensors(num_bits: int, num_cols: int) -> None:
    generator = torch.Generator().manual_seed(num_bits * 1000 + num_cols)
    low, high = -(1 << (num_bits - 1)), 1 << (num_bits - 1)
    values = torch.randint(low, high, (24, num_cols), dtype=torch.int8, generator=generator)
    packed = pack_to_int32(values, num_bits)
    ours = compressed.unpack_from_int32(packed, num_bits, num_cols)
    assert torch.equal(ours, unpack_from_int32(packed, num_bits, values.shape))
    assert torch.equal(ours, values)
    packed_rows = pack_to_int32(values, num_bits, packed_dim=0)  # as zero points are stored
    assert torch.equal(compressed.unpack_from_int32(packed_rows, num_bits, 24, 0), values)


@pytest.mark.parametrize("weights", [scheme(4, False, 32), scheme(8, True, None)])
def test_read_quantized_matches_compressed_tensors_dequantize(weights: dict) -> None:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(3))
    q, scale, zero, _ = rtn(weight, weights["num_bits"], weights["symmetric"],
                            weights.get("group_size"))
    tensors = {"m.weight_packed": pack_to_int32(q, weights["num_bits"]),
               "m.weight_scale": scale, "m.weight_shape": torch.tensor(weight.shape)}
    if not weights["symmetric"]:
        tensors["m.weight_zero_point"] = pack_to_int32(zero, weights["num_bits"], packed_dim=0)
    args = QuantizationConfig.from_dict({
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"g": {"targets": ["Linear"], "weights": weights}},
    }).weight_args("m")
    ours = read_quantized(tensors.__getitem__, "m", args)
    assert torch.equal(ours.values, q)
    expected = dequantize(q, scale, None if weights["symmetric"] else zero,
                          QuantizationArgs(**weights))
    assert torch.equal(compressed.dequantize(ours, torch.float32), expected)


@pytest.mark.parametrize(("config", "message"), [
    ({"quant_method": "awq", "bits": 4}, "quant_method"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized",
      "config_groups": {"g": {"targets": ["Linear"], "weights": scheme(8, True, None)}}},
     "format"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"g": {"targets": ["Linear"], "weights": scheme(8, True, None),
                              "input_activations": {"num_bits": 8, "dynamic": True}}}},
     "activation"),
])
def test_unsupported_quantization_configs_are_refused(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantizationConfig.from_dict(config)


# --- tiny model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llmcompressor_dirs(tiny_model_dir: Path, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("tiny-llmcompressor")
    return {
        "int8": llmcompressor_dir(tiny_model_dir, out / "int8", scheme(8, True, None),
                                  ["lm_head"]),
        # down_proj has K = 176, which llmcompressor refuses to group by 32: left float.
        "int4": llmcompressor_dir(tiny_model_dir, out / "int4", scheme(4, False, 32),
                                  ["lm_head", "re:.*down_proj"]),
    }


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_tiny_llmcompressor_dirs_match_transformers_dequantized(
    tiny_llmcompressor_dirs: dict[str, Path], kind: str
) -> None:
    model_dir = tiny_llmcompressor_dirs[kind]
    model = load_model(model_dir, dtype=torch.float32)
    token_ids = list(range(3, 60))
    error = relative_error(prefill_logits(model, token_ids), reference_logits(model_dir, token_ids))
    assert error < FP32_TOLERANCE
    kernels = {type(p) for p in projections(model)}
    expected = {Int8Projection} if kind == "int8" else {Int4Projection, FloatProjection}
    assert kernels == expected
    for layer in model.layers:
        assert layer.mlp.down_proj.kernel == ("float" if kind == "int4" else "int8pack_mm")


@pytest.mark.parametrize(("weights", "kernel"), [
    (scheme(4, False, 32), Int4Projection),  # down_proj K=176: partial last group, padded
    (scheme(4, False, 128), Int4Projection),  # K=64 < group: one partial group
    (scheme(4, True, None), Int4Projection),  # per channel as kernel groups
    (scheme(4, True, 16), Int8Projection),  # group 16: too small for the int4 kernel
    (scheme(8, False, 32), Int8Projection),  # grouped int8 with zero points
    (scheme(3, False, None), Int8Projection),  # odd width: values straddle int32 words
])
def test_hand_packed_dirs_match_their_float_twin(
    tiny_model_dir: Path, tmp_path: Path, weights: dict, kernel: type
) -> None:
    quant_dir, float_dir = write_rtn_dirs(tiny_model_dir, tmp_path, weights)
    token_ids = list(range(3, 60))
    expected = prefill_logits(load_model(float_dir, dtype=torch.float32), token_ids)
    model = load_model(quant_dir, dtype=torch.float32)
    assert {type(p) for p in projections(model)} == {kernel}
    assert_no_float_weights(model)
    assert relative_error(prefill_logits(model, token_ids), expected) < FP32_TOLERANCE
    decoded = decode_logits(model, token_ids, num_prefill=50)  # the kernels' path
    assert relative_error(decoded, expected[49:]) < FP32_TOLERANCE
    bf16 = load_model(quant_dir, dtype=torch.bfloat16)
    assert relative_error(prefill_logits(bf16, token_ids), expected) < 0.05


@pytest.mark.parametrize("weights", [scheme(4, False, 32), scheme(4, True, None),
                                     scheme(8, False, 32), scheme(8, True, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_and_dequantized_paths_match_the_fallback(
    tiny_model_dir: Path, tmp_path: Path, weights: dict, dtype: torch.dtype
) -> None:
    """Decode-sized calls take the low-bit kernel, prefill-sized ones dequantize per call
    (bf16 only where it is native)."""
    quant_dir, _ = write_rtn_dirs(tiny_model_dir, tmp_path, weights)
    config = QuantizationConfig.from_model_dir(quant_dir)
    name = "model.layers.0.mlp.down_proj"  # K = 176: padded in both kernels
    with safe_open(quant_dir / "model.safetensors", "pt") as handle:
        weight = read_quantized(handle.get_tensor, name, config.weight_args(name))
    # more rows than any kernel takes (int4 in bf16: 256), so the whole batch dequantizes
    # (where bf16 is emulated torch's kernels take every batch: None)
    x = torch.randn(300, weight.shape[1], generator=torch.Generator().manual_seed(0))
    limits = [kernel_max_tokens(k, dtype) for k in ("int8pack_mm", "int4pack_mm")]
    assert all(limit is None or len(x) > limit for limit in limits)
    expected = DequantProjection(weight, None)(x)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    kernels = [Int8Projection(weight, None, dtype)]
    if weights["num_bits"] == 4:
        kernels.append(Int4Projection(weight, None, dtype))
    with torch.inference_mode():
        for kernel in kernels:
            rows = torch.cat([kernel(x[i : i + 1].to(dtype)) for i in range(len(x))])
            assert relative_error(rows.float(), expected) < tolerance
            assert relative_error(kernel(x.to(dtype)).float(), expected) < tolerance


@pytest.mark.parametrize("weights", [scheme(8, True, None), scheme(8, False, 32),
                                     scheme(8, True, 32), scheme(8, True, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_symmetric_per_channel_int8_runs_quivers_kernel(
    tiny_model_dir: Path, tmp_path: Path, quiver_cache_dir: Path, weights: dict,
    dtype: torch.dtype
) -> None:
    """Packed at load, a symmetric per-channel int8 weight takes `quiver::int8_linear` for
    every batch (bf16 models where the CPU has AVX512-BF16, float32 ones where it has AVX2 and
    FMA): the same products as torch's kernel and the dequantized weight, and nothing
    dequantizes; other schemes (zero points, groups — also one group wider than the row,
    which pads it) keep torch's kernel."""
    from serving.kernels.build import load_cpu_kernels
    from serving.models.linear import Packing

    if load_cpu_kernels(quiver_cache_dir).library is None:
        pytest.skip("no C++ compiler: the C++ library (and its int8 kernel) cannot build")
    quant_dir, _ = write_rtn_dirs(tiny_model_dir, tmp_path, weights)
    config = QuantizationConfig.from_model_dir(quant_dir)
    name = "model.layers.0.mlp.down_proj"  # N = 64, K = 176
    with safe_open(quant_dir / "model.safetensors", "pt") as handle:
        weight = read_quantized(handle.get_tensor, name, config.weight_args(name))
    reference = Int8Projection(weight, None, dtype)
    packed = Int8Projection(weight, None, dtype)
    packed.prepack(Packing.KERNEL)
    per_channel = weights["symmetric"] and weights["strategy"] == "channel"
    runs_kernel = per_channel and lowbit_kernels_run(dtype)
    assert (packed.kernel == "quiver_int8") == runs_kernel
    if not runs_kernel:
        assert packed.max_kernel_tokens(dtype) == kernel_max_tokens("int8pack_mm", dtype)
        return
    assert packed.max_kernel_tokens(dtype) is None  # one compiled graph for all
    assert torch.equal(packed.dequantized(dtype), reference.dequantized(dtype))
    x = torch.randn(300, 176, generator=torch.Generator().manual_seed(0)).to(dtype)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    with torch.inference_mode():
        for rows in (1, 2, 5, 32, 300):  # 300: torch's path dequantizes, the kernel does not
            expected = reference(x[:rows]).float()
            assert relative_error(packed(x[:rows]).float(), expected) < tolerance


@pytest.mark.parametrize(("weights", "name"), [
    (scheme(4, False, 32), "model.layers.0.mlp.down_proj"),  # N = 64, K = 176: K padded
    (scheme(4, True, None), "model.layers.0.mlp.down_proj"),
    (scheme(4, False, 32), "model.layers.0.mlp.gate_proj"),  # N = 176: rows padded to 192
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_runs_quivers_kernel(
    tiny_model_dir: Path, tmp_path: Path, quiver_cache_dir: Path, weights: dict, name: str,
    dtype: torch.dtype
) -> None:
    """Repacked at load, an int4 weight (grouped with zero points, or per channel) takes
    `quiver::int4_linear`: in a bf16 model up to 256 rows where the CPU has AVX512-BF16,
    past them the dequantized weight (from the new packing); in a float32 model every batch
    where it has AVX2 and FMA. The same products as torch's int4 kernel and the same
    dequantized weight."""
    from serving.kernels.build import load_cpu_kernels
    from serving.models.linear import Packing

    if load_cpu_kernels(quiver_cache_dir).library is None:
        pytest.skip("no C++ compiler: the C++ library (and its int4 kernel) cannot build")
    quant_dir, _ = write_rtn_dirs(tiny_model_dir, tmp_path, weights)
    config = QuantizationConfig.from_model_dir(quant_dir)
    with safe_open(quant_dir / "model.safetensors", "pt") as handle:
        weight = read_quantized(handle.get_tensor, name, config.weight_args(name))
    reference = Int4Projection(weight, None, dtype)
    packed = Int4Projection(weight, None, dtype)
    packed.prepack(Packing.KERNEL)
    runs_kernel = reference.row_blocked and lowbit_kernels_run(dtype)
    assert (packed.kernel == "quiver_int4") == runs_kernel
    if not runs_kernel:
        return
    assert packed.max_kernel_tokens(dtype) == (256 if dtype == torch.bfloat16 else None)
    assert torch.equal(packed.dequantized(dtype), reference.dequantized(dtype))
    x = torch.randn(300, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(dtype)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    with torch.inference_mode():
        for rows in (1, 3, 8, 17, 32, 300):
            expected = reference(x[:rows]).float()
            assert relative_error(packed(x[:rows]).float(), expected) < tolerance


def int4_layout_in_subprocess(capability: str | None) -> tuple[str, str]:
    """(ATen's CPU capability, `int4_row_block()`) in a fresh process, ATen capped to
    `capability` if given; the process also checks `unpack_int4` against torch's packing."""
    env = dict(os.environ)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    script = ("import torch\n"
              "from serving.models.quant import int4_row_block, unpack_int4\n"
              "block = int4_row_block()\n"
              "if block is not None:\n"
              "    u = torch.randint(0, 16, (192, 96), dtype=torch.int32)\n"
              "    packed = torch._convert_weight_to_int4pack_for_cpu(u, 1)\n"
              "    assert torch.equal(unpack_int4(packed, 192, 96).to(torch.int32), u)\n"
              "print(torch.backends.cpu.get_cpu_capability(), block)\n")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120, cwd=Path(__file__).resolve().parents[3])
    assert result.returncode == 0, result.stderr[-2000:]
    isa, block = result.stdout.split()
    return isa, block


def test_int4_row_block_follows_the_isa_torch_runs() -> None:
    """torch packs int4 for its CPU kernel in blocks of 64 rows with AVX-512 and 32 with AVX2
    (ATen picks at run time): the probe finds whichever this process gets, so an AVX2 host
    (or ATen capped to AVX2) still repacks for Quiver's kernel and still has a dequantized
    path for prefill — once it read every layout as 64 rows and had neither."""
    isa, block = int4_layout_in_subprocess(None)
    assert block == {"AVX512": "64", "AVX2": "32"}.get(isa, block), (isa, block)
    if isa not in ("AVX512", "AVX2"):
        pytest.skip(f"ATen runs {isa} code here; the AVX2 layout needs an AVX2 CPU")
    assert int4_layout_in_subprocess("avx2") == ("AVX2", "32")


def test_fused_projections_keep_per_row_scales(tiny_model_dir: Path, tmp_path: Path) -> None:
    quant_dir, _ = write_rtn_dirs(tiny_model_dir, tmp_path, scheme(4, False, 32))
    model = load_model(quant_dir, dtype=torch.float32)
    arch = model.arch
    qkv = model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Int4Projection)
    expected_rows = (arch.num_attention_heads + 2 * arch.num_key_value_heads) * arch.head_dim
    assert qkv.out_features == expected_rows
    assert model.layers[0].mlp.gate_up_proj.out_features == 2 * arch.intermediate_size


# --- SmolLM2 --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_quantized_dirs(smollm2_dir: Path, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("smollm2-quantized")
    # AWQ's default group of 128 does not divide K = 576; 64 does (and is a kernel group).
    return {
        "int8": llmcompressor_dir(smollm2_dir, out / "int8", scheme(8, True, None), ["lm_head"]),
        "int4": llmcompressor_dir(smollm2_dir, out / "int4", scheme(4, False, 64), ["lm_head"]),
    }


@pytest.fixture(scope="module")
def smollm2_prompts(smollm2_dir: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                      add_generation_prompt=True, return_dict=False)
        for prompt in PROMPTS
    ]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_smollm2_quantized_logits_match_transformers_dequantized(
    smollm2_quantized_dirs: dict[str, Path], smollm2_prompts: list[list[int]], kind: str
) -> None:
    model_dir = smollm2_quantized_dirs[kind]
    model = load_model(model_dir, dtype=torch.float32)
    assert_no_float_weights(model)
    token_ids = smollm2_prompts[0]
    error = relative_error(prefill_logits(model, token_ids), reference_logits(model_dir, token_ids))
    print(f"\nSmolLM2 {kind}: max |logit error| / max |logit| = {error:.2e}")
    assert error < FP32_TOLERANCE


@pytest.mark.slow
def test_smollm2_int8_greedy_matches_transformers_dequantized(
    smollm2_quantized_dirs: dict[str, Path], smollm2_prompts: list[list[int]]
) -> None:
    model_dir = smollm2_quantized_dirs["int8"]
    model = load_model(model_dir, dtype=torch.float32)
    reference = transformers_reference(model_dir)
    for token_ids in smollm2_prompts:
        ours, _ = greedy(model, token_ids, 24)
        our_logits = decode_logits(model, token_ids + ours[:-1], len(token_ids))
        with torch.inference_mode():
            output = reference.generate(torch.tensor([token_ids]), max_new_tokens=24,
                                        do_sample=False, output_logits=True,
                                        return_dict_in_generate=True)
        theirs = output.sequences[0, len(token_ids):].tolist()
        assert len(ours) > 4
        # int8pack_mm and a dequantized fp32 GEMM round differently: identical where no
        # step is a near-tie (so far every host), and parting only at one if a host's
        # rounding flips it
        problems = path_problems(steps_from_logits(theirs, [x[0] for x in output.logits]),
                                 steps_from_logits(ours, our_logits), **FP32_KERNELS)
        assert not problems, problems


@pytest.mark.slow
def test_smollm2_quantized_memory_and_decode_speed(
    smollm2_dir: Path, smollm2_quantized_dirs: dict[str, Path],
    smollm2_prompts: list[list[int]]
) -> None:
    """Weights well below the float model's; decode step times are printed, not asserted."""
    dirs = {"float": smollm2_dir, **smollm2_quantized_dirs}
    for dtype in (torch.bfloat16, torch.float32):
        sizes, step_times = {}, {}
        for kind, model_dir in dirs.items():
            model = load_model(model_dir, dtype=dtype)
            sizes[kind] = weight_bytes(model)
            greedy(model, smollm2_prompts[0], 8, stop_at_eos=False)  # warm up
            _, step_times[kind] = greedy(model, smollm2_prompts[0], 32, stop_at_eos=False)
            del model
        print(f"\nSmolLM2 {str(dtype).removeprefix('torch.')}, batch 1: " + ", ".join(
            f"{kind} {sizes[kind] / 2**20:.0f} MiB {step_times[kind] * 1e3:.1f} ms/step"
            for kind in dirs
        ))
        assert sizes["int8"] < 0.7 * sizes["float"]
        assert sizes["int4"] < 0.5 * sizes["float"]
