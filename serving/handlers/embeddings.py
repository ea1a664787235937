"""`/v1/embeddings`: inputs -> the engine's pooled hidden states -> OpenAI's `list`.

Each input (a string or token ids) is one engine request that computes its prompt and
generates nothing (`SamplingParams.pooling`): the native engine batches them with
generation like any prefill. The vector is L2-normalised (cosine similarity is a dot
product), `float` or `base64` (float32 little-endian, as OpenAI encodes it); `dimensions`
is refused because these models are not trained to be shortened. Engines without pooling
(vLLM, ONNX, Triton here) refuse the endpoint with a 400.
"""

from __future__ import annotations

import base64
import uuid

import numpy as np

from serving.backends.base import GenerationRequest
from serving.engine.outputs import RequestOutput
from serving.engine.sampling_params import SamplingParams
from serving.errors import BadRequestError
from serving.handlers.context import HandlerContext
from serving.handlers.run import open_streams
from serving.protocol.embeddings import (
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
)


class EmbeddingHandler:
    def __init__(self, context: HandlerContext, *, pooling: str = "mean") -> None:
        self.context = context
        self.pooling = pooling

    async def create(self, request: EmbeddingRequest, *, request_id: str,
                     trace_headers: dict[str, str] | None = None) -> EmbeddingResponse:
        self.context.check_model(request.model)
        engine = self.context.engine
        if not engine.info.supports_embeddings:
            raise BadRequestError(f"the {engine.info.engine} engine serves no embeddings: "
                                  "serve with --engine native", param="model")
        if request.dimensions is not None:
            raise BadRequestError("dimensions: this model's embeddings cannot be shortened",
                                  param="dimensions")
        prompts = self._prompts(request)
        params = SamplingParams(max_tokens=None, pooling=self.pooling)  # type: ignore[arg-type]
        base_id = f"embd-{uuid.uuid4().hex}"
        generations = [GenerationRequest(f"{base_id}-{i}", token_ids, params,
                                         dict(trace_headers or {}))
                       for i, token_ids in enumerate(prompts)]
        vectors: dict[int, list[float]] = {}
        async for index, output in await open_streams(engine, generations):
            vector = _embedding_of(output)
            if vector is not None:
                vectors[index] = vector
        if len(vectors) != len(prompts):
            raise BadRequestError("the engine ended an input without an embedding",
                                  param="input")
        data = [Embedding(index=i, embedding=_encode(vectors[i], request.encoding_format))
                for i in range(len(prompts))]
        num_tokens = sum(len(token_ids) for token_ids in prompts)
        return EmbeddingResponse(data=data, model=request.model,
                                 usage=EmbeddingUsage(prompt_tokens=num_tokens,
                                                      total_tokens=num_tokens))

    def _prompts(self, request: EmbeddingRequest) -> list[list[int]]:
        raw = request.input
        items: list = [raw] if isinstance(raw, str) or isinstance(raw[0], int) else list(raw)
        self.context.limits.check("input", len(items), "max_prompts")
        prompts = []
        for item in items:
            if isinstance(item, str):
                token_ids = list(self.context.tokenizer.encode(item, add_special_tokens=False))
            else:
                self.context.check_token_ids(item, param="input")
                token_ids = list(item)
            if not token_ids:
                raise BadRequestError("input must not be empty", param="input")
            prompts.append(token_ids)
        return prompts


def _embedding_of(output: RequestOutput) -> list[float] | None:
    return next((delta.embedding for delta in output.deltas if delta.embedding is not None),
                None)


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return vector
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
