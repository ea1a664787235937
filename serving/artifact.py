"""What the server knows of the artifact it serves: `manifest.json`'s summary and gate.

`quiver optimize` writes the manifest (its schema is `optimize.manifest.Manifest`); the
server reads the few fields it needs as JSON, so serving stays below optimize. An artifact
whose quality gate failed (written with `--force`) is refused at start unless
`--allow-failed-gate`; `/v1/models` shows the summary (`quiver` on each model card) and
`/metrics` exports it (`quiver_server_artifact_info`,
`quiver_server_artifact_ppl_increase_percent`). A plain checkpoint has no manifest: its
summary says method `none`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from common.errors import QuiverError

MANIFEST = "manifest.json"


class FailedGateError(QuiverError):
    """The artifact failed its quality gate and the server was not told to serve it."""


@dataclass(frozen=True)
class ArtifactSummary:
    method: str = "none"
    format: str = "safetensors"
    metrics: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] | None = None

    @classmethod
    def read(cls, model_dir: Path | None) -> ArtifactSummary:
        path = Path(model_dir) / MANIFEST if model_dir is not None else None
        if path is None or not path.is_file():
            return cls()
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise QuiverError(f"{path} is not readable JSON: {exc}") from exc
        return cls(method=str(manifest.get("method", "none")),
                   format=str(manifest.get("format", "safetensors")),
                   metrics=dict(manifest.get("metrics") or {}),
                   gate=manifest.get("gate"))

    @property
    def gate_failed(self) -> bool:
        return self.gate is not None and self.gate.get("passed") is False

    @property
    def ppl_increase_percent(self) -> float | None:
        value = (self.gate or {}).get("ppl_increase")
        return float(value) if isinstance(value, int | float) else None

    def check_gate(self, model_dir: Path, *, allow_failed: bool) -> None:
        if not self.gate_failed or allow_failed:
            return
        gate = self.gate or {}
        raise FailedGateError(
            f"refusing to serve {model_dir}: its quality gate failed ("
            f"{'; '.join(self.missed_limits() or ['no limit recorded'])}"
            f"{'; written with --force' if gate.get('forced') else ''}); pass "
            "--allow-failed-gate to serve it anyway")

    def missed_limits(self) -> list[str]:
        """Each limit of the gate that the measurement missed, in words."""
        gate = self.gate or {}
        ppl, max_ppl = gate.get("ppl_increase"), gate.get("max_ppl_increase")
        drop, max_drop = gate.get("task_score_drop"), gate.get("max_task_score_drop")
        agreement, floor = gate.get("greedy_agreement"), gate.get("min_greedy_agreement")
        missed = []
        if ppl is not None and max_ppl is not None and ppl > max_ppl:
            missed.append(f"perplexity {ppl:+.2f} % over its source, {max_ppl:+.2f} % allowed")
        if drop is not None and max_drop is not None and drop > max_drop:
            missed.append(f"task score {drop:.2f} points below its source's, "
                          f"{max_drop:.2f} allowed")
        if agreement is not None and floor is not None and agreement < floor:
            missed.append(f"greedy agreement {agreement:.2f} %, {floor:.2f} % required")
        return missed

    def as_card(self) -> dict[str, Any]:
        """The `quiver` object of a `/v1/models` entry."""
        return {"method": self.method, "format": self.format, "metrics": self.metrics,
                "gate": self.gate}

    def register_metrics(self, registry: CollectorRegistry, *, model: str) -> None:
        gate = "none" if self.gate is None else ("failed" if self.gate_failed else "passed")
        Gauge("quiver_server_artifact_info", "The served artifact: optimization method, "
              "format and quality-gate verdict (always 1)",
              ["model_name", "method", "format", "gate"], registry=registry
              ).labels(model, self.method, self.format, gate).set(1)
        if self.ppl_increase_percent is not None:
            Gauge("quiver_server_artifact_ppl_increase_percent", "The served artifact's "
                  "perplexity increase over its source, percent (manifest.json)",
                  ["model_name"], registry=registry
                  ).labels(model).set(self.ppl_increase_percent)
