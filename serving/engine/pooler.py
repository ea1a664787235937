"""Embeddings from the model's final hidden states, one embedding request at a time.

An embedding request runs its prompt through the model like any prefill (chunked, batched
with generation), samples nothing, and ends once its last chunk has run. `Pooler.pool`
takes each such request's rows of the step's hidden states: `mean` adds them up across
chunks (the scheduler computes every token of these requests: no prefix-cache reuse),
`last` keeps the last token's; at the last chunk the vector is L2-normalised and handed
out. A preempted request starts again from position 0, which resets its sum; a finished
or aborted one is forgotten by `drop`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from serving.engine.outputs import ScheduledRequest


@dataclass
class _Sum:
    total: torch.Tensor
    num_tokens: int


class Pooler:
    def __init__(self) -> None:
        self._sums: dict[str, _Sum] = {}

    def pool(self, hidden_states: torch.Tensor,
             rows: dict[str, tuple[ScheduledRequest, int, int]]) -> dict[str, list[float]]:
        """`rows`: per embedding request in the step, its `[start, end)` rows of
        `hidden_states`; returns the finished ones' embeddings."""
        pooled = {}
        for request_id, (request, start, end) in rows.items():
            states = hidden_states[start:end].float()
            if request.sampling_params.pooling == "last":
                vector = states[-1]
            else:
                vector = self._add(request, states)
            if request.is_last_chunk:
                pooled[request_id] = torch.nn.functional.normalize(vector, dim=0).tolist()
                self._sums.pop(request_id, None)
        return pooled

    def _add(self, request: ScheduledRequest, states: torch.Tensor) -> torch.Tensor:
        current = self._sums.get(request.request_id)
        if current is None or request.start_position == 0:
            current = self._sums[request.request_id] = _Sum(states.sum(0), 0)
        else:
            current.total += states.sum(0)
        current.num_tokens += len(states)
        return current.total / current.num_tokens

    def drop(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._sums.pop(request_id, None)

    @property
    def num_active(self) -> int:
        return len(self._sums)
