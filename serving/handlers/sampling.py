"""The request side: one mapping from every endpoint's request to what the engine runs.

Each endpoint has an entry point — `chat_settings`, `completion_settings`,
`generation_settings` (KServe `infer`, Triton `generate`) — returning `TextSettings`:

- `params`: the engine's `SamplingParams`, from the fields OpenAI requests and KServe's
  `GenerationParameters` share by name (`SamplingSource`), mapped once in
  `sampling_params`. Fields left out take OpenAI's defaults (temperature 1, top_p 1,
  penalties 0); vLLM's extras (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
  `min_tokens`, `stop_token_ids`) pass through; `seed` too (the engine offsets it per
  choice). `max_completion_tokens` wins over `max_tokens` (chat); None generates to the
  context's end. Logprobs: chat `logprobs: true` + `top_logprobs: k` -> k alternatives (0
  without `top_logprobs`); completions `logprobs: k` -> k alternatives.
- `options`: what the output side needs. `stop` strings are not the engine's business:
  the output processor cuts them from the text and the run aborts that choice in the
  engine; `stop_token_ids` stop in the engine.
- `response_format`: the constraint on what the engine may generate. `constraint_of` is
  where request fields turn into engine constraints (`response_format` today; `tools` /
  `tool_choice` and `structured_outputs` belong there too).

`user` is accepted and only logged; `logit_bias`, `best_of` != n, `suffix` and `echo` with
logprobs are refused with a 400 naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from serving.backends.base import ResponseFormat
from serving.engine.sampling_params import SamplingParams
from serving.errors import BadRequestError
from serving.protocol.kserve import GenerationParameters
from serving.protocol.openai import ChatCompletionRequest, CompletionRequest, SamplingFields


@dataclass(frozen=True)
class OutputOptions:
    """How a request's tokens become text: stop strings, special tokens, logprobs."""

    stop: tuple[str, ...] = ()
    skip_special_tokens: bool = True
    want_logprobs: bool = False


@dataclass(frozen=True)
class TextSettings:
    """An endpoint's request as the engine (`params`, `response_format`) and the output
    side (`options`) take it."""

    params: SamplingParams
    options: OutputOptions
    response_format: ResponseFormat | None = None


class SamplingSource(Protocol):
    """The sampling fields OpenAI requests and KServe's `GenerationParameters` share."""

    @property
    def temperature(self) -> float | None: ...
    @property
    def top_p(self) -> float | None: ...
    @property
    def top_k(self) -> int | None: ...
    @property
    def min_p(self) -> float | None: ...
    @property
    def presence_penalty(self) -> float | None: ...
    @property
    def frequency_penalty(self) -> float | None: ...
    @property
    def repetition_penalty(self) -> float | None: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def stop_token_ids(self) -> list[int] | None: ...
    @property
    def ignore_eos(self) -> bool: ...
    @property
    def min_tokens(self) -> int: ...


def sampling_params(source: SamplingSource, *, n: int = 1, max_tokens: int | None,
                    logprobs: int | None = None) -> SamplingParams:
    """The one mapping; raises the engine's `InvalidRequestError` for a bad value."""
    return SamplingParams(
        n=n,
        temperature=_or(source.temperature, 1.0),
        top_p=_or(source.top_p, 1.0),
        top_k=source.top_k or 0,
        min_p=source.min_p or 0.0,
        presence_penalty=source.presence_penalty or 0.0,
        frequency_penalty=source.frequency_penalty or 0.0,
        repetition_penalty=_or(source.repetition_penalty, 1.0),
        seed=source.seed,
        stop_token_ids=tuple(source.stop_token_ids or ()),
        max_tokens=max_tokens,
        ignore_eos=source.ignore_eos,
        logprobs=logprobs,
        min_tokens=source.min_tokens,
    )


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def chat_settings(request: ChatCompletionRequest) -> TextSettings:
    if request.top_logprobs is not None and not request.logprobs:
        raise BadRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
    _refuse_unsupported(request)
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    params = sampling_params(request, n=request.n, logprobs=logprobs,
                             max_tokens=request.max_completion_tokens or request.max_tokens)
    options = OutputOptions(tuple(request.stop_strings()), request.skip_special_tokens,
                            want_logprobs=request.logprobs)
    return TextSettings(params, options, constraint_of(request))


def completion_settings(request: CompletionRequest) -> TextSettings:
    if request.suffix is not None:
        raise BadRequestError("suffix is not supported by this server (no fill-in-the-middle "
                              "models are served)", param="suffix")
    if request.best_of is not None and request.best_of != request.n:
        raise BadRequestError("best_of other than n is not supported by this server",
                              param="best_of")
    if request.echo and request.logprobs is not None:
        raise BadRequestError("echo together with logprobs needs prompt logprobs, which this "
                              "server does not compute", param="echo")
    _refuse_unsupported(request)
    params = sampling_params(request, n=request.n, max_tokens=request.max_tokens,
                             logprobs=request.logprobs)
    options = OutputOptions(tuple(request.stop_strings()), request.skip_special_tokens,
                            want_logprobs=request.logprobs is not None)
    return TextSettings(params, options)


def generation_settings(parameters: GenerationParameters) -> TextSettings:
    """KServe `infer` and Triton `generate`: one choice, text only."""
    params = sampling_params(parameters, max_tokens=parameters.max_tokens)
    return TextSettings(params, OutputOptions(tuple(parameters.stop_strings())))


def constraint_of(request: ChatCompletionRequest) -> ResponseFormat | None:
    """What the request constrains the engine's output to (None: free text)."""
    if request.response_format is None:
        return None
    return ResponseFormat(request.response_format.type, request.response_format.json_schema)


def _refuse_unsupported(request: SamplingFields) -> None:
    if request.logit_bias:
        raise BadRequestError("logit_bias is not supported by this server", param="logit_bias")
