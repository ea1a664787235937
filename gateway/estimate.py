"""The up-front token estimate of a model call: what it may use at most, before any
tokenizer has seen it. Rate limits take it before the call and budgets reserve it; both
settle on the real usage afterwards.

- Prompt: characters / 4 (+1) of each prompt — a chat's `messages`, every prompt of a
  completions call (strings, or token ids counted one each), every input of an
  embeddings call — plus the `tools` / `functions` definitions and the `response_format`
  schema a chat template renders into the prompt.
- Completion: `max_completion_tokens` or `max_tokens` x `n` (or `best_of`, when larger) x
  the number of prompts. With neither, up to the model's context: the context length
  (configured `max_context_tokens`, else the replicas' `/v1/models` `max_model_len`) less
  the prompt, per sequence; `default_max_tokens` only when no context is known.
- Embeddings generate nothing: the estimate is the input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

CHARS_PER_TOKEN = 4
EMBEDDINGS_PATH = "/v1/embeddings"
PROMPT_FIELDS = ("tools", "functions", "response_format")  # rendered into a chat prompt


@dataclass(frozen=True)
class TokenEstimate:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def text_tokens(value: Any) -> int:
    """Characters / 4 (+1) of a string, or of any JSON value's compact text."""
    if isinstance(value, str):
        return len(value) // CHARS_PER_TOKEN + 1
    return len(json.dumps(value)) // CHARS_PER_TOKEN + 1


def prompt_tokens_each(prompt: Any) -> list[int]:
    """One estimate per prompt of a completions `prompt` or embeddings `input`: a string,
    a list of token ids, a list of strings, or a list of token-id lists."""
    if isinstance(prompt, str):
        return [text_tokens(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(item, int) for item in prompt):
            return [len(prompt)]
        return [len(item) if isinstance(item, list) else text_tokens(item) for item in prompt]
    return [text_tokens(prompt)] if prompt else [1]


def _positive_int(value: Any) -> int | None:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    return value if is_int and value > 0 else None


def estimate_tokens(body: dict[str, Any], path: str, *, default_max_tokens: int,
                    context_tokens: int | None) -> TokenEstimate:
    if path == EMBEDDINGS_PATH:
        return TokenEstimate(sum(prompt_tokens_each(body.get("input"))), 0)
    if "messages" in body:
        prompts = [text_tokens(body["messages"])
                   + sum(text_tokens(body[f]) for f in PROMPT_FIELDS if body.get(f))]
    else:
        prompts = prompt_tokens_each(body.get("prompt", ""))
    num_sequences = max(_positive_int(body.get("n")) or 1,
                        _positive_int(body.get("best_of")) or 1)
    max_tokens = (_positive_int(body.get("max_completion_tokens"))
                  or _positive_int(body.get("max_tokens")))
    completion = 0
    for prompt in prompts:
        if max_tokens is not None:
            per_sequence = max_tokens
        elif context_tokens is not None:
            per_sequence = max(1, context_tokens - prompt)
        else:
            per_sequence = default_max_tokens
        completion += per_sequence * num_sequences
    return TokenEstimate(sum(prompts), completion)
