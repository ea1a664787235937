"""Calibration and evaluation text.

Default: Python's bundled documentation (`pydoc_data.topics`), split deterministically into
calibration and held-out evaluation passages (`common.corpus`). `--calib-data` /
`--eval-data` take a text file (passages separated by blank lines) or JSONL (one object per
line with a `text` field).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.corpus import documents
from common.errors import QuiverError

DEFAULT_SOURCE = "pydoc_data.topics"


@dataclass(frozen=True)
class TextSet:
    name: str            # what the manifest's `eval_data` says
    texts: list[str]


def load_texts(path: Path | None, split: str, *, limit: int | None = None) -> TextSet:
    """The `split` ("calibration" | "evaluation") of the default corpus, or a user file."""
    if path is None:
        texts = list(documents(split))
        name = f"{DEFAULT_SOURCE}:{split}"
    else:
        texts = _read_file(Path(path))
        name = str(path)
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise QuiverError(f"no text found in {name}")
    return TextSet(name=name, texts=texts)


def _read_file(path: Path) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise QuiverError(f"cannot read {path}: {exc.strerror}") from exc
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise QuiverError(f"{path}:{number} is not JSON: {exc}") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise QuiverError(f"{path}:{number} has no string field `text`")
            texts.append(record["text"])
        return texts
    return [part.strip() for part in raw.split("\n\n") if part.strip()]


def token_ids(model_dir: Path, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Each text's first `max_tokens` token ids (texts shorter than 2 tokens dropped)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = [tokenizer(text)["input_ids"][:max_tokens] for text in texts]
    return [ids for ids in encoded if len(ids) >= 2]
