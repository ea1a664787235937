"""Generate `loadtests/data/prompts.jsonl` from Python's bundled docs (`pydoc_data.topics`).

Run `python -m loadtests.make_prompts` to regenerate. Deterministic for one Python version:
prompt lengths follow a log-normal spread (median ~60 words, a long tail up to 700), as chat
traffic does, and each prompt carries its own `max_tokens` (median ~64) so that output
lengths vary too. No downloads: every machine with Python has this text.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from loadtests.prompts import DEFAULT_PROMPTS, Prompt

NUM_PROMPTS = 240
SEED = 9
INSTRUCTIONS = (
    "Summarize the following passage from the Python documentation.",
    "Explain the following text to a new Python programmer.",
    "List the key points of this documentation excerpt.",
    "Write one question a reader could ask about this text, then answer it.",
    "Rewrite this passage in plain language.",
)


def corpus_words() -> list[list[str]]:
    from pydoc_data.topics import topics

    return [topics[name].split() for name in sorted(topics) if len(topics[name].split()) > 40]


def draw_length(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, round(rng.lognormvariate(0.0, sigma) * median)))


def make_prompts(num_prompts: int = NUM_PROMPTS, seed: int = SEED) -> list[Prompt]:
    rng = random.Random(seed)
    documents = corpus_words()
    prompts = []
    for index in range(num_prompts):
        num_words = draw_length(rng, median=60, sigma=0.9, low=8, high=700)
        words = rng.choice(documents)
        start = rng.randrange(max(1, len(words) - num_words))
        excerpt = " ".join(words[start:start + num_words])
        instruction = INSTRUCTIONS[index % len(INSTRUCTIONS)]
        max_tokens = draw_length(rng, median=64, sigma=0.6, low=8, high=256)
        prompts.append(Prompt(text=f"{instruction}\n\n{excerpt}", max_tokens=max_tokens))
    return prompts


def write_prompts(prompts: list[Prompt], path: Path) -> None:
    lines = [json.dumps({"prompt": p.text, "max_tokens": p.max_tokens}) for p in prompts]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_PROMPTS)
    parser.add_argument("--num-prompts", type=int, default=NUM_PROMPTS)
    args = parser.parse_args()
    prompts = make_prompts(args.num_prompts)
    write_prompts(prompts, args.out)
    print(f"wrote {len(prompts)} prompts to {args.out}")


if __name__ == "__main__":
    main()
