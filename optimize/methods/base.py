"""The contract every optimization method keeps.

A method adds its own CLI options; it may define `check_host(args)`, which the pipeline
calls before anything is measured or written and which raises `HostRequirementError` when
the machine lacks what the method needs (a GPU, a library). Then `build(context)` writes a
complete, servable artifact into `context.out` (a staging dir the pipeline renames into
place only after the artifact is measured and passes the quality gate) and returns the
`params` recorded in the manifest. It never writes `manifest.json` itself and never
touches the final `--out` path.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from common.errors import QuiverError
from optimize.data import TextSet
from optimize.manifest import Format


class HostRequirementError(QuiverError):
    """This host lacks what the method needs; checked first, so nothing was written."""

    exit_code = 3


@dataclass(frozen=True)
class BuildContext:
    source: Path               # an HF safetensors dir (a GGUF source is converted first)
    out: Path                  # empty staging dir to fill
    calibration: TextSet       # calibration text
    args: argparse.Namespace   # every option, the method's own included
    work_dir: Path             # scratch space, removed afterwards


@dataclass(frozen=True)
class BuildResult:
    format: Format
    params: dict[str, Any]
    # Extra manifest metrics a method measures itself (e.g. ONNX logit parity).
    metrics: dict[str, Any] | None = None
    # Where the artifact's own evaluation should happen, when not `out` itself.
    eval_dir: Path | None = None


class Method(Protocol):
    name: str
    summary: str
    # The default of --max-ppl-increase for this method, in percent; None: no default gate.
    default_max_ppl_increase: float | None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def build(self, context: BuildContext) -> BuildResult: ...
