"""Local English text every machine has: Python's bundled documentation topics.

Used to train the tiny model's tokenizer and, later, as calibration and evaluation text. The
split is deterministic: topics sorted by name, cut into passages of whole paragraphs of about
2,000 characters, duplicates dropped, every fifth passage held out for evaluation (topics
vary wildly in length, so a split by topic would leave a held-out part of a few percent).
"""

from __future__ import annotations

from collections.abc import Iterator

HELD_OUT_EVERY = 5
PASSAGE_CHARS = 2000
SPLITS = ("all", "calibration", "evaluation")


def _passages(text: str) -> Iterator[str]:
    current: list[str] = []
    size = 0
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= PASSAGE_CHARS:
            yield "\n\n".join(current)
            current, size = [], 0
    if current:
        yield "\n\n".join(current)


def documents(split: str = "all") -> Iterator[str]:
    """Yield the passages of a split: "calibration", "evaluation" or "all"."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use {', '.join(SPLITS)}")
    from pydoc_data.topics import topics

    passages = (p for _, text in sorted(topics.items()) for p in _passages(text))
    # Some topics repeat whole sections of others: keep the first copy only, so no held-out
    # passage also appears in the calibration part.
    unique = dict.fromkeys(passages)
    for index, passage in enumerate(unique):
        held_out = index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
        if split == "all" or held_out == (split == "evaluation"):
            yield passage
