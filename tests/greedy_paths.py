"""Comparing greedy paths of two implementations whose arithmetic differs.

Two kernels that read the same weights (vLLM's and ours, int4 and its dequantized twin,
bf16 on AMX and on AVX2) accumulate in different orders, so their logits differ in the last
bits. A greedy path then follows both exactly until a step whose top two candidates are
nearly tied; there one side may take the other candidate, and from that token on the two
contexts differ and nothing more can be compared. Which hosts see which flip depends on the
CPU's instruction set, so "identical for 16 tokens" is not a property of the code.

What *is* a property of the code, and what this module checks:
- along the shared prefix both sides give the chosen token nearly the same logprob
  (`logprob_tolerance`), and
- where the paths part, the step was a near-tie for *both* sides: each side's own choice
  and the other side's choice are within `near_tie` nats of each other in that side's
  top candidates.
A misread format (wrong packing, scales on the wrong axis) gives a different distribution:
its first token differs with a clear margin, or the shared prefix's logprobs disagree.

Where one side reports tokens only (the ONNX engine has no logprobs), its steps come from
`tokens_only` and only the other side's view is checked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class GreedyStep:
    """One greedy step: the chosen token, its logprob and the top candidates, best first."""

    token_id: int
    logprob: float | None  # None: this side reported no logprobs
    top: tuple[tuple[int, float], ...]

    def logprob_of(self, token_id: int) -> float | None:
        return next((lp for tid, lp in self.top if tid == token_id), None)


def steps_from(token_ids: Sequence[int], logprobs: Iterable) -> list[GreedyStep]:
    """Steps from token ids and the engine's `Logprobs` records (sampled + top)."""
    return [GreedyStep(token_id, lp.sampled_logprob, tuple(map(tuple, lp.top_logprobs)))
            for token_id, lp in zip(token_ids, logprobs, strict=True)]


def tokens_only(token_ids: Sequence[int]) -> list[GreedyStep]:
    return [GreedyStep(token_id, None, ()) for token_id in token_ids]


def steps_from_logits(token_ids: Sequence[int], logits: Sequence, num_top: int = 5
                      ) -> list[GreedyStep]:
    """Steps from each step's logits `[vocab]` (torch tensors)."""
    steps = []
    for token_id, row in zip(token_ids, logits, strict=True):
        logprobs = row.float().log_softmax(-1)
        values, ids = logprobs.topk(num_top)
        steps.append(GreedyStep(int(token_id), float(logprobs[token_id]),
                                tuple(zip(ids.tolist(), values.tolist(), strict=True))))
    return steps


def path_problems(reference: Sequence[GreedyStep], other: Sequence[GreedyStep], *,
                  near_tie: float, logprob_tolerance: float) -> list[str]:
    """Why `other` cannot be the same model computed with different rounding as
    `reference` (empty when it can). Paths of unequal length are compared as far as both go."""
    problems = []
    for index, (ours, theirs) in enumerate(zip(reference, other, strict=False)):
        if ours.token_id == theirs.token_id:
            if ours.logprob is None or theirs.logprob is None:
                continue
            if abs(ours.logprob - theirs.logprob) > logprob_tolerance:
                problems.append(f"step {index}: token {ours.token_id} has logprob "
                                f"{ours.logprob:.3f} vs {theirs.logprob:.3f} (tolerance "
                                f"{logprob_tolerance})")
            continue
        for name, side, own, alt in (("reference", ours, ours.token_id, theirs.token_id),
                                     ("other", theirs, theirs.token_id, ours.token_id)):
            if side.logprob is None:
                continue
            alt_logprob = side.logprob_of(alt)
            if alt_logprob is None:
                problems.append(f"step {index}: {name} chose {own} and does not have "
                                f"{alt} among its top {len(side.top)}")
            elif side.logprob - alt_logprob > near_tie:
                problems.append(f"step {index}: {name} prefers {own} over {alt} by "
                                f"{side.logprob - alt_logprob:.3f} nats (near-tie margin "
                                f"{near_tie}): not a near-tie")
        break  # the contexts differ from here on
    return problems


def first_divergence(reference: Sequence[GreedyStep], other: Sequence[GreedyStep]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(reference, other, strict=False))
                 if a.token_id != b.token_id), None)


# How far two kernels may disagree, in nats. bf16 keeps 8 significant bits: a logit near 16
# is resolved to 0.125, and kernels accumulating in different orders land a few ulps apart.
# Measured (Zen 4, AVX-512 BF16: vLLM's WNA16 vs our int4pack_mm on SmolLM2 W4A16, and
# bf16 vs bf16): shared-prefix logprobs within 0.15, every parting step a tie at a gap of
# 0 to 0.25; a misread packing differs by whole nats from the first token.
BF16_KERNELS = {"near_tie": 0.5, "logprob_tolerance": 0.35}
# fp32 kernels (MKL, oneDNN, MLAS, vLLM's) agree to ~1e-5 nats.
FP32_KERNELS = {"near_tie": 0.05, "logprob_tolerance": 0.02}
