"""The bundled prompt set: one JSON object per line, `{"prompt": str, "max_tokens": int}`."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "data" / "prompts.jsonl"


@dataclass(frozen=True)
class Prompt:
    text: str
    max_tokens: int


@dataclass(frozen=True)
class PromptSet:
    prompts: tuple[Prompt, ...]

    def pick(self, rng: random.Random) -> Prompt:
        return rng.choice(self.prompts)

    def shortest(self, num_prompts: int) -> PromptSet:
        """The shortest prompts: the cache-friendly user's small, repeated set."""
        shortest = sorted(self.prompts, key=lambda p: len(p.text))
        return PromptSet(tuple(shortest[:num_prompts]))


def load_prompts(path: Path = DEFAULT_PROMPTS, max_tokens_cap: int | None = None) -> PromptSet:
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            text, max_tokens = str(item["prompt"]), int(item["max_tokens"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not a prompt line ({exc})") from exc
        if max_tokens_cap is not None:
            max_tokens = min(max_tokens, max_tokens_cap)
        prompts.append(Prompt(text=text, max_tokens=max_tokens))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return PromptSet(tuple(prompts))
