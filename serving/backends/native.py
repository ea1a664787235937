"""The native engine behind `EngineClient`."""

from __future__ import annotations

from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry

from serving.backends.base import GenerationRequest, ModelInfo
from serving.engine.errors import InvalidRequestError
from serving.engine.factory import EngineSettings, build_engine
from serving.engine.outputs import RequestOutput


class NativeEngineClient:
    def __init__(self, settings: EngineSettings, *, served_model_name: str,
                 registry: CollectorRegistry) -> None:
        self._engine = build_engine(settings, model_name=served_model_name, registry=registry)
        self._info = ModelInfo(
            served_model_name=served_model_name, model_dir=settings.model,
            max_model_len=self._engine.core.scheduler.scheduler_config.max_model_len,
            engine="native",
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

    @property
    def engine(self):
        """The AsyncEngine itself (tests read its scheduler's block usage)."""
        return self._engine

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        if request.response_format is not None and request.response_format.type != "text":
            raise InvalidRequestError(
                "response_format json_object/json_schema needs an engine with structured "
                "outputs: serve with --engine vllm", param="response_format")
        async for output in self._engine.generate(request.prompt_token_ids, request.params,
                                                  request.request_id):
            yield output

    async def abort(self, request_id: str) -> None:
        self._engine.abort(request_id)

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
