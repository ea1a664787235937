import math

import pytest

from serving.engine import InvalidRequestError, SamplingParams


def test_defaults_are_valid_and_random():
    params = SamplingParams()
    assert params.max_tokens == 16
    assert params.logprobs is None
    assert not params.is_greedy


@pytest.mark.parametrize(
    "kwargs", [{"temperature": 0.0}, {"top_k": 1}, {"temperature": 0.0, "top_k": 50}]
)
def test_greedy(kwargs):
    assert SamplingParams(**kwargs).is_greedy


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": -1},
        {"top_k": 0},
        {"top_k": 40},
        {"top_p": 1.0},
        {"top_p": 1e-3},
        {"min_p": 0.0},
        {"min_p": 1.0},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"repetition_penalty": 1.3},
        {"logprobs": 0},
        {"logprobs": 20},
        {"max_tokens": None},
        {"max_tokens": 1},
        {"min_tokens": 16, "max_tokens": 16},
        {"min_tokens": 100, "max_tokens": None},
        {"temperature": 2.0, "seed": -5, "n": 4},
        {"stop_token_ids": (0, 2)},
    ],
)
def test_valid_edge_values(kwargs):
    params = SamplingParams(**kwargs)
    for name, value in kwargs.items():
        assert getattr(params, name) == value


@pytest.mark.parametrize(
    ("param", "kwargs"),
    [
        ("n", {"n": 0}),
        ("temperature", {"temperature": -0.1}),
        ("temperature", {"temperature": math.nan}),
        ("top_p", {"top_p": 0.0}),
        ("top_p", {"top_p": 1.01}),
        ("top_k", {"top_k": -2}),
        ("min_p", {"min_p": -0.1}),
        ("min_p", {"min_p": 1.5}),
        ("presence_penalty", {"presence_penalty": 2.5}),
        ("frequency_penalty", {"frequency_penalty": -2.01}),
        ("repetition_penalty", {"repetition_penalty": 0.0}),
        ("max_tokens", {"max_tokens": 0}),
        ("min_tokens", {"min_tokens": -1}),
        ("min_tokens", {"min_tokens": 17, "max_tokens": 16}),
        ("logprobs", {"logprobs": -1}),
        ("logprobs", {"logprobs": 21}),
        ("stop_token_ids", {"stop_token_ids": (5, -1)}),
    ],
)
def test_out_of_range_values_name_the_param(param, kwargs):
    with pytest.raises(InvalidRequestError) as excinfo:
        SamplingParams(**kwargs)
    assert excinfo.value.param == param
    assert param in str(excinfo.value)
