"""`manifest.json`: what an artifact is, where it came from, and how it measured.

Fields (DESIGN.md): `format` (safetensors | compressed-tensors | onnx | tensorrt), `method`,
`params`, `source` {path, sha256}, `metrics` {perplexity, baseline_perplexity, size_bytes,
decode_tokens_per_s, eval_data, task_suite, task_items, task_score, baseline_task_score,
task_scores, baseline_task_scores, greedy_agreement, ...}, `gate` {max_ppl_increase,
ppl_increase, max_task_score_drop, task_score_drop, min_greedy_agreement, greedy_agreement,
passed, forced}, `created_at`, `quiver_version`. `quiver serve` picks its engine from
`format` and refuses an artifact whose gate failed (`serving/artifact.py` reads it there,
as JSON).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from common import __version__

MANIFEST = "manifest.json"
Format = Literal["safetensors", "compressed-tensors", "onnx", "tensorrt"]
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx.data", ".data", ".gguf", ".engine", ".bin")


class Source(BaseModel):
    path: str
    sha256: str


class Metrics(BaseModel):
    model_config = ConfigDict(extra="allow")

    perplexity: float | None = None
    baseline_perplexity: float | None = None
    size_bytes: int | None = None
    baseline_size_bytes: int | None = None
    decode_tokens_per_s: float | None = None
    baseline_decode_tokens_per_s: float | None = None
    eval_data: str | None = None
    eval_tokens: int | None = None
    # The task score (`optimize.tasks`, points out of 100; None when skipped): exact match
    # of the artifact and of its source on the suite's items, per task too, and how much of
    # the source's greedy continuations the artifact reproduces.
    task_suite: str | None = None
    task_items: int | None = None
    task_score: float | None = None
    baseline_task_score: float | None = None
    task_scores: dict[str, float] | None = None
    baseline_task_scores: dict[str, float] | None = None
    greedy_agreement: float | None = None

    @property
    def ppl_increase_percent(self) -> float | None:
        if self.perplexity is None or not self.baseline_perplexity:
            return None
        return (self.perplexity / self.baseline_perplexity - 1.0) * 100.0


class Gate(BaseModel):
    """The quality gate the artifact was built under (`optimize.gate`): each limit (None:
    not gated) next to what was measured, whether every limit held, and whether `--force`
    wrote it although one did not. The allowed perplexity increase is in percent; the task
    score drop (source's exact-match score minus the artifact's) and the greedy agreement
    are in points out of 100, None when the task score was not measured."""

    max_ppl_increase: float | None
    ppl_increase: float | None
    max_task_score_drop: float | None = None
    task_score_drop: float | None = None
    min_greedy_agreement: float | None = None
    greedy_agreement: float | None = None
    passed: bool
    forced: bool = False


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: Format
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    source: Source
    metrics: Metrics = Field(default_factory=Metrics)
    gate: Gate | None = None
    created_at: str = Field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                  time.gmtime()))
    quiver_version: str = __version__

    def write(self, model_dir: Path) -> Path:
        path = Path(model_dir) / MANIFEST
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def read(cls, model_dir: Path) -> Manifest | None:
        path = Path(model_dir) / MANIFEST
        if not path.is_file():
            return None
        return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))


def weight_files(model_dir: Path) -> list[Path]:
    """The files that hold a model's weights (what `size_bytes` and `sha256` cover)."""
    model_dir = Path(model_dir)
    if model_dir.is_file():
        return [model_dir]
    return sorted(p for p in model_dir.rglob("*")
                  if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def size_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in weight_files(model_dir))


def sha256_of(model_dir: Path) -> str:
    """One digest over every weight file's relative name and bytes, in sorted order."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for path in weight_files(model_dir):
        name = path.name if model_dir.is_file() else str(path.relative_to(model_dir))
        digest.update(name.encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
