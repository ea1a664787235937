"""KServe v2 `infer` and Triton's `generate` / `generate_stream` over any `EngineClient`.

The served model looks to KServe and Triton clients like a model of Triton's vLLM backend:
a BYTES `text_input` in, a BYTES `text_output` out, sampling settings as request
`parameters` (or scalar input tensors / top-level generate keys of the same names,
`GenerationParameters`), and the optional BOOL inputs `stream`, `exclude_input_in_output`,
`return_finish_reason`, `return_num_input_tokens`, `return_num_output_tokens`. As there, a
non-streamed `text_output` starts with the prompt unless `exclude_input_in_output`, and a
streamed one never does. `infer` takes a batch (`text_input` of shape [batch]), one engine
request per prompt, run concurrently. Errors are `serving.errors` classes; engine errors
propagate and the router maps them once to `{"error": ...}`.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from common import __version__
from serving.backends.base import EngineClient, GenerationRequest
from serving.engine.outputs import RequestOutput
from serving.engine.request import FinishReason
from serving.engine.sampling_params import SamplingParams
from serving.errors import BadRequestError, ModelNotFoundError, NotFoundError
from serving.handlers.detokenizer import IncrementalDetokenizer, StopChecker
from serving.protocol.kserve import (
    RESERVED_PARAMETER_PREFIX,
    RESERVED_PARAMETERS,
    GenerationParameters,
    InferInputTensor,
    InferOutputTensor,
    InferRequest,
    InferResponse,
    MetadataTensor,
    ModelMetadataResponse,
    ServerMetadataResponse,
    TritonGenerateRequest,
    TritonGenerateResponse,
    encode_tensor,
    tensor_values,
)

MODEL_VERSION = "1"
TEXT_INPUT = "text_input"
# JSON-encoded parameters as one BYTES input (Triton's vLLM backend takes this too).
SAMPLING_PARAMETERS_INPUT = "sampling_parameters"
OUTPUT_DATATYPES = {"text_output": "BYTES", "finish_reason": "BYTES",
                    "num_input_tokens": "UINT32", "num_output_tokens": "UINT32"}
EXTENSIONS = ["binary_tensor_data", "parameters", "generate"]
FLAG_INPUTS = ("stream", "exclude_input_in_output", "return_finish_reason",
               "return_num_input_tokens", "return_num_output_tokens")


@dataclass(frozen=True)
class TextChunk:
    """Text that became final in one engine step, and the tokens it took."""

    text: str
    num_new_tokens: int
    num_prompt_tokens: int
    finish_reason: str | None = None


@dataclass(frozen=True)
class TextCompletion:
    text: str
    finish_reason: str
    num_input_tokens: int
    num_output_tokens: int


@dataclass(frozen=True)
class InputTensors:
    """The prompts of `text_input` (of `shape`); the other (scalar) inputs as parameters."""

    prompts: list[str]
    shape: list[int]
    parameters: dict[str, Any]


@dataclass(frozen=True)
class InferResult:
    """The response, plus the binary tensor data that follows its JSON (may be empty)."""

    response: InferResponse
    binary_data: bytes


def parse_parameters(raw: Mapping[str, Any]) -> GenerationParameters:
    """Request parameters -> `GenerationParameters`; Triton's reserved ones are skipped."""
    values = {key: value for key, value in raw.items()
              if key not in RESERVED_PARAMETERS
              and not key.startswith(RESERVED_PARAMETER_PREFIX)}
    try:
        return GenerationParameters.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = ".".join(str(part) for part in error["loc"]) or "parameters"
        if error["type"] == "extra_forbidden":
            known = ", ".join(GenerationParameters.model_fields)
            raise BadRequestError(f"unknown parameter `{name}`; this model takes: {known}",
                                  param=name) from None
        raise BadRequestError(f"invalid parameter `{name}`: {error['msg']} "
                              f"(got {error.get('input')!r})", param=name) from None


def to_sampling_params(params: GenerationParameters) -> SamplingParams:
    """Raises the engine's `InvalidRequestError` naming an out-of-range value."""
    return SamplingParams(
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        min_p=params.min_p, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty, seed=params.seed,
        stop_token_ids=tuple(params.stop_token_ids), max_tokens=params.max_tokens,
        ignore_eos=params.ignore_eos, min_tokens=params.min_tokens,
    )


class KServeHandler:
    def __init__(self, engine: EngineClient, tokenizer: Any) -> None:
        self.engine = engine
        self.tokenizer = tokenizer

    # -- metadata and health ---------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.engine.info.served_model_name

    def check_model(self, name: str, version: str | None = None) -> None:
        if name != self.model_name:
            raise ModelNotFoundError(name, self.model_name)
        if version not in (None, "", MODEL_VERSION):
            raise NotFoundError(f"model `{name}` has no version `{version}`; "
                                f"its only version is `{MODEL_VERSION}`", param="version")

    def server_metadata(self) -> ServerMetadataResponse:
        return ServerMetadataResponse(name="quiver", version=__version__,
                                      extensions=EXTENSIONS)

    def model_metadata(self, name: str, version: str | None = None) -> ModelMetadataResponse:
        self.check_model(name, version)
        inputs = [MetadataTensor(name=TEXT_INPUT, datatype="BYTES", shape=[-1])]
        inputs += [MetadataTensor(name=flag, datatype="BOOL", shape=[1])
                   for flag in FLAG_INPUTS]
        outputs = [MetadataTensor(name=output, datatype=datatype, shape=[-1])
                   for output, datatype in OUTPUT_DATATYPES.items()]
        return ModelMetadataResponse(name=name, versions=[MODEL_VERSION],
                                     platform=f"quiver_{self.engine.info.engine}",
                                     inputs=inputs, outputs=outputs)

    # -- text generation -------------------------------------------------------------------

    async def stream_text(self, prompt: str, params: GenerationParameters,
                          request_id: str) -> AsyncIterator[TextChunk]:
        """Engine outputs -> detokenized text with stop strings cut. Leaving early (or a
        cancelled task) closes the engine's iterator, which aborts the request."""
        prompt_token_ids = self._encode(prompt)
        request = GenerationRequest(request_id=request_id, prompt_token_ids=prompt_token_ids,
                                    params=to_sampling_params(params))
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_token_ids=prompt_token_ids)
        stop_checker = StopChecker(params.stop_strings)
        async with aclosing(self.engine.generate(request)) as outputs:
            async for output in outputs:
                chunk = _next_chunk(output, detokenizer, stop_checker)
                yield chunk
                if chunk.finish_reason is not None:
                    return

    async def complete_text(self, prompt: str, params: GenerationParameters,
                            request_id: str) -> TextCompletion:
        async with aclosing(self.stream_text(prompt, params, request_id)) as stream:
            chunks = [chunk async for chunk in stream]
        if not chunks:  # an engine that ended the request without an output
            chunks = [TextChunk(text="", num_new_tokens=0, num_prompt_tokens=0)]
        return TextCompletion(
            text="".join(chunk.text for chunk in chunks),
            finish_reason=chunks[-1].finish_reason or str(FinishReason.ABORT),
            num_input_tokens=chunks[-1].num_prompt_tokens,
            num_output_tokens=sum(chunk.num_new_tokens for chunk in chunks))

    def _encode(self, prompt: str) -> list[int]:
        token_ids = list(self.tokenizer.encode(prompt))
        if not token_ids:
            raise BadRequestError("text_input must not be empty", param=TEXT_INPUT)
        return token_ids

    # -- KServe v2 infer -------------------------------------------------------------------

    async def infer(self, name: str, version: str | None, request: InferRequest,
                    binary_data: bytes = b"") -> InferResult:
        self.check_model(name, version)
        tensors = read_inputs(request.inputs, binary_data)
        params = parse_parameters({**(request.parameters or {}), **tensors.parameters})
        if params.stream:
            raise BadRequestError("infer returns one response: stream with "
                                  f"/v2/models/{name}/generate_stream", param="stream")
        completions = await self._complete_batch(tensors.prompts, params)
        texts = [c.text if params.exclude_input_in_output else prompt + c.text
                 for prompt, c in zip(tensors.prompts, completions, strict=True)]
        outputs, tail = build_outputs(request, params, tensors.shape, {
            "text_output": texts,
            "finish_reason": [c.finish_reason for c in completions],
            "num_input_tokens": [c.num_input_tokens for c in completions],
            "num_output_tokens": [c.num_output_tokens for c in completions],
        })
        response = InferResponse(model_name=name, model_version=MODEL_VERSION, id=request.id,
                                 outputs=outputs)
        return InferResult(response=response, binary_data=tail)

    async def _complete_batch(self, prompts: list[str],
                              params: GenerationParameters) -> list[TextCompletion]:
        base_id = f"kserve-{uuid.uuid4().hex}"
        if len(prompts) == 1:
            return [await self.complete_text(prompts[0], params, base_id)]
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self.complete_text(p, params, f"{base_id}-{i}"))
                         for i, p in enumerate(prompts)]
        except BaseExceptionGroup as errors:  # the first failure cancelled the others
            raise errors.exceptions[0] from None
        return [task.result() for task in tasks]

    # -- Triton generate extension ---------------------------------------------------------

    async def generate(self, name: str, version: str | None,
                       request: TritonGenerateRequest) -> TritonGenerateResponse:
        self.check_model(name, version)
        params = parse_parameters(request.all_parameters)
        completion = await self.complete_text(request.text_input, params,
                                              f"generate-{uuid.uuid4().hex}")
        text = completion.text
        if not params.exclude_input_in_output:
            text = request.text_input + text
        return self._generate_response(name, params, text, completion.finish_reason,
                                       completion.num_input_tokens,
                                       completion.num_output_tokens)

    async def generate_stream(self, name: str, version: str | None,
                              request: TritonGenerateRequest
                              ) -> AsyncIterator[TritonGenerateResponse]:
        """Errors in the request raise on the first `__anext__`, before any event."""
        self.check_model(name, version)
        params = parse_parameters(request.all_parameters)
        if params.stream is False:
            yield await self.generate(name, version, request)
            return
        if params.exclude_input_in_output is False:
            raise BadRequestError("when streaming, exclude_input_in_output=false is not "
                                  "allowed", param="exclude_input_in_output")
        chunks = self.stream_text(request.text_input, params, f"generate-{uuid.uuid4().hex}")
        async with aclosing(chunks):
            async for chunk in chunks:
                yield self._generate_response(name, params, chunk.text, chunk.finish_reason,
                                              chunk.num_prompt_tokens, chunk.num_new_tokens)

    @staticmethod
    def _generate_response(name: str, params: GenerationParameters, text: str,
                           finish_reason: str | None, num_input_tokens: int,
                           num_output_tokens: int) -> TritonGenerateResponse:
        """Only the outputs asked for are set (`finish_reason` is null until the end)."""
        optional = {"finish_reason": finish_reason, "num_input_tokens": num_input_tokens,
                    "num_output_tokens": num_output_tokens}
        return TritonGenerateResponse(
            model_name=name, model_version=MODEL_VERSION, text_output=text,
            **{key: value for key, value in optional.items()
               if getattr(params, f"return_{key}")})


def _next_chunk(output: RequestOutput, detokenizer: IncrementalDetokenizer,
                stop_checker: StopChecker) -> TextChunk:
    new_token_ids = [token_id for delta in output.deltas for token_id in delta.new_token_ids]
    finish_reason = next((delta.finish_reason for delta in output.deltas
                          if delta.finish_reason is not None), None)
    if finish_reason is None and output.finished:
        finish_reason = FinishReason.STOP
    text = stop_checker.push(detokenizer.push(new_token_ids))
    if finish_reason is not None:
        text += stop_checker.push(detokenizer.flush())
        text += stop_checker.flush()
    if stop_checker.stopped:
        finish_reason = FinishReason.STOP
    return TextChunk(text=text, num_new_tokens=len(new_token_ids),
                     num_prompt_tokens=output.num_prompt_tokens,
                     finish_reason=None if finish_reason is None else str(finish_reason))



# -- infer tensors ---------------------------------------------------------------------------

def read_inputs(inputs: list[InferInputTensor], binary_data: bytes) -> InputTensors:
    """Tensors (JSON data, or slices of `binary_data` in input order) -> prompts and
    parameters; a BadRequestError names the bad tensor."""
    values: dict[str, list[Any]] = {}
    offset = 0
    for tensor in inputs:
        raw = None
        size = tensor.binary_data_size
        if size is not None:
            if offset + size > len(binary_data):
                raise BadRequestError(f"input `{tensor.name}` declares {size} bytes of binary "
                                      "data that the request body does not have",
                                      param=tensor.name)
            raw, offset = binary_data[offset:offset + size], offset + size
        if tensor.name in values:
            raise BadRequestError(f"input `{tensor.name}` is given twice", param=tensor.name)
        try:
            values[tensor.name] = tensor_values(tensor, raw)
        except ValueError as exc:
            raise BadRequestError(str(exc), param=tensor.name) from None
    text_tensor = next((t for t in inputs if t.name == TEXT_INPUT), None)
    if text_tensor is None:
        raise BadRequestError(f"the request has no `{TEXT_INPUT}` input (a BYTES tensor of "
                              "prompts)", param=TEXT_INPUT)
    if text_tensor.datatype != "BYTES":
        raise BadRequestError(f"input `{TEXT_INPUT}` must have datatype BYTES, got "
                              f"{text_tensor.datatype}", param=TEXT_INPUT)
    prompts = [_as_text(value) for value in values.pop(TEXT_INPUT)]
    if not prompts:
        raise BadRequestError(f"input `{TEXT_INPUT}` is empty", param=TEXT_INPUT)
    return InputTensors(prompts=prompts, shape=text_tensor.shape,
                        parameters=_scalar_parameters(values))


def _as_text(value: Any) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequestError(f"input `{TEXT_INPUT}` is not valid UTF-8",
                                  param=TEXT_INPUT) from None
    if not isinstance(value, str):
        raise BadRequestError(f"input `{TEXT_INPUT}` elements must be strings, got "
                              f"{value!r}", param=TEXT_INPUT)
    return value


def _scalar_parameters(values: dict[str, list[Any]]) -> dict[str, Any]:
    parameters: dict[str, Any] = {}
    for name, elements in values.items():
        if len(elements) != 1:
            raise BadRequestError(f"input `{name}` must hold one element, got "
                                  f"{len(elements)}", param=name)
        value = elements[0]
        if name == SAMPLING_PARAMETERS_INPUT:
            parameters.update(_json_object(value))
        elif name in GenerationParameters.model_fields:
            parameters[name] = _as_text(value) if isinstance(value, bytes) else value
        else:
            raise BadRequestError(f"unknown input `{name}`; this model takes `{TEXT_INPUT}`, "
                                  f"`{SAMPLING_PARAMETERS_INPUT}` and scalar inputs named "
                                  f"like its parameters", param=name)
    return parameters


def _json_object(value: Any) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError):
        parsed = None
    if not isinstance(parsed, dict):
        raise BadRequestError(f"input `{SAMPLING_PARAMETERS_INPUT}` must be a JSON object",
                              param=SAMPLING_PARAMETERS_INPUT)
    return parsed


def build_outputs(request: InferRequest, params: GenerationParameters, shape: list[int],
                  values: dict[str, list[Any]]) -> tuple[list[InferOutputTensor], bytes]:
    """The requested outputs (by default `text_output` plus those `return_*` asked for),
    each as JSON data or, where asked, as binary data appended after the JSON."""
    requested = {output.name: output for output in request.outputs or []}
    unknown = sorted(set(requested) - set(OUTPUT_DATATYPES))
    if unknown:
        raise BadRequestError(f"unknown output `{unknown[0]}`; this model has "
                              f"{', '.join(OUTPUT_DATATYPES)}", param=unknown[0])
    names = list(requested) or ["text_output"] + [
        name for name in OUTPUT_DATATYPES if getattr(params, f"return_{name}", False)]
    outputs: list[InferOutputTensor] = []
    tail: list[bytes] = []
    for name in names:
        datatype = OUTPUT_DATATYPES[name]
        output = requested.get(name)
        if request.is_binary_output or (output is not None and output.is_binary):
            raw = encode_tensor(datatype, values[name])
            tail.append(raw)
            outputs.append(InferOutputTensor(name=name, shape=shape, datatype=datatype,
                                             parameters={"binary_data_size": len(raw)}))
        else:
            outputs.append(InferOutputTensor(name=name, shape=shape, datatype=datatype,
                                             data=values[name]))
    return outputs, b"".join(tail)
