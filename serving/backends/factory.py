"""Pick and build the EngineClient for `ServerSettings.engine` (heavy imports stay lazy)."""

from __future__ import annotations

import importlib

from prometheus_client import CollectorRegistry

from serving.backends.base import EngineClient
from serving.settings import ServerSettings

# engine -> (module, the extra that installs it)
BACKENDS = {
    "native": ("serving.backends.native", "quiver[serve]"),
    "vllm": ("serving.backends.vllm", ".venv-vllm (make vllm), or `pip install vllm` on GPUs"),
    "onnx": ("serving.backends.onnx", "quiver[optimize] (onnxruntime, onnxruntime-genai)"),
    "triton": ("serving.backends.triton", "tritonclient[http]"),
}


def create_engine_client(settings: ServerSettings, registry: CollectorRegistry) -> EngineClient:
    """Each backend module exposes `create(settings, registry) -> EngineClient`."""
    engine = settings.resolved_engine()
    module_name, extra = BACKENDS[engine]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RuntimeError(f"the {engine} engine is not installed ({exc.name} missing): "
                           f"install {extra}") from exc
    return module.create(settings, registry)
