"""The quality gate: an artifact is written only when it is no worse than its limits allow.

Three limits, each off when None, each recorded in the manifest's `gate` next to what was
measured (`optimize.manifest.Gate`):

- `max_ppl_increase` (percent; `--max-ppl-increase`, a default per method): the artifact's
  perplexity over its source's;
- `max_task_score_drop` (points out of 100; `--max-task-score-drop`): how far the
  artifact's exact-match task score (`optimize.tasks`) may fall below its source's;
- `min_greedy_agreement` (points out of 100; `--min-greedy-agreement`): the least share of
  the source's greedy tokens the artifact must reproduce.

The task limits need the task score, so they cannot be combined with `--no-tasks`. A
failed gate raises `QualityGateError` (exit 4) naming every limit missed and by how much,
unless `force`: then the manifest says `passed: false, forced: true` and `quiver serve`
refuses the artifact without `--allow-failed-gate`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

from common.errors import QuiverError
from optimize.evaluate import EvalResult
from optimize.manifest import Gate
from optimize.tasks import TaskComparison

logger = logging.getLogger(__name__)


class QualityGateError(QuiverError):
    """The artifact is worse than the gate allows; nothing was written."""

    exit_code = 4


@dataclass(frozen=True)
class GateLimits:
    max_ppl_increase: float | None = None
    max_task_score_drop: float | None = None
    min_greedy_agreement: float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace,
                  default_max_ppl_increase: float | None) -> GateLimits:
        """The limits a run was given (`--max-ppl-increase` falls back to the method's)."""
        ppl = args.max_ppl_increase
        limits = cls(max_ppl_increase=default_max_ppl_increase if ppl is None else ppl,
                     max_task_score_drop=args.max_task_score_drop,
                     min_greedy_agreement=args.min_greedy_agreement)
        if limits.needs_tasks and not args.tasks:
            raise QuiverError("--max-task-score-drop and --min-greedy-agreement gate on the "
                              "task score, which --no-tasks skips: drop one or the other")
        return limits

    @property
    def needs_tasks(self) -> bool:
        return self.max_task_score_drop is not None or self.min_greedy_agreement is not None


def check_gate(limits: GateLimits, baseline: EvalResult, measured: EvalResult,
               tasks: TaskComparison | None = None, *, force: bool) -> Gate:
    """The gate's verdict; `QualityGateError` when a limit is missed and `force` is off."""
    increase = round((measured.perplexity / baseline.perplexity - 1.0) * 100.0, 4)
    drop = task_score_drop(tasks)
    agreement = tasks.greedy_agreement if tasks is not None else None
    if limits.needs_tasks and (drop is None or agreement is None):
        raise QuiverError("the task gate needs the task score of the artifact and of its "
                          "source, and it was not measured")
    missed = [*_ppl_missed(limits, increase, baseline, measured),
              *_task_missed(limits, drop, agreement, tasks)]
    gate = Gate(max_ppl_increase=limits.max_ppl_increase, ppl_increase=increase,
                max_task_score_drop=limits.max_task_score_drop, task_score_drop=drop,
                min_greedy_agreement=limits.min_greedy_agreement,
                greedy_agreement=agreement, passed=not missed)
    if not missed:
        return gate
    message = "quality gate failed: " + "; ".join(missed)
    if force:
        logger.warning("%s; writing it anyway (--force): `quiver serve` will refuse it "
                       "without --allow-failed-gate", message)
        return gate.model_copy(update={"forced": True})
    raise QualityGateError(message + "; nothing written (--force writes it anyway, "
                           "--max-ppl-increase, --max-task-score-drop and "
                           "--min-greedy-agreement change the limits)")


def task_score_drop(tasks: TaskComparison | None) -> float | None:
    """Points the artifact's task score lies below its source's (negative: above)."""
    if tasks is None or tasks.baseline_score is None:
        return None
    return round(tasks.baseline_score - tasks.score, 2)


def _ppl_missed(limits: GateLimits, increase: float, baseline: EvalResult,
                measured: EvalResult) -> list[str]:
    limit = limits.max_ppl_increase
    if limit is None or increase <= limit:
        return []
    return [f"perplexity {measured.perplexity:.4f} is {increase:+.2f} % over the baseline "
            f"{baseline.perplexity:.4f}, beyond the allowed {limit:+.2f} % "
            f"(by {increase - limit:.2f} points)"]


def _task_missed(limits: GateLimits, drop: float | None, agreement: float | None,
                 tasks: TaskComparison | None) -> list[str]:
    missed = []
    limit = limits.max_task_score_drop
    if limit is not None and drop is not None and tasks is not None and drop > limit:
        missed.append(f"task score {tasks.score:.2f} is {drop:.2f} points below the "
                      f"baseline {tasks.baseline_score:.2f}, beyond the allowed "
                      f"{limit:.2f} points (by {drop - limit:.2f} points)")
    floor = limits.min_greedy_agreement
    if floor is not None and agreement is not None and agreement < floor:
        missed.append(f"greedy agreement {agreement:.2f} % is below the required "
                      f"{floor:.2f} % (by {floor - agreement:.2f} points)")
    return missed
