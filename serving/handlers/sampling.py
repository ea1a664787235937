"""OpenAI request -> engine `SamplingParams` (one mapping for chat and completions).

- `max_completion_tokens` wins over `max_tokens` (chat); None generates to the context end.
- `temperature`/`top_p`/penalties left out take OpenAI's defaults (1, 1, 0).
- Extras as vLLM: `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `min_tokens`,
  `stop_token_ids`. `seed` is passed on (the engine offsets it per choice).
- `stop` strings are not the engine's business: the handler cuts them from the text
  (`StopChecker`); `stop_token_ids` stop in the engine.
- Logprobs: chat `logprobs: true` + `top_logprobs: k` -> k alternatives (0 without
  `top_logprobs`); completions `logprobs: k` -> k alternatives.
- `user` is accepted and only logged; `logit_bias` and `best_of` != n are refused clearly.
"""

from __future__ import annotations

from serving.engine.sampling_params import SamplingParams
from serving.errors import BadRequestError
from serving.protocol.openai import ChatCompletionRequest, CompletionRequest, SamplingFields


def _common(request: SamplingFields, *, max_tokens: int | None,
            logprobs: int | None) -> SamplingParams:
    if request.logit_bias:
        raise BadRequestError("logit_bias is not supported by this server", param="logit_bias")
    return SamplingParams(
        n=request.n,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=request.top_k or 0,
        min_p=request.min_p or 0.0,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        repetition_penalty=1.0 if request.repetition_penalty is None
        else request.repetition_penalty,
        seed=request.seed,
        stop_token_ids=tuple(request.stop_token_ids or ()),
        max_tokens=max_tokens,
        ignore_eos=request.ignore_eos,
        logprobs=logprobs,
        min_tokens=request.min_tokens,
    )


def chat_sampling_params(request: ChatCompletionRequest) -> SamplingParams:
    max_tokens = request.max_completion_tokens or request.max_tokens
    if request.top_logprobs is not None and not request.logprobs:
        raise BadRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    return _common(request, max_tokens=max_tokens, logprobs=logprobs)


def completion_sampling_params(request: CompletionRequest) -> SamplingParams:
    if request.suffix is not None:
        raise BadRequestError("suffix is not supported by this server (no fill-in-the-middle "
                              "models are served)", param="suffix")
    if request.best_of is not None and request.best_of != request.n:
        raise BadRequestError("best_of other than n is not supported by this server",
                              param="best_of")
    if request.echo and request.logprobs is not None:
        raise BadRequestError("echo together with logprobs needs prompt logprobs, which this "
                              "server does not compute", param="echo")
    return _common(request, max_tokens=request.max_tokens, logprobs=request.logprobs)
