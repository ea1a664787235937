"""The native engine behind `EngineClient`.

Guides (structured outputs, forced tool calls) are compiled here at admission, off the
event loop, so a bad schema is a 400 naming its field before the engine sees the request;
the sampler then finds the compiled grammar in the shared cache.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from prometheus_client import CollectorRegistry

from serving.backends.base import GenerationRequest, ModelInfo
from serving.engine.errors import InvalidRequestError
from serving.engine.factory import EngineSettings, build_engine, eos_token_ids
from serving.engine.outputs import RequestOutput
from serving.models.config import ModelArchConfig
from serving.structured import GuideCompiler, GuidedDecoding, GuideSpecError

logger = logging.getLogger(__name__)


def guide_compiler(model_dir: Path) -> GuideCompiler | None:
    """xgrammar's view of the model's tokenizer; None (guides refused) without one."""
    from transformers import AutoTokenizer

    arch = ModelArchConfig.from_model_dir(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return GuideCompiler(tokenizer, vocab_size=arch.vocab_size,
                             stop_token_ids=eos_token_ids(model_dir, arch))
    except (OSError, ValueError, RuntimeError) as exc:
        logger.warning("structured outputs are off for %s: %s", model_dir, exc)
        return None


class NativeEngineClient:
    def __init__(self, settings: EngineSettings, *, served_model_name: str,
                 registry: CollectorRegistry) -> None:
        self._guides = guide_compiler(Path(settings.model))
        guided = GuidedDecoding(self._guides) if self._guides is not None else None
        self._engine = build_engine(settings, model_name=served_model_name, registry=registry,
                                    guided=guided)
        self._info = ModelInfo(
            served_model_name=served_model_name, model_dir=settings.model,
            max_model_len=self._engine.max_model_len,
            engine="native", supports_structured_output=self._guides is not None,
            supports_embeddings=True,
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def is_ready(self) -> bool:
        return self._engine.is_running

    @property
    def num_unfinished_requests(self) -> int:
        return self._engine.num_unfinished_requests

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        guide = request.params.guide
        if guide is not None:
            if self._guides is None:
                raise InvalidRequestError("this model has no tokenizer xgrammar can read, so "
                                          "its output cannot be constrained", param=guide.param)
            try:
                await asyncio.to_thread(self._guides.compile, guide)
            except GuideSpecError as exc:
                raise InvalidRequestError(str(exc), param=exc.param) from None
        async for output in self._engine.generate(request.prompt_token_ids, request.params,
                                                  request.request_id):
            yield output

    async def abort(self, request_id: str) -> None:
        self._engine.abort(request_id)

    async def abort_choice(self, request_id: str, index: int) -> None:
        self._engine.abort_choice(request_id, index)

    async def shutdown(self) -> None:
        self._engine.shutdown()

    def metrics_text(self) -> bytes:
        return b""


def create(settings, registry: CollectorRegistry) -> NativeEngineClient:
    """`ServerSettings` -> a started native engine."""
    engine_settings = EngineSettings(
        model=settings.model, device=settings.device, dtype=settings.dtype,
        kv_cache_memory_gib=settings.kv_cache_memory,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        max_num_seqs=settings.max_num_seqs, max_num_batched_tokens=settings.max_num_batched_tokens,
        max_model_len=settings.max_model_len, max_waiting_requests=settings.max_waiting_requests,
        enable_prefix_caching=settings.enable_prefix_caching,
        enforce_eager=settings.enforce_eager, cpu_kernels=settings.cpu_kernels,
        compile_cache_dir=settings.compile_cache_dir,
    )
    return NativeEngineClient(engine_settings, served_model_name=settings.name,
                              registry=registry)
