"""Steps shared by the llmcompressor methods (`int8`, `awq`): load, calibrate, save.

The source is loaded with transformers in float32 on CPU (bf16 matmuls are emulated on
AVX2 hosts, and slow), quantized by llmcompressor's `oneshot`, cast back to the source's
dtype (so embeddings, norms and scales keep it) and saved as a compressed-tensors
`pack-quantized` dir with the source's tokenizer files and chat template copied verbatim.
transformers reloads such a dir (`AutoModelForCausalLM.from_pretrained`), vLLM serves it,
and our native engine reads it with int8 / int4 kernels.

Imported only inside a method's `build()`: it pulls in torch and transformers at import,
llmcompressor on first use.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.errors import QuiverError
from common.families import LLAMA_FAMILY  # what the native engine serves

logger = logging.getLogger(__name__)

IGNORE = ["lm_head"]
FORMAT = "pack-quantized"
# Copied verbatim from the source, so the artifact tokenizes and chats exactly like it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


def source_config(source: Path) -> dict[str, Any]:
    """The source's config.json, refused unless it is a Llama-family causal LM."""
    path = Path(source) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise QuiverError(f"cannot read {path}: {exc}") from exc
    model_type = config.get("model_type")
    if model_type not in LLAMA_FAMILY:
        raise QuiverError(f"{source} is a {model_type!r} model; int8 and awq quantize "
                          f"Llama-family models only ({', '.join(sorted(LLAMA_FAMILY))})")
    return config


def source_dtype(config: dict[str, Any]) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise QuiverError(f"config.json names an unknown dtype {name!r}")
    return dtype


def load_source(source: Path) -> tuple[torch.nn.Module, torch.dtype]:
    """The source model in float32 on CPU, and the dtype it was stored in."""
    dtype = source_dtype(source_config(source))
    logger.info("loading %s in float32 (stored as %s)", source, dtype)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.eval()
    return model, dtype


def linear_input_sizes(model: torch.nn.Module, ignore: list[str] = IGNORE) -> dict[str, int]:
    """{name: in_features} of every Linear layer that will be quantized."""
    sizes = {name: module.in_features for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear)
             and not any(name == skip or name.endswith("." + skip) for skip in ignore)}
    if not sizes:
        raise QuiverError("the model has no Linear layers to quantize "
                          f"(besides {', '.join(ignore)})")
    return sizes


def weight_scheme(*, num_bits: int, symmetric: bool, group_size: int | None = None):
    """A weight-only int scheme over every Linear: per channel, or per group of K."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    strategy = "channel" if group_size is None else "group"
    weights = QuantizationArgs(num_bits=num_bits, type="int", strategy=strategy,
                               group_size=group_size, symmetric=symmetric, dynamic=False)
    return QuantizationScheme(targets=["Linear"], weights=weights)


def quantization_modifier(scheme):
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return QuantizationModifier(config_groups={"group_0": scheme}, ignore=list(IGNORE))


def guard_pin_memory() -> None:
    """llmcompressor 0.13-0.14 pins cached intermediates, which CPU-only torch refuses."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def quantize(model: torch.nn.Module, recipe: Any, dataset: Any = None, *,
             max_seq_length: int | None = None) -> None:
    """Run llmcompressor's `oneshot` in place (calibrating on `dataset` when given)."""
    from llmcompressor import oneshot

    guard_pin_memory()
    options: dict[str, Any] = {}
    if dataset is not None:
        options = {"dataset": dataset, "num_calibration_samples": len(dataset),
                   "shuffle_calibration_samples": False, "max_seq_length": max_seq_length,
                   "batch_size": 1}
    oneshot(model=model, recipe=recipe, **options)


def calibration_dataset(source: Path, texts: list[str], max_tokens: int):
    """`datasets.Dataset` of input_ids / attention_mask, each text cut to `max_tokens`."""
    from datasets import Dataset

    tokenizer = AutoTokenizer.from_pretrained(source)
    input_ids = [ids[:max_tokens] for ids in
                 (tokenizer(text)["input_ids"] for text in texts)]
    input_ids = [ids for ids in input_ids if len(ids) >= 2]
    if not input_ids:
        raise QuiverError("no calibration text with at least two tokens")
    return Dataset.from_dict({"input_ids": input_ids,
                              "attention_mask": [[1] * len(ids) for ids in input_ids]})


def save_artifact(model: torch.nn.Module, source: Path, out: Path, dtype: torch.dtype) -> None:
    """Cast back to the source dtype, save compressed, copy the tokenizer files."""
    model.to(dtype)
    model.config.dtype = dtype
    logger.info("saving compressed-tensors (%s, %s) to %s", FORMAT, dtype, out)
    model.save_pretrained(out, save_compressed=True)
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, Path(out) / name)


def describe_mappings(model: torch.nn.Module, mappings: list[Any]) -> list[dict[str, Any]]:
    """AWQ smoothing mappings as recorded in the manifest, with how many were applied.

    A mapping applies to a decoder layer when the smoothing layer's output size equals
    every balance layer's input size (e.g. v_proj -> o_proj is skipped under GQA).
    """
    modules = dict(model.named_modules())
    described = []
    for mapping in mappings:
        smooth_names = _matching(modules, mapping.smooth_layer)
        num_applied = 0
        for smooth_name in smooth_names:
            prefix = _layer_prefix(smooth_name)
            width = modules[smooth_name].weight.shape[0]
            balance = [name for pattern in mapping.balance_layers
                       for name in _matching(modules, pattern) if name.startswith(prefix)]
            if balance and all(modules[name].in_features == width for name in balance):
                num_applied += 1
        described.append({"smooth_layer": mapping.smooth_layer,
                          "balance_layers": list(mapping.balance_layers),
                          "num_applied": num_applied, "num_layers": len(smooth_names)})
    return described


def _layer_prefix(name: str) -> str:
    """`model.layers.3.` for any module inside decoder layer 3."""
    found = re.match(r"(.*\.layers\.\d+\.)", name)
    return found.group(1) if found else ""


def _matching(modules: dict[str, torch.nn.Module], pattern: str) -> list[str]:
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return [name for name in modules if regex.match(name)]
    return [name for name in modules if name == pattern or name.endswith("." + pattern)]
