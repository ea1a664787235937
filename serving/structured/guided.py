"""Guided decoding in the batched sampler: one grammar matcher per constrained request.

Constrained and free requests share a batch: for the rows whose `SamplingParams.guide` is
set, `GuidedDecoding.mask` fills one token bitmask per row (which tokens the grammar allows
next) and sets every other logit to -inf, in place; the other rows are untouched. After
sampling, `accept` advances each row's matcher by its token. A preempted request keeps its
matcher (its tokens were accepted once, and recomputation samples nothing again); a
finished one is dropped with the sampler's other per-request state.

When a grammar is complete only its stop tokens (the model's EOS) are allowed, so the
request ends with `finish_reason: stop`; `max_tokens` can still cut it short (`length`),
as in OpenAI's API. A request that goes on past its grammar's end (`ignore_eos`, or
`min_tokens` not reached) keeps being allowed only the stop tokens. A matcher that fails
(an xgrammar error) is logged and its row restricted to the stop tokens too: one request's
grammar must never take the engine loop down.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from serving.structured.compiler import GuideCompiler, import_xgrammar
from serving.structured.spec import GuideSpec

logger = logging.getLogger(__name__)


class GuidedDecoding:
    def __init__(self, compiler: GuideCompiler) -> None:
        self.compiler = compiler
        self._xgr = import_xgrammar()
        self._matchers: dict[str, Any] = {}
        self._bitmask = self._xgr.allocate_token_bitmask(1, compiler.vocab_size)

    @property
    def num_active(self) -> int:
        return len(self._matchers)

    def mask(self, logits: torch.Tensor, request_ids: Sequence[str],
             guides: Sequence[GuideSpec | None]) -> list[int]:
        """Mask disallowed tokens of the guided rows of `logits` `[rows, vocab]` in place;
        returns the indices of the guided rows."""
        rows = [i for i, guide in enumerate(guides) if guide is not None]
        if not rows:
            return rows
        if self._bitmask.shape[0] < len(logits):
            self._bitmask = self._xgr.allocate_token_bitmask(len(logits),
                                                             self.compiler.vocab_size)
        bitmask = self._bitmask[: len(logits)]
        for row in rows:
            self._fill(bitmask, row, request_ids[row], guides[row])
        vocab = min(logits.shape[1], self.compiler.vocab_size)
        self._xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, indices=rows)
        if logits.shape[1] > vocab:  # padded embedding rows are never valid under a grammar
            logits[rows, vocab:] = float("-inf")
        return rows

    def accept(self, request_ids: Sequence[str], token_ids: Sequence[int],
               rows: Iterable[int]) -> None:
        for row in rows:
            matcher = self._matchers.get(request_ids[row])
            if matcher is None or matcher.is_terminated():
                continue
            try:
                is_accepted = matcher.accept_token(int(token_ids[row]))
            except Exception:  # as in `_fill`: never the engine loop
                logger.exception("request %s: its grammar failed", request_ids[row])
                continue
            if not is_accepted:
                logger.error("request %s: token %d was sampled under a grammar that does "
                             "not allow it", request_ids[row], token_ids[row])

    def drop(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._matchers.pop(request_id, None)

    def _fill(self, bitmask: torch.Tensor, row: int, request_id: str, guide: GuideSpec) -> None:
        try:
            matcher = self._matcher(request_id, guide)
            if not matcher.is_terminated():
                matcher.fill_next_token_bitmask(bitmask, row)
                return
        except Exception:  # the request ends at its EOS rather than the engine at an error
            logger.exception("request %s: its grammar failed; only EOS is allowed now",
                             request_id)
        self._allow_only_stop_tokens(bitmask, row)

    def _allow_only_stop_tokens(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = 0
        for token_id in self.compiler.tokenizer_info.stop_token_ids:
            bitmask[row, token_id // 32] |= _bit(token_id % 32)

    def _matcher(self, request_id: str, guide: GuideSpec) -> Any:
        matcher = self._matchers.get(request_id)
        if matcher is None:
            matcher = self._xgr.GrammarMatcher(self.compiler.compile(guide))
            self._matchers[request_id] = matcher
        return matcher


def _bit(position: int) -> int:
    """Bit `position` of a bitmask word (int32: bit 31 is the sign bit)."""
    return -(1 << 31) if position == 31 else 1 << position
