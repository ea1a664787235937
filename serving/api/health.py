"""`/health` (the process is alive), `/ready` (model loaded, engine running, not draining),
`/metrics` (the server's registry: engine vllm:* + HTTP metrics, plus what the engine
exports on its own, such as vLLM's re-exported metrics)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.api.state import ServerState
from serving.errors import ServiceUnavailableError

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.server


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> dict[str, str]:
    state = _state(request)
    if state.draining:
        raise ServiceUnavailableError("the server is shutting down", code="draining")
    if not state.engine.is_ready:
        raise ServiceUnavailableError("the engine is not running", code="engine_not_ready")
    return {"status": "ready", "model": state.model_name}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = _state(request)
    body = generate_latest(state.registry) + state.engine.metrics_text()
    return Response(body, media_type=CONTENT_TYPE_LATEST)
