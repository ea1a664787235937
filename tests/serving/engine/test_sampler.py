"""The batched sampler: penalties, filters, seeds and logprobs against slow references."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.engine import SamplingParams
from serving.engine import sampler as sampler_module
from serving.engine.sampler import Sampler, SamplingRow, apply_penalties, apply_top_p

INF = float("inf")


def make_row(request_id: str = "r", prompt=(), output=(), **kwargs) -> SamplingRow:
    return SamplingRow(request_id, SamplingParams(**kwargs), tuple(prompt), tuple(output))


def sample_many(logits: list[float], num_draws: int = 3000, **kwargs) -> Counter[int]:
    """Draw `num_draws` tokens from one row repeated across a batch (unseeded)."""
    batch = torch.tensor([logits]).repeat(num_draws, 1)
    rows = [make_row(f"r{i}", **kwargs) for i in range(num_draws)]
    return Counter(Sampler()(batch, rows).token_ids)


def seeded_counts(probs: list[float], num_draws: int = 4000, **kwargs) -> list[int]:
    """Token counts of `num_draws` requests seeded 0..num_draws-1, one draw each."""
    batch = torch.tensor([probs]).log().repeat(num_draws, 1)
    rows = [make_row(f"r{i}", seed=i, **kwargs) for i in range(num_draws)]
    counts = Counter(Sampler()(batch, rows).token_ids)
    return [counts[t] for t in range(len(probs))]


def chi_square(counts: list[int], probs: list[float]) -> float:
    total = sum(counts)
    return sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, probs, strict=True))


def reference_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Element by element, in float32 like the sampler."""
    out = logits.clone()
    for b, row in enumerate(rows):
        seen = set(row.prompt_token_ids) | set(row.output_token_ids)
        counts = Counter(row.output_token_ids)
        repetition, frequency, presence = torch.tensor(
            [
                row.params.repetition_penalty,
                row.params.frequency_penalty,
                row.params.presence_penalty,
            ]
        )
        for t in range(logits.shape[1]):
            x = out[b, t]
            if t in seen:
                x = x / repetition if x > 0 else x * repetition
            x = x - frequency * counts[t]
            if counts[t]:
                x = x - presence
            out[b, t] = x
    return out


# --- greedy and penalties -------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"top_k": 1, "seed": 3}])
def test_greedy_takes_the_argmax(kwargs):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    rows = [make_row(f"r{i}", **kwargs) for i in range(6)]
    sampler = Sampler()
    first = sampler(logits, rows).token_ids
    assert first == logits.argmax(-1).tolist()
    assert sampler(logits, rows).token_ids == first


def test_penalties_match_the_reference():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 40, generator=gen) * 3
    tokens = torch.randint(0, 40, (5, 2, 12), generator=gen).tolist()
    penalties = [
        {"repetition_penalty": 1.5},
        {"frequency_penalty": 0.7, "presence_penalty": -0.4},
        {"repetition_penalty": 0.8, "frequency_penalty": -1.0, "presence_penalty": 2.0},
        {},
        {"presence_penalty": 1.0},
    ]
    rows = [
        make_row(f"r{i}", prompt=p[: 5 + i], output=o[: 2 * i], **kw)
        for i, ((p, o), kw) in enumerate(zip(tokens, penalties, strict=True))
    ]
    expected = reference_penalties(logits, rows)
    assert torch.equal(apply_penalties(logits.clone(), rows), expected)
    # Greedy rows sample the argmax of the penalised logits.
    greedy_rows = [
        make_row(r.request_id, r.prompt_token_ids, r.output_token_ids, temperature=0.0, **kw)
        for r, kw in zip(rows, penalties, strict=True)
    ]
    assert Sampler()(logits, greedy_rows).token_ids == expected.argmax(-1).tolist()


def test_repetition_penalty_steers_greedy_away_from_repeats():
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.1]])
    assert Sampler()(logits, [make_row(temperature=0.0, prompt=[0])]).token_ids == [0]
    row = make_row(temperature=0.0, prompt=[0], repetition_penalty=1.2)
    assert Sampler()(logits, [row]).token_ids == [1]
    # Negative logits are multiplied: a repeated -1.0 falls below an unseen -1.1.
    negative = torch.tensor([[-1.0, -1.1]])
    row = make_row(temperature=0.0, output=[0], repetition_penalty=1.2)
    assert Sampler()(negative, [row]).token_ids == [1]


def test_input_logits_are_not_modified():
    logits = torch.randn(3, 30)
    before = logits.clone()
    rows = [
        make_row(f"r{i}", output=[1, 2], frequency_penalty=1.0, top_k=5, top_p=0.5)
        for i in range(3)
    ]
    Sampler()(logits, rows)
    assert torch.equal(logits, before)


# --- filters restrict the support exactly ---------------------------------------------

PROBS = [0.4, 0.3, 0.2, 0.1]
LOGPROBS = [math.log(p) for p in PROBS]


@pytest.mark.parametrize(
    ("kwargs", "support"),
    [
        ({}, {0, 1, 2, 3}),
        ({"top_k": 2}, {0, 1}),
        ({"top_k": 3, "temperature": 5.0}, {0, 1, 2}),
        ({"top_p": 0.5}, {0, 1}),
        ({"top_p": 0.75}, {0, 1, 2}),
        ({"top_p": 0.3}, {0}),
        ({"min_p": 0.3}, {0, 1, 2}),
        ({"min_p": 0.6}, {0, 1}),
        ({"top_k": 3, "top_p": 0.9, "min_p": 0.6}, {0, 1}),
    ],
)
def test_filters_keep_exactly_the_expected_tokens(kwargs, support):
    assert set(sample_many(LOGPROBS, **kwargs)) == support


def test_masked_tokens_are_never_sampled():
    logits = [1.0, -INF, 0.5, -INF, 0.0]
    assert set(sample_many(logits, temperature=3.0)) == {0, 2, 4}


def test_top_p_beyond_the_candidates_matches_a_full_sort(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    scales = torch.tensor([0.1, 1.0, 3.0, 8.0])[:, None]
    probs = (torch.randn(4, 6000, generator=gen) * scales).softmax(-1)
    top_p = [0.9, 0.5, 0.95, 0.3]
    staged = apply_top_p(probs.clone(), top_p)
    monkeypatch.setattr(sampler_module, "TOP_P_CANDIDATES", ())
    assert torch.equal(staged, apply_top_p(probs.clone(), top_p))
    for i, p in enumerate(top_p):
        sorted_probs = probs[i].sort(descending=True)
        num_kept = int((sorted_probs.values.cumsum(0) < p).sum()) + 1
        kept = set(staged[i].nonzero().flatten().tolist())
        assert kept == set(sorted_probs.indices[:num_kept].tolist())


# --- distributions ---------------------------------------------------------------------


def test_sampling_frequencies_follow_the_probabilities():
    assert chi_square(seeded_counts(PROBS), PROBS) < 16.3  # p = 0.001, 3 dof


def test_temperature_reshapes_the_distribution():
    scaled = torch.tensor(PROBS).log().div(0.5).softmax(-1).tolist()
    assert chi_square(seeded_counts(PROBS, temperature=0.5), scaled) < 16.3


def test_top_p_renormalises_the_nucleus():
    counts = seeded_counts(PROBS, top_p=0.5)
    assert counts[2:] == [0, 0]
    assert chi_square(counts[:2], [4 / 7, 3 / 7]) < 10.8  # p = 0.001, 1 dof


def test_unseeded_rows_follow_the_probabilities():
    counts = sample_many(LOGPROBS, num_draws=4000)
    assert chi_square([counts[t] for t in range(4)], PROBS) < 40  # p < 1e-8, 3 dof


# --- seeds -----------------------------------------------------------------------------

VOCAB = 300
NUM_STEPS = 10
TARGET_LOGITS = torch.randn(NUM_STEPS, VOCAB, generator=torch.Generator().manual_seed(3))
OTHER_PARAMS = [
    {},
    {"temperature": 0.0},
    {"seed": 11, "top_k": 20},
    {"temperature": 1.5, "top_p": 0.8, "frequency_penalty": 0.5},
    {"seed": 12, "min_p": 0.1},
]


def target_tokens(
    sampler: Sampler, position: int, num_others: int, seed: int = 7, **kwargs
) -> list[int]:
    """Tokens of request "target" over NUM_STEPS steps, at `position` among other rows."""
    gen = torch.Generator().manual_seed(100 + position + num_others)
    params = {"temperature": 0.9, **kwargs}
    tokens: list[int] = []
    for step in range(NUM_STEPS):
        others = [
            make_row(f"o{i}", **OTHER_PARAMS[i % len(OTHER_PARAMS)]) for i in range(num_others)
        ]
        target = make_row("target", prompt=[1, 2, 3], output=tokens, seed=seed, **params)
        rows = others[:position] + [target] + others[position:]
        logits = torch.randn(len(rows), VOCAB, generator=gen)
        logits[position] = TARGET_LOGITS[step]
        tokens.append(sampler(logits, rows).token_ids[position])
    return tokens


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"top_p": 0.9, "top_k": 200, "min_p": 0.01, "repetition_penalty": 1.3}, {"top_p": 0.99}],
)
def test_seeded_rows_repeat_in_any_batch(kwargs):
    alone = target_tokens(Sampler(), 0, 0, **kwargs)
    assert target_tokens(Sampler(), 0, 0, **kwargs) == alone
    for position, num_others in [(0, 4), (4, 4), (2, 7), (5, 5)]:
        assert target_tokens(Sampler(), position, num_others, **kwargs) == alone
    assert len(set(alone)) > 1


def test_different_seeds_differ():
    assert target_tokens(Sampler(), 0, 0, seed=1) != target_tokens(Sampler(), 0, 0, seed=2)


def test_generator_survives_gaps_and_restarts_after_drop():
    row = make_row("target", seed=5)
    sampler = Sampler()
    straight = [sampler(TARGET_LOGITS[i : i + 1], [row]).token_ids[0] for i in range(NUM_STEPS)]
    sampler.drop(["target"])
    other = make_row("other", seed=5)
    resumed = []
    for i in range(NUM_STEPS):
        if i == 4:  # "target" preempted for two steps: its generator must not move
            sampler(TARGET_LOGITS[:2], [other, make_row("x")])
            sampler(TARGET_LOGITS[:1], [make_row("x")])
        resumed.append(sampler(TARGET_LOGITS[i : i + 1], [row]).token_ids[0])
    assert resumed == straight
    sampler.drop(["target", "never-seen"])
    assert sampler(TARGET_LOGITS[:1], [row]).token_ids[0] == straight[0]


# --- logprobs --------------------------------------------------------------------------


def test_logprobs_are_those_of_the_raw_logits():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 64, generator=gen) * 2
    rows = [
        make_row("a", logprobs=5, temperature=0.5, top_k=3, output=[1, 2], frequency_penalty=2),
        make_row("b"),
        make_row("c", logprobs=0, temperature=0.0, prompt=[7], repetition_penalty=1.5),
        make_row("d", logprobs=20, top_p=0.5),
    ]
    out = Sampler()(logits, rows)
    expected = logits.log_softmax(-1)
    assert out.logprobs[1] is None
    assert out.logprobs[2] is not None and out.logprobs[2].top_logprobs == []
    for i in (0, 2, 3):
        lp = out.logprobs[i]
        assert lp is not None
        assert lp.sampled_logprob == pytest.approx(expected[i, out.token_ids[i]].item(), abs=1e-6)
        top = lp.top_logprobs
        assert len(top) == rows[i].params.logprobs
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        reference = expected[i].topk(len(top)) if top else None
        if reference is not None:
            assert [t for t, _ in top] == reference.indices.tolist()
            assert [v for _, v in top] == pytest.approx(reference.values.tolist(), abs=1e-6)


# --- non-finite logits -----------------------------------------------------------------


def test_nan_and_infinite_logits_do_not_break_sampling():
    nan = float("nan")
    logits = torch.tensor(
        [
            [nan, 1.0, nan, 0.5],  # random: NaN never sampled
            [nan, 1.0, nan, 0.5],  # greedy
            [nan, nan, nan, nan],  # nothing finite: raw argmax fallback
            [-INF, -INF, -INF, -INF],
            [0.0, INF, 3.0, INF],  # only the +inf tokens
        ]
    )
    params = [{}, {"temperature": 0.0}, {"top_p": 0.5, "logprobs": 2}, {}, {"top_k": 3}]
    for _ in range(20):
        rows = [make_row(f"r{i}", **kw) for i, kw in enumerate(params)]
        out = Sampler()(logits, rows)
        assert out.token_ids[0] in {1, 3}
        assert out.token_ids[1] == 1
        assert out.token_ids[2] in range(4) and out.token_ids[3] in range(4)
        assert out.token_ids[4] in {1, 3}


# --- property --------------------------------------------------------------------------

LOGIT = st.one_of(st.floats(-20, 20, width=32), st.sampled_from([-INF, INF, float("nan")]))
PARAMS = st.builds(
    SamplingParams,
    temperature=st.one_of(st.just(0.0), st.floats(0.05, 3.0)),
    top_p=st.floats(0.01, 1.0),
    top_k=st.sampled_from([0, -1, 1, 2, 3, 10, 100]),
    min_p=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
    presence_penalty=st.floats(-2, 2),
    frequency_penalty=st.floats(-2, 2),
    repetition_penalty=st.floats(0.5, 2.0),
    seed=st.one_of(st.none(), st.integers(-(2**70), 2**70)),
    logprobs=st.one_of(st.none(), st.integers(0, 20)),
)


def sanitise(logits: torch.Tensor) -> torch.Tensor:
    return logits.nan_to_num(nan=-INF, posinf=INF, neginf=-INF)


def check_in_support(token: int, logits: torch.Tensor, row: SamplingRow) -> None:
    """Reference support of one row (float64 probabilities, small tolerances)."""
    processed = reference_penalties(sanitise(logits)[None], [row])[0]
    if not (processed > -INF).any():
        return  # falls back to the raw argmax
    p = row.params
    if p.is_greedy:
        assert processed[token] == processed.max()
        return
    processed = processed / torch.tensor(p.temperature)
    if (processed == INF).any():
        assert processed[token] == INF
        return
    assert processed[token] > -INF
    if p.top_k > 0:
        assert int((processed > processed[token]).sum()) < p.top_k
        kth = processed.topk(min(p.top_k, len(processed))).values[-1]
        processed = processed.masked_fill(processed < kth, -INF)
    probs = processed.double().softmax(-1)
    # Strictly more probable than the token beyond float32's resolution (the sampler's): a
    # logit 4e-17 above the others ties with them in float32, and ties may go either way.
    assert float(probs[probs > probs[token] * (1 + 1e-6)].sum()) < p.top_p + 1e-4
    assert float(probs[token]) >= p.min_p * float(probs.max()) * (1 - 1e-4)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), vocab_size=st.integers(2, 24), batch_size=st.integers(1, 5))
def test_samples_stay_in_the_allowed_support(data, vocab_size, batch_size):
    logits = torch.tensor(
        data.draw(
            st.lists(
                st.lists(LOGIT, min_size=vocab_size, max_size=vocab_size),
                min_size=batch_size,
                max_size=batch_size,
            )
        ),
        dtype=torch.float32,
    )
    token_ids = st.lists(st.integers(0, vocab_size - 1), max_size=6)
    rows = [
        SamplingRow(f"r{i}", data.draw(PARAMS), data.draw(token_ids), data.draw(token_ids))
        for i in range(batch_size)
    ]
    out = Sampler()(logits, rows)
    assert len(out.token_ids) == len(out.logprobs) == batch_size
    for b, (token, row) in enumerate(zip(out.token_ids, rows, strict=True)):
        assert 0 <= token < vocab_size
        check_in_support(token, logits[b], row)
        assert (out.logprobs[b] is None) == (row.params.logprobs is None)
