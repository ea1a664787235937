"""Check that a model dir is usable: a Llama-family config, finite logits, a real answer."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common.families import LLAMA_FAMILY
from quiver.errors import VerificationError

logger = logging.getLogger(__name__)

DEFAULT_QUESTION = "What is the capital of France?"


@dataclass(frozen=True)
class VerificationResult:
    model_type: str
    num_parameters: int
    question: str
    answer: str
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VerificationError(f"{path} is missing or not valid JSON: {exc}") from exc
    model_type = config.get("model_type")
    if model_type not in LLAMA_FAMILY:
        raise VerificationError(
            f"{path}: model_type {model_type!r} is not one Quiver serves "
            f"({', '.join(sorted(LLAMA_FAMILY))})"
        )
    return config


def greedy_answer(model_dir: Path, question: str, max_new_tokens: int = 24) -> tuple[str, int]:
    """Greedy chat answer from transformers (the reference implementation) and param count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    messages = [{"role": "user", "content": question}]
    input_ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids).logits
        if not torch.isfinite(logits).all():
            raise VerificationError(f"{model_dir}: the model produces non-finite logits")
        output = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False)
    answer = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
    return answer.strip(), sum(p.numel() for p in model.parameters())


def verify_model_dir(
    model_dir: Path, *, question: str = DEFAULT_QUESTION, expect_substring: str | None = None
) -> VerificationResult:
    start = time.perf_counter()
    config = read_config(model_dir)
    answer, num_parameters = greedy_answer(model_dir, question)
    if not answer:
        raise VerificationError(f"{model_dir}: greedy generation produced no text")
    if expect_substring is not None and expect_substring not in answer:
        raise VerificationError(
            f"{model_dir}: asked {question!r}, expected {expect_substring!r} in the answer, "
            f"got {answer!r}"
        )
    result = VerificationResult(config["model_type"], num_parameters, question, answer,
                                round(time.perf_counter() - start, 2))
    logger.info("verified %s: %r -> %r", model_dir, question, answer)
    return result
