"""`ServerState`: everything a request needs, stored once on `app.state.server`.

Routers read it as `request.app.state.server` (the KServe router too); nothing is global.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from common.asgi import HttpMetrics
from serving.artifact import ArtifactSummary
from serving.backends.base import EngineClient
from serving.errors import ServiceUnavailableError
from serving.handlers.chat import ChatHandler
from serving.handlers.completions import CompletionHandler
from serving.handlers.context import HandlerContext
from serving.handlers.embeddings import EmbeddingHandler
from serving.handlers.kserve import KServeHandler
from serving.handlers.limits import RequestLimits
from serving.settings import ServerSettings


@dataclass
class ServerState:
    settings: ServerSettings
    engine: EngineClient
    tokenizer: Any
    registry: CollectorRegistry
    http_metrics: HttpMetrics
    vocab_size: int
    created: int = field(default_factory=lambda: int(time.time()))
    # True from the moment shutdown starts: /ready says 503, new generations are refused.
    draining: bool = False
    chat: ChatHandler = field(init=False)
    completions: CompletionHandler = field(init=False)
    kserve: KServeHandler = field(init=False)
    embeddings: EmbeddingHandler = field(init=False)
    artifact: ArtifactSummary = field(init=False)

    def __post_init__(self) -> None:
        context = HandlerContext(self.engine, self.tokenizer, self.model_name, self.vocab_size,
                                 tool_call_parser=self.settings.tool_call_parser,
                                 limits=RequestLimits.from_settings(self.settings))
        self.chat = ChatHandler(context)
        self.completions = CompletionHandler(context)
        self.kserve = KServeHandler(context)
        self.embeddings = EmbeddingHandler(context, pooling=self.settings.embedding_pooling)
        self.artifact = ArtifactSummary.read(self.engine.info.model_dir)
        self.artifact.register_metrics(self.registry, model=self.model_name)

    @property
    def model_name(self) -> str:
        return self.engine.info.served_model_name

    @property
    def is_ready(self) -> bool:
        return self.engine.is_ready and not self.draining

    def check_accepting(self) -> None:
        """New generations are refused (503, retry shortly) once shutdown has begun."""
        if self.draining:
            raise ServiceUnavailableError("the server is shutting down", code="draining",
                                          retry_after_s=1)
