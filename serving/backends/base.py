"""The one interface every engine is served through.

Handlers tokenize with the served model's tokenizer, build a `GenerationRequest`, and read
`RequestOutput` deltas (token ids per choice) back; detokenization, stop strings and the
wire format stay in the serving layer, so every engine behaves the same over HTTP.
Engine errors use `serving.engine.errors` (InvalidRequestError -> 400, PromptTooLongError
-> 400, QueueFullError -> 503 + Retry-After, EngineDeadError -> 503).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from serving.engine.outputs import RequestOutput
from serving.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # its `guide` and `logit_bias` too: every engine honours or refuses them
    # W3C trace context of the server span, for engines that trace on their own.
    trace_headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    served_model_name: str
    model_dir: Path | None
    max_model_len: int
    engine: str
    supports_structured_output: bool = False
    supports_embeddings: bool = False


class EngineClient(Protocol):
    """An engine as the server sees it. `generate` raises engine errors before its first
    output; leaving the iterator early aborts the request and frees its resources."""

    @property
    def info(self) -> ModelInfo: ...

    @property
    def is_ready(self) -> bool: ...

    @property
    def num_unfinished_requests(self) -> int: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    async def abort_choice(self, request_id: str, index: int) -> None:
        """End choice `index` (< n) of a running request now, so it stops generating and
        frees what it holds while its siblings go on (the serving layer calls this when a
        choice hits a stop string). The request's stream may still carry that choice's
        last delta (finish reason `abort`) and ends once no choice is left. Unknown ids,
        finished choices and out-of-range indexes are ignored."""
        ...

    async def shutdown(self) -> None: ...

    def metrics_text(self) -> bytes:
        """Prometheus exposition of engine metrics the server's own registry lacks (vLLM's
        re-exported ones); empty when the engine writes into the server's registry."""
        ...
