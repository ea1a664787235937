"""The pooler: chunked prompts pool like whole ones; preemption starts over; drop forgets."""

from __future__ import annotations

import torch

from serving.engine.outputs import ScheduledRequest
from serving.engine.pooler import Pooler
from serving.engine.sampling_params import SamplingParams


def chunk(start: int, num_tokens: int, *, last: bool, pooling: str = "mean"):
    return ScheduledRequest("e", [1] * num_tokens, start, [0], last,
                            SamplingParams(max_tokens=None, pooling=pooling))


def test_mean_over_chunks_is_the_mean_over_the_whole_prompt():
    states = torch.randn(10, 8)
    pooler = Pooler()
    assert pooler.pool(states[:6], {"e": (chunk(0, 6, last=False), 0, 6)}) == {}
    batch = torch.cat([torch.randn(3, 8), states[6:]])  # another request's rows come first
    [vector] = pooler.pool(batch, {"e": (chunk(6, 4, last=True), 3, 7)}).values()
    expected = torch.nn.functional.normalize(states.mean(0), dim=0)
    torch.testing.assert_close(torch.tensor(vector), expected)
    assert pooler.num_active == 0


def test_a_preempted_request_starts_its_sum_again():
    pooler = Pooler()
    pooler.pool(torch.full((4, 2), 100.0), {"e": (chunk(0, 4, last=False), 0, 4)})
    states = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    [vector] = pooler.pool(states, {"e": (chunk(0, 2, last=True), 0, 2)}).values()
    torch.testing.assert_close(torch.tensor(vector), torch.tensor([0.5**0.5, 0.5**0.5]))


def test_last_pooling_takes_the_last_token_and_drop_forgets_partial_sums():
    pooler = Pooler()
    states = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    [vector] = pooler.pool(states, {"e": (chunk(0, 2, last=True, pooling="last"), 0, 2)}
                           ).values()
    assert vector == [0.0, 1.0]
    pooler.pool(states, {"e": (chunk(0, 2, last=False), 0, 2)})
    assert pooler.num_active == 1
    pooler.drop(["e"])
    assert pooler.num_active == 0
