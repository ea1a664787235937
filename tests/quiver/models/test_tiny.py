"""The tiny model: deterministic, Llama-shaped (GQA, RoPE, tied embeddings), chat-ready."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from quiver.cli import main
from quiver.models.marker import MARKER_NAME
from quiver.models.tiny import build_tiny

COMPARED_FILES = ["model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"]


def test_two_builds_are_byte_identical(tmp_path):
    first = build_tiny(tmp_path / "a")
    second = build_tiny(tmp_path / "b", force=True)
    for name in COMPARED_FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_second_build_is_a_no_op(tmp_path):
    dest = build_tiny(tmp_path / "tiny")
    weights = dest / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert main(["models", "tiny", "--dest", str(dest)]) == 0
    assert weights.stat().st_mtime_ns == before


def test_incomplete_dir_is_rebuilt(tmp_path):
    dest = build_tiny(tmp_path / "tiny")
    (dest / "model.safetensors").unlink()
    build_tiny(dest)
    assert (dest / "model.safetensors").is_file()
    assert (dest / MARKER_NAME).is_file()
    assert not list(tmp_path.glob(".tiny-*")), "staging dir left behind"


def test_architecture_is_llama_with_gqa_rope_and_tied_embeddings(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["tie_word_embeddings"] is True
    assert config["rope_parameters"]["rope_theta"] > 0
    with safe_open(tiny_model_dir / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
        assert "lm_head.weight" not in names  # tied: shares embed_tokens
        k_proj = weights.get_tensor("model.layers.0.self_attn.k_proj.weight")
        q_proj = weights.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert k_proj.shape[0] * 2 == q_proj.shape[0]
    assert k_proj.dtype == torch.float32


def test_tokenizer_round_trips_text_and_renders_chatml(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "def f(x):\n    return x ** 2  # naïve — ünïcödé ✓"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True, tokenize=False,
    )
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_transformers_generates_from_it(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    input_ids = tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids).logits
        output = model.generate(input_ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert torch.isfinite(logits).all()
    # Peaked logits (wide init): the greedy winner is clear, not a float near-tie.
    top2 = logits[0, -1].topk(2).values
    assert (top2[0] - top2[1]).item() > 1e-3
    assert output.shape[1] == input_ids.shape[1] + 8


@pytest.mark.parametrize("bad", ["config.json"])
def test_verify_reports_a_broken_config(tiny_model_dir, tmp_path, bad, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_model_dir.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / bad).write_text('{"model_type": "gpt_neox"}')
    assert main(["models", "verify", str(broken)]) == 1
    assert "model_type 'gpt_neox' is not one Quiver serves" in capsys.readouterr().err
