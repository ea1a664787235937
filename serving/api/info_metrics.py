"""The model server's own process metrics: the model's load time (build info and process
resources are `common.build_info`'s)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge


def register_model_load_time(registry: CollectorRegistry, *, model: str,
                             seconds: float) -> None:
    Gauge("quiver_server_model_load_seconds",
          "Seconds from start to a loaded model (tokenizer and engine)", ["model_name"],
          registry=registry).labels(model).set(seconds)
