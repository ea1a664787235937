"""The `quiver-model.json` marker: written last into a finished model dir, so its presence
means "complete and verified" and a second fetch or build can return at once."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MARKER_NAME = "quiver-model.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ModelMarker:
    name: str
    source: str
    source_sha256: str
    recipe_version: int
    verification: dict[str, object] = field(default_factory=dict)

    def write(self, model_dir: Path) -> None:
        text = json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"
        (model_dir / MARKER_NAME).write_text(text, encoding="utf-8")


def read_marker(model_dir: Path) -> ModelMarker | None:
    """The marker of a complete model dir, or None if the dir is missing, partial or stale."""
    path = model_dir / MARKER_NAME
    if not path.is_file() or not all((model_dir / f).is_file() for f in REQUIRED_FILES):
        return None
    try:
        return ModelMarker(**json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError):
        return None
