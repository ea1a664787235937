"""Sampling parameters of one request, with OpenAI / vLLM ranges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from serving.engine.errors import InvalidRequestError
from serving.structured.spec import GuideSpec

# Temperatures below this are treated as greedy (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # entries; OpenAI takes values in [-100, 100]


def _check(is_valid: bool, param: str, requirement: str, value: object) -> None:
    if not is_valid:
        raise InvalidRequestError(f"{param} must be {requirement}, got {value!r}", param=param)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick tokens and when to stop. Validated on construction.

    `top_k` of 0 or -1 disables top-k. `logprobs` is the number of top alternatives to
    return per token (0: only the sampled token's logprob; None: no logprobs).
    `max_tokens=None` generates until a stop condition or the model's context length.
    `logit_bias` adds `(token_id, bias)` to those logits before sampling (OpenAI's; -100
    bans a token). `guide` constrains the output (JSON, a schema, a regex, a choice, a
    grammar, a tool-call format) in the sampler.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    max_tokens: int | None = 16
    ignore_eos: bool = False
    logprobs: int | None = None
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    guide: GuideSpec | None = None
    # An embedding request: no tokens are generated; the prompt's final hidden states are
    # pooled ("mean" over every token, or the "last" token's) and L2-normalised.
    pooling: Literal["mean", "last"] | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    def validate(self) -> None:
        """Raise `InvalidRequestError` naming the first out-of-range field."""
        self._validate_sampling()
        self._validate_lengths()

    def _validate_sampling(self) -> None:
        # Written as `not (in range)` so that NaN is rejected too.
        _check(self.n >= 1, "n", ">= 1", self.n)
        _check(self.temperature >= 0, "temperature", ">= 0", self.temperature)
        _check(0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _check(self.top_k in (-1, 0) or self.top_k >= 1, "top_k", "-1, 0 or >= 1", self.top_k)
        _check(0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-2 <= value <= 2, name, "in [-2, 2]", value)
        _check(self.repetition_penalty > 0, "repetition_penalty", "> 0", self.repetition_penalty)

    def _validate_lengths(self) -> None:
        if self.max_tokens is not None:
            _check(self.max_tokens >= 1, "max_tokens", ">= 1", self.max_tokens)
        _check(self.min_tokens >= 0, "min_tokens", ">= 0", self.min_tokens)
        if self.max_tokens is not None:
            _check(
                self.min_tokens <= self.max_tokens,
                "min_tokens",
                f"<= max_tokens ({self.max_tokens})",
                self.min_tokens,
            )
        if self.logprobs is not None:
            _check(
                0 <= self.logprobs <= MAX_LOGPROBS,
                "logprobs",
                f"in [0, {MAX_LOGPROBS}]",
                self.logprobs,
            )
        _check(
            all(token_id >= 0 for token_id in self.stop_token_ids),
            "stop_token_ids",
            "non-negative token ids",
            self.stop_token_ids,
        )
        self._validate_logit_bias()
        if self.pooling is not None:
            _check(self.n == 1 and self.guide is None and self.logprobs is None, "pooling",
                   "a single choice without guides or logprobs", self)

    def _validate_logit_bias(self) -> None:
        _check(len(self.logit_bias) <= MAX_LOGIT_BIAS, "logit_bias",
               f"at most {MAX_LOGIT_BIAS} entries", f"{len(self.logit_bias)} entries")
        for token_id, bias in self.logit_bias:
            _check(token_id >= 0, "logit_bias", "keyed by non-negative token ids", token_id)
            _check(-100 <= bias <= 100, "logit_bias", "values in [-100, 100]", bias)
