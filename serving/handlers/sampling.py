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
- `params.guide`: what the engine may generate (`guide_of`): `response_format`
  (`json_object`, `json_schema`), vLLM's `structured_outputs` (`json`, `regex`, `choice`,
  `grammar`), or a forced tool call (`tool_choice: required` or a named function, built
  by the chat handler, which knows the model's tool-call format). At most one per request.
- `params.logit_bias`: OpenAI's `{"token id": bias}`, ids checked against the vocabulary.

Fields that cannot change the answer (`user`, `metadata`, `store`, ...) are accepted; those
this server cannot honour are refused with a 400 naming them (`REFUSED_CHAT_FIELDS`,
`suffix`, `best_of` != n, `echo` with logprobs), so nothing is silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from serving.engine.sampling_params import SamplingParams
from serving.errors import BadRequestError
from serving.protocol.kserve import GenerationParameters
from serving.protocol.openai import ChatCompletionRequest, CompletionRequest, SamplingFields
from serving.structured.spec import GuideSpec, GuideSpecError

# OpenAI chat fields that would change the answer and that no engine here can honour.
REFUSED_CHAT_FIELDS = {
    "audio": "audio output", "prediction": "predicted outputs",
    "web_search_options": "web search", "reasoning_effort": "reasoning models",
    "verbosity": "reasoning models", "moderation": "moderation",
    "prompt_cache_options": "prompt cache options",
    "functions": "the deprecated `functions` (send `tools`)",
    "function_call": "the deprecated `function_call` (send `tool_choice`)",
}


@dataclass(frozen=True)
class OutputOptions:
    """How a request's tokens become text: stop strings, special tokens, logprobs."""

    stop: tuple[str, ...] = ()
    skip_special_tokens: bool = True
    want_logprobs: bool = False


@dataclass(frozen=True)
class TextSettings:
    """An endpoint's request as the engine (`params`) and the output side (`options`)
    take it."""

    params: SamplingParams
    options: OutputOptions


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
                    logprobs: int | None = None, logit_bias: tuple[tuple[int, float], ...] = (),
                    guide: GuideSpec | None = None) -> SamplingParams:
    """The one mapping; raises the engine's `InvalidRequestError` for a bad value."""
    return SamplingParams(
        logit_bias=logit_bias,
        guide=guide,
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


def chat_settings(request: ChatCompletionRequest, *, vocab_size: int,
                  tool_guide: GuideSpec | None = None) -> TextSettings:
    """`tool_guide`: the forced tool call the chat handler built, if any."""
    if request.top_logprobs is not None and not request.logprobs:
        raise BadRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
    refuse_unsupported_chat_fields(request)
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    guide = guide_of(request)
    if guide is not None and tool_guide is not None:
        raise BadRequestError(f"{guide.param} cannot be combined with a forced tool call "
                              "(tool_choice required or a named function): both would "
                              "constrain the answer", param=guide.param)
    params = sampling_params(request, n=request.n, logprobs=logprobs,
                             max_tokens=request.max_completion_tokens or request.max_tokens,
                             logit_bias=logit_bias_of(request, vocab_size),
                             guide=guide or tool_guide)
    options = OutputOptions(tuple(request.stop_strings()), request.skip_special_tokens,
                            want_logprobs=request.logprobs)
    return TextSettings(params, options)


def completion_settings(request: CompletionRequest, *, vocab_size: int) -> TextSettings:
    if request.suffix is not None:
        raise BadRequestError("suffix is not supported by this server (no fill-in-the-middle "
                              "models are served)", param="suffix")
    if request.best_of is not None and request.best_of != request.n:
        raise BadRequestError("best_of other than n is not supported by this server",
                              param="best_of")
    if request.echo and request.logprobs is not None:
        raise BadRequestError("echo together with logprobs needs prompt logprobs, which this "
                              "server does not compute", param="echo")
    params = sampling_params(request, n=request.n, max_tokens=request.max_tokens,
                             logprobs=request.logprobs,
                             logit_bias=logit_bias_of(request, vocab_size),
                             guide=guide_of(request))
    options = OutputOptions(tuple(request.stop_strings()), request.skip_special_tokens,
                            want_logprobs=request.logprobs is not None)
    return TextSettings(params, options)


def generation_settings(parameters: GenerationParameters) -> TextSettings:
    """KServe `infer` and Triton `generate`: one choice, text only."""
    params = sampling_params(parameters, max_tokens=parameters.max_tokens)
    return TextSettings(params, OutputOptions(tuple(parameters.stop_strings())))


def guide_of(request: SamplingFields) -> GuideSpec | None:
    """What `response_format` or `structured_outputs` constrain the output to (None: free
    text); both at once is refused."""
    guides = [guide for guide in (_response_format_guide(request),
                                  _structured_outputs_guide(request)) if guide is not None]
    if len(guides) > 1:
        raise BadRequestError("response_format and structured_outputs both constrain the "
                              "answer: send one", param="structured_outputs")
    return guides[0] if guides else None


def _response_format_guide(request: SamplingFields) -> GuideSpec | None:
    response_format = request.response_format
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return GuideSpec.json_object()
    assert response_format.json_schema is not None  # the protocol model checks it
    schema = response_format.json_schema.schema_
    return _spec(lambda: GuideSpec.json_schema(schema if schema is not None else {},
                                               param="response_format"))


def _structured_outputs_guide(request: SamplingFields) -> GuideSpec | None:
    outputs = request.structured_outputs
    if outputs is None:
        return None
    if outputs.json_ is not None:
        return _spec(lambda: GuideSpec.json_schema(outputs.json_,
                                                   param="structured_outputs.json"))
    if outputs.regex is not None:
        return _spec(lambda: GuideSpec.regex(outputs.regex, param="structured_outputs.regex"))
    if outputs.choice is not None:
        return _spec(lambda: GuideSpec.choice(outputs.choice,
                                              param="structured_outputs.choice"))
    return _spec(lambda: GuideSpec.grammar(outputs.grammar, param="structured_outputs.grammar"))


def _spec(build) -> GuideSpec:
    try:
        return build()
    except GuideSpecError as exc:
        raise BadRequestError(str(exc), param=exc.param) from None


def logit_bias_of(request: SamplingFields, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's `{"token id": bias}` as `(id, bias)` pairs; ids must be in the vocabulary."""
    bias = request.logit_bias or {}
    pairs = []
    for key, value in bias.items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise BadRequestError(f"logit_bias keys must be token ids below {vocab_size}, "
                                  f"got {key[:32]!r}", param="logit_bias")
        pairs.append((int(key), value))
    return tuple(pairs)


def refuse_unsupported_chat_fields(request: ChatCompletionRequest) -> None:
    for name, what in REFUSED_CHAT_FIELDS.items():
        if getattr(request, name) is not None:
            raise BadRequestError(f"{name}: {what} is not supported by this server",
                                  param=name)
    if request.modalities is not None and request.modalities != ["text"]:
        raise BadRequestError("modalities: this server answers with text only",
                              param="modalities")
