"""`ServerSettings`: everything `quiver serve` is configured by (flags or QUIVER_SERVER_* env).

Validated at start with messages that name the bad value; Helm values map one-to-one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Engine = Literal["auto", "native", "vllm", "onnx", "triton"]
ToolCallParser = Literal["auto", "hermes", "llama3_json", "mistral"]


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QUIVER_SERVER_", extra="forbid",
                                      protected_namespaces=())

    model: Path = Field(description="model dir or artifact dir (HF safetensors, ONNX ...)")
    engine: Engine = "auto"
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8001, ge=1, le=65535)
    # native engine
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    kv_cache_memory: float | None = Field(None, gt=0, description="KV cache GiB")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    max_model_len: int | None = Field(None, ge=1)
    max_waiting_requests: int = Field(1024, ge=1)
    enable_prefix_caching: bool = True
    enforce_eager: bool = Field(False, description="native engine: run the model eagerly "
                                "instead of compiling its layers with torch.compile")
    cpu_kernels: bool = Field(True, description="native engine: build (once per host) and use "
                              "Quiver's C++ CPU kernels; off: pure torch")
    compile_cache_dir: Path | None = Field(None, description="native engine: where built "
                                           "kernels and compiled graphs are kept (default "
                                           "$XDG_CACHE_HOME/quiver or ~/.cache/quiver)")
    # vllm engine
    tensor_parallel_size: int = Field(1, ge=1, description="vllm engine: GPUs one server "
                                      "shards the model over")
    vllm_engine_args: dict[str, Any] = Field(
        default_factory=dict, description="vllm engine: more vLLM engine arguments as a JSON "
        'object, e.g. \'{"quantization": "awq_marlin", "swap_space": 8}\'')
    # triton engine: the Triton server to forward to
    triton_url: str = "127.0.0.1:8000"
    triton_model: str | None = None
    # API
    tool_call_parser: ToolCallParser = Field(
        "auto", description="tool-call format: auto (told from the chat template; hermes "
        "for templates without tools), hermes, llama3_json or mistral")
    allow_failed_gate: bool = Field(
        False, description="serve an artifact whose manifest says its quality gate failed")
    embedding_pooling: Literal["mean", "last"] = Field(
        "mean", description="/v1/embeddings: mean of the prompt's final hidden states, or "
        "the last token's")
    # request limits, checked before any work (a 400 names the field past its limit)
    max_n: int = Field(16, ge=1, le=128, description="choices per request (n, best_of)")
    max_stop_sequences: int = Field(16, ge=0, le=256, description="stop strings per request")
    max_stop_token_ids: int = Field(64, ge=0, le=4096, description="stop token ids per request")
    max_prompts: int = Field(64, ge=1, le=2048, description="prompts per completions call or "
                             "KServe infer batch")
    max_logprobs: int = Field(20, ge=0, le=20, description="logprobs / top_logprobs")
    max_tools: int = Field(64, ge=0, le=128, description="tools per chat request")
    max_logit_bias: int = Field(300, ge=0, le=4096, description="logit_bias entries")
    # HTTP
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="request line + headers")
    header_timeout_seconds: float = Field(10.0, gt=0, description="until a request's "
                                          "headers are in; then the connection is closed")
    keep_alive_timeout_seconds: float = Field(75.0, gt=0, description="idle keep-alive "
                                              "connections close after this")
    max_connections: int = Field(2048, ge=1, description="beyond it a request gets 503")
    backlog: int = Field(2048, ge=1, description="listen() queue of unaccepted connections")
    shutdown_grace_seconds: float = Field(30.0, ge=0)
    log_json: bool = False

    @model_validator(mode="after")
    def _check_model(self) -> ServerSettings:
        if self.engine != "triton" and not self.model.is_dir():
            raise ValueError(f"model {self.model} is not a directory")
        if self.engine != "vllm" and (self.tensor_parallel_size > 1 or self.vllm_engine_args):
            raise ValueError("tensor_parallel_size and vllm_engine_args need --engine vllm "
                             f"(engine is {self.engine!r}; the native engine runs on one "
                             "device)")
        return self

    @property
    def name(self) -> str:
        """The model name clients send: --served-model-name, else the model dir's name."""
        return self.served_model_name or self.model.name

    def resolved_engine(self) -> str:
        """`auto`: the artifact's manifest decides (onnx, tensorrt -> onnx), else native."""
        if self.engine != "auto":
            return self.engine
        manifest = self.model / "manifest.json"
        if manifest.is_file():
            fmt = json.loads(manifest.read_text(encoding="utf-8")).get("format")
            if fmt in ("onnx", "tensorrt"):
                return "onnx"
        return "native"
