"""KServe v2 `infer` and Triton's `generate` / `generate_stream`, over the text pipeline
every endpoint shares (`serving.handlers.run`).

The served model looks to KServe and Triton clients like a model of Triton's vLLM backend:
a BYTES `text_input` in, a BYTES `text_output` out, sampling settings as request
`parameters` (or scalar input tensors / top-level generate keys of the same names,
`GenerationParameters`), and the optional BOOL inputs `stream`, `exclude_input_in_output`,
`return_finish_reason`, `return_num_input_tokens`, `return_num_output_tokens`. As there, a
non-streamed `text_output` starts with the prompt unless `exclude_input_in_output`, and a
streamed one never does. `infer` takes a batch (`text_input` of shape [batch]): one engine
request per prompt, run concurrently, as `/v1/completions` runs a list of prompts.

Text comes out as on the OpenAI endpoints: stop strings cut exactly, and an engine stop (EOS
or a stop token id) ends with that token, counted in `num_output_tokens` but not shown.
Errors are `serving.errors` classes; engine errors propagate and the router maps them once
to `{"error": ...}`; a failure once `generate_stream` has begun is a `{"error": ...}` event.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from common import __version__
from serving.backends.base import GenerationRequest
from serving.errors import BadRequestError, NotFoundError, from_exception
from serving.handlers.context import HandlerContext
from serving.handlers.kserve_inputs import (
    OUTPUT_DATATYPES,
    TEXT_INPUT,
    build_outputs,
    parse_parameters,
    read_inputs,
)
from serving.handlers.output import ChoiceDelta, TextOutputProcessor
from serving.handlers.run import TextRun, collect, sse_event, stream
from serving.handlers.sampling import generation_settings
from serving.protocol.kserve import (
    GenerationParameters,
    InferRequest,
    InferResponse,
    MetadataTensor,
    ModelMetadataResponse,
    ServerMetadataResponse,
    TritonGenerateRequest,
    TritonGenerateResponse,
)
from serving.protocol.openai import UsageInfo

logger = logging.getLogger(__name__)

MODEL_VERSION = "1"
EXTENSIONS = ["binary_tensor_data", "parameters", "generate"]
FLAG_INPUTS = ("stream", "exclude_input_in_output", "return_finish_reason",
               "return_num_input_tokens", "return_num_output_tokens")


@dataclass(frozen=True)
class InferResult:
    """The response, plus the binary tensor data that follows its JSON (may be empty)."""

    response: InferResponse
    binary_data: bytes


def generate_response(name: str, params: GenerationParameters, text: str,
                      finish_reason: str | None, num_input_tokens: int,
                      num_output_tokens: int) -> TritonGenerateResponse:
    """Only the outputs asked for are set (`finish_reason` is null until the end)."""
    optional = {"finish_reason": finish_reason, "num_input_tokens": num_input_tokens,
                "num_output_tokens": num_output_tokens}
    return TritonGenerateResponse(
        model_name=name, model_version=MODEL_VERSION, text_output=text,
        **{key: value for key, value in optional.items() if getattr(params, f"return_{key}")})


@dataclass
class TritonStreamFormat:
    """`generate_stream`'s events: one per engine step, `{"error": ...}` on a failure."""

    name: str
    params: GenerationParameters
    run: TextRun
    request_id: str

    def opening(self) -> list[str]:
        return []

    def frames(self, delta: ChoiceDelta) -> list[str]:
        response = generate_response(self.name, self.params, delta.text, delta.finish_reason,
                                     self.run.processors[0].num_prompt_tokens,
                                     delta.num_new_tokens)
        return [sse_event(response, exclude_unset=True)]

    def closing(self, usage: UsageInfo) -> list[str]:
        return []

    def error(self, exc: Exception) -> list[str]:
        error = from_exception(exc, request_id=self.request_id, prompt_param=TEXT_INPUT)
        logger.error("generate_stream failed mid-stream: %s", error.message, exc_info=exc)
        return [sse_event({"error": error.message})]


async def _one_frame(frame: str) -> AsyncIterator[str]:
    yield frame


class KServeHandler:
    def __init__(self, context: HandlerContext) -> None:
        self.context = context

    # -- metadata and health ---------------------------------------------------------------

    def check_model(self, name: str, version: str | None = None) -> None:
        self.context.check_model(name)
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
                                     platform=f"quiver_{self.context.engine.info.engine}",
                                     inputs=inputs, outputs=outputs)

    # -- generation ------------------------------------------------------------------------

    async def infer(self, name: str, version: str | None, request: InferRequest,
                    binary_data: bytes = b"") -> InferResult:
        self.check_model(name, version)
        tensors = read_inputs(request.inputs, binary_data)
        self.context.limits.check(TEXT_INPUT, len(tensors.prompts), "max_prompts")
        params = parse_parameters({**(request.parameters or {}), **tensors.parameters})
        self.context.limits.check_sampling(params)
        if params.stream:
            raise BadRequestError("infer returns one response: stream with "
                                  f"/v2/models/{name}/generate_stream", param="stream")
        run = await self._start(tensors.prompts, params, f"kserve-{uuid.uuid4().hex}")
        results = await collect(run)
        texts = [r.text if params.exclude_input_in_output else prompt + r.text
                 for prompt, r in zip(tensors.prompts, results, strict=True)]
        outputs, tail = build_outputs(request, params, tensors.shape, {
            "text_output": texts,
            "finish_reason": [r.finish_reason for r in results],
            "num_input_tokens": [p.num_prompt_tokens for p in run.processors],
            "num_output_tokens": [r.num_tokens for r in results],
        })
        response = InferResponse(model_name=name, model_version=MODEL_VERSION, id=request.id,
                                 outputs=outputs)
        return InferResult(response=response, binary_data=tail)

    async def generate(self, name: str, version: str | None,
                       request: TritonGenerateRequest) -> TritonGenerateResponse:
        self.check_model(name, version)
        params = parse_parameters(request.all_parameters)
        self.context.limits.check_sampling(params)
        return await self._generate(name, request.text_input, params)

    async def generate_stream(self, name: str, version: str | None,
                              request: TritonGenerateRequest, *, request_id: str
                              ) -> AsyncIterator[str]:
        """SSE frames; errors in the request (or at admission) raise here, before any."""
        self.check_model(name, version)
        params = parse_parameters(request.all_parameters)
        self.context.limits.check_sampling(params)
        if params.stream is False:
            response = await self._generate(name, request.text_input, params)
            return _one_frame(sse_event(response, exclude_unset=True))
        if params.exclude_input_in_output is False:
            raise BadRequestError("when streaming, exclude_input_in_output=false is not "
                                  "allowed", param="exclude_input_in_output")
        run = await self._start([request.text_input], params, f"generate-{uuid.uuid4().hex}")
        return stream(run, TritonStreamFormat(name, params, run, request_id))

    async def _generate(self, name: str, prompt: str,
                        params: GenerationParameters) -> TritonGenerateResponse:
        run = await self._start([prompt], params, f"generate-{uuid.uuid4().hex}")
        [result] = await collect(run)
        text = result.text if params.exclude_input_in_output else prompt + result.text
        return generate_response(name, params, text, result.finish_reason,
                                 run.processors[0].num_prompt_tokens, result.num_tokens)

    async def _start(self, prompts: list[str], params: GenerationParameters,
                     base_id: str) -> TextRun:
        """One engine request per prompt, one choice each."""
        prompt_token_ids = [self._encode(prompt) for prompt in prompts]
        settings = generation_settings(params)
        generations = [GenerationRequest(base_id if len(prompts) == 1 else f"{base_id}-{i}",
                                         token_ids, settings.params)
                       for i, token_ids in enumerate(prompt_token_ids)]
        processors = [TextOutputProcessor(self.context, generation, i, settings.options)
                      for i, generation in enumerate(generations)]
        return await TextRun.start(self.context.engine, generations, processors)

    def _encode(self, prompt: str) -> list[int]:
        token_ids = list(self.context.tokenizer.encode(prompt))
        if not token_ids:
            raise BadRequestError("text_input must not be empty", param=TEXT_INPUT)
        return token_ids
