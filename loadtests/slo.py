"""Service-level objectives: the YAML file, and checking a run's metrics against it."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from loadtests.errors import SloFileError
from loadtests.results import RunMetrics

DEFAULT_SLO = Path(__file__).resolve().parent / "slo.yaml"


@dataclass(frozen=True)
class Slo:
    p95_ttft_ms: float | None = None
    p99_latency_ms: float | None = None
    max_error_ratio: float | None = None
    min_output_tokens_per_s: float | None = None
    max_tenant_p95_ttft_ms: float | None = None           # every tenant's p95 TTFT
    min_follow_up_cache_hit_share: float | None = None    # conversations' follow-up turns


SLO_KEYS = tuple(f.name for f in fields(Slo))
UNITS = {"p95_ttft_ms": "ms", "p99_latency_ms": "ms", "max_error_ratio": "",
         "min_output_tokens_per_s": "tokens/s", "max_tenant_p95_ttft_ms": "ms",
         "min_follow_up_cache_hit_share": ""}
RATIOS = ("max_error_ratio", "min_follow_up_cache_hit_share")


@dataclass(frozen=True)
class SloCheck:
    key: str
    limit: float
    measured: float | None      # None: the run has no data for it (a breach)
    is_minimum: bool            # the measured value must be >= limit (else <=)

    @property
    def passed(self) -> bool:
        if self.measured is None:
            return False
        return self.measured >= self.limit if self.is_minimum else self.measured <= self.limit

    def describe(self) -> str:
        unit = UNITS[self.key]
        relation = ">=" if self.is_minimum else "<="
        if self.measured is None:
            return f"{self.key}: no data in this run (limit {relation} {self.limit:g}{unit})"
        verdict = "ok" if self.passed else "BREACHED"
        text = (f"{self.key}: {self.measured:.4g}{unit} (limit {relation} {self.limit:g}{unit})"
                f" {verdict}")
        if not self.passed:
            excess = abs(self.measured - self.limit)
            ratio = f", {excess / self.limit:.0%}" if self.limit else ""
            text += f" by {excess:.4g}{unit}{ratio}"
        return text


def parse_value(key: str, value: object, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise SloFileError(f"{source}: {key} must be a number, got {value!r}")
    if value < 0:
        raise SloFileError(f"{source}: {key} must not be negative, got {value!r}")
    if key in RATIOS and value > 1:
        raise SloFileError(f"{source}: {key} is a ratio in [0, 1], got {value!r}")
    return float(value)


def parse_slo(text: str, source: str = "SLO") -> Slo:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SloFileError(f"{source} is not valid YAML: {exc}") from exc
    if data is None:
        return Slo()
    if not isinstance(data, dict):
        raise SloFileError(f"{source} must be a mapping of SLO keys, got {type(data).__name__}")
    unknown = sorted(str(key) for key in data if key not in SLO_KEYS)
    if unknown:
        raise SloFileError(f"{source}: unknown SLO key(s) {', '.join(unknown)}; "
                           f"known keys: {', '.join(SLO_KEYS)}")
    values = {key: parse_value(key, value, source) for key, value in data.items()
              if value is not None}
    return Slo(**values)


def load_slo(path: Path) -> Slo:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SloFileError(f"cannot read SLO file {path}: {exc.strerror or exc}") from exc
    return parse_slo(text, str(path))


def check_slo(slo: Slo, metrics: RunMetrics) -> list[SloCheck]:
    measured = {"p95_ttft_ms": metrics.p95_ttft_ms, "p99_latency_ms": metrics.p99_latency_ms,
                "max_error_ratio": metrics.error_ratio,
                "min_output_tokens_per_s": metrics.output_tokens_per_s,
                "max_tenant_p95_ttft_ms": metrics.max_tenant_p95_ttft_ms,
                "min_follow_up_cache_hit_share": metrics.follow_up_cache_hit_share}
    return [SloCheck(key=key, limit=limit, measured=measured[key],
                     is_minimum=key.startswith("min_"))
            for key in SLO_KEYS if (limit := getattr(slo, key)) is not None]


def breach_message(checks: list[SloCheck]) -> str | None:
    """One line naming every failed SLO, or None when all passed."""
    failed = [check.describe() for check in checks if not check.passed]
    return f"SLO breached: {'; '.join(failed)}" if failed else None
