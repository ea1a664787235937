"""GGUF checkpoints to HF safetensors dirs: how `quiver models fetch` builds SmolLM2 and how
`quiver optimize` takes a `.gguf` source."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def convert_gguf(gguf_path: Path, out_dir: Path, *,
                 special_tokens: Mapping[str, str] | None = None) -> None:
    """Dequantize a Llama GGUF into a bf16 safetensors HF dir with tokenizer + template;
    `special_tokens` (e.g. `{"eos_token": ...}`) override what the GGUF's metadata says."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.bfloat16)
    # A GGUF-loaded model carries a quantizer flag that makes save_pretrained refuse:
    # rebuild it from a clean config and copy the dequantized weights over.
    config = AutoConfig.for_model(**_clean_config(loaded.config.to_dict()))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for attr, token in (special_tokens or {}).items():
        setattr(tokenizer, attr, token)
    tokenizer.clean_up_tokenization_spaces = False
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)


def _clean_config(raw: dict) -> dict:
    drop = {"quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"}
    return {key: value for key, value in raw.items() if key not in drop}
