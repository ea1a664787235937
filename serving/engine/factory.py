"""Build a ready native engine from `EngineSettings`: device, dtype, KV budget, limits.

`EngineSettings` is the engine's part of the server's settings (`--device`, `--dtype`,
`--kv-cache-memory`, `--max-num-seqs`, `--max-num-batched-tokens`, `--max-model-len`,
`--enforce-eager`, `--cpu-kernels`, `--compile-cache-dir` ...);
every value is checked here with a message that names it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from serving.engine.async_engine import AsyncEngine
from serving.engine.config import (
    CacheConfig,
    CompilationConfig,
    SchedulerConfig,
    default_cache_dir,
    num_blocks_for_budget,
)
from serving.engine.core import EngineCore, RequestStates
from serving.engine.metrics import EngineMetrics
from serving.engine.model_runner import ModelRunner
from serving.engine.sampler import Sampler
from serving.engine.scheduler import Scheduler
from serving.kernels.build import load_cpu_kernels
from serving.kernels.ops import lowbit_kernels_run
from serving.models.compressed import QuantizationConfig
from serving.models.config import ModelArchConfig
from serving.models.quant import quiver_kernel_takes
from serving.structured.guided import GuidedDecoding

logger = logging.getLogger(__name__)

GIB = 1 << 30
DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float32": torch.float32}
DEFAULT_CPU_KV_CACHE_GIB = 2.0
# Kept free on a GPU for activations and the sampler when sizing the KV cache.
CUDA_ACTIVATION_RESERVE_BYTES = 1 * GIB


@dataclass(frozen=True, kw_only=True)
class EngineSettings:
    model: Path
    device: str = "auto"
    dtype: str = "auto"
    kv_cache_memory_gib: float | None = None  # None: 2 GiB on CPU, a share of a GPU
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    max_waiting_requests: int = 1024
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    cpu_kernels: bool = True
    compile_cache_dir: Path | None = None  # None: default_cache_dir()

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_memory_gib is not None and not self.kv_cache_memory_gib > 0:
            raise ValueError(f"kv_cache_memory must be > 0 GiB, got {self.kv_cache_memory_gib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1], "
                             f"got {self.gpu_memory_utilization}")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be 8, 16, 32, 64 or 128, got {self.block_size}")
        if not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"model {self.model} is not a model dir (no config.json)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is visible to torch")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN has native bf16 kernels (AVX512-BF16 / AMX); elsewhere torch
    emulates bf16 matmuls, several times slower than float32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_dtype(name: str, arch: ModelArchConfig, device: torch.device, *,
                  quantization: QuantizationConfig | None = None,
                  float32_lowbit_kernels: bool = False) -> torch.dtype:
    """`auto`: the checkpoint's dtype, except on a CPU, where half precision runs as
    bfloat16 if the CPU has native bf16 kernels and as float32 otherwise (the fastest
    exact-enough choice on each). A weight-only int8/int4 checkpoint (`quantization`) runs
    bfloat16 on a CPU with native bf16; without it, float32 where Quiver's float32 low-bit
    kernels run (`float32_lowbit_kernels`: the C++ library loaded on an AVX2 CPU) and take
    every scheme the checkpoint uses, else still bfloat16: torch's own low-bit CPU kernels
    are vectorised for bf16 activations and scalar for float32 (measured on SmolLM2 at batch
    1: int4 33 ms/step in bf16 vs 316 ms in fp32). An explicit dtype is always honoured."""
    dtype = DTYPES[name] or arch.dtype
    if name != "auto" or device.type != "cpu":
        return dtype
    if quantization is not None:
        if cpu_has_fast_bf16() or not float32_lowbit_kernels:
            return torch.bfloat16
        takes = all(quiver_kernel_takes(args) for _, args in quantization.groups)
        return torch.float32 if takes else torch.bfloat16
    if dtype == torch.float32:
        return dtype
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def model_dtype(model_dir: Path, name: str, device: torch.device, *, cpu_kernels: bool = True,
                cache_dir: Path | None = None) -> torch.dtype:
    """The dtype the engine runs `model_dir` in for `--dtype NAME`: `resolve_dtype` given
    the model's config and, for a quantized model on a CPU, whether Quiver's low-bit kernels
    take float32 rows here (C++ kernels wanted, the library built or cached in `cache_dir`
    and loaded, an AVX2 CPU)."""
    arch = ModelArchConfig.from_model_dir(model_dir)
    quantization = QuantizationConfig.from_model_dir(model_dir)
    float32_lowbit = False
    if quantization is not None and device.type == "cpu" and name == "auto" and cpu_kernels:
        loaded = load_cpu_kernels(cache_dir or default_cache_dir())
        float32_lowbit = loaded.library is not None and lowbit_kernels_run(torch.float32)
    return resolve_dtype(name, arch, device, quantization=quantization,
                         float32_lowbit_kernels=float32_lowbit)


def kv_cache_budget_bytes(settings: EngineSettings, device: torch.device) -> int:
    if settings.kv_cache_memory_gib is not None:
        return int(settings.kv_cache_memory_gib * GIB)
    if device.type == "cpu":
        return int(DEFAULT_CPU_KV_CACHE_GIB * GIB)
    free, total = torch.cuda.mem_get_info(device)
    weights = sum(p.stat().st_size for p in Path(settings.model).glob("*.safetensors"))
    budget = total * settings.gpu_memory_utilization - (total - free) - weights
    budget -= CUDA_ACTIVATION_RESERVE_BYTES
    if budget <= 0:
        raise ValueError("no GPU memory left for the KV cache: raise gpu_memory_utilization "
                         "or set kv_cache_memory")
    return int(budget)


def eos_token_ids(model_dir: Path, arch: ModelArchConfig) -> tuple[int, ...]:
    """EOS ids of config.json, then any extra ones of generation_config.json (Llama 3)."""
    ids = list(arch.eos_token_ids)
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        extra = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        for token_id in extra if isinstance(extra, list) else [extra]:
            if isinstance(token_id, int) and token_id not in ids:
                ids.append(token_id)
    return tuple(ids)


def _scheduler_config(settings: EngineSettings, arch: ModelArchConfig,
                      num_blocks: int) -> SchedulerConfig:
    limit = arch.max_position_embeddings
    if settings.max_model_len is not None and settings.max_model_len > limit:
        raise ValueError(f"max_model_len {settings.max_model_len} is larger than the model's "
                         f"max_position_embeddings ({limit})")
    max_model_len = min(settings.max_model_len or limit, num_blocks * settings.block_size)
    return SchedulerConfig(
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_model_len=max_model_len,
        max_waiting_requests=settings.max_waiting_requests,
    )


def build_engine(settings: EngineSettings, *, model_name: str,
                 registry: CollectorRegistry | None = None,
                 guided: GuidedDecoding | None = None) -> AsyncEngine:
    """Load the model, size the KV cache and return a started engine; `guided` enforces
    requests' guides in the sampler (without it they must be refused before admission)."""
    start = time.perf_counter()
    arch = ModelArchConfig.from_model_dir(settings.model)
    device = resolve_device(settings.device)
    dtype = model_dtype(settings.model, settings.dtype, device, cpu_kernels=settings.cpu_kernels,
                        cache_dir=settings.compile_cache_dir)
    num_blocks = num_blocks_for_budget(
        kv_cache_budget_bytes(settings, device), num_layers=arch.num_hidden_layers,
        num_kv_heads=arch.num_key_value_heads, head_dim=arch.head_dim,
        block_size=settings.block_size, dtype_bytes=torch.empty((), dtype=dtype).element_size(),
    )
    scheduler_config = _scheduler_config(settings, arch, num_blocks)
    cache_config = CacheConfig(block_size=settings.block_size, num_blocks=num_blocks,
                               enable_prefix_caching=settings.enable_prefix_caching)
    sampler = Sampler(device, guided=guided)
    compilation = CompilationConfig(
        enforce_eager=settings.enforce_eager, use_cpp_kernels=settings.cpu_kernels,
        cache_dir=settings.compile_cache_dir or default_cache_dir())
    runner = ModelRunner(Path(settings.model), device=device, dtype=dtype,
                         num_blocks=num_blocks, block_size=settings.block_size, sampler=sampler,
                         compilation=compilation, max_num_seqs=scheduler_config.max_num_seqs,
                         max_model_len=scheduler_config.max_model_len)
    core = EngineCore(Scheduler(scheduler_config, cache_config), runner,
                      RequestStates(sampler, runner.pooler))
    metrics = EngineMetrics(registry, model_name) if registry is not None else None
    engine = AsyncEngine(core, eos_token_ids=eos_token_ids(settings.model, arch),
                         metrics=metrics)
    engine.start()
    logger.info("native engine ready in %.1f s: %s on %s (%s), %d KV blocks x %d tokens, "
                "max_model_len %d", time.perf_counter() - start, settings.model, device,
                str(dtype).removeprefix("torch."), num_blocks, settings.block_size,
                scheduler_config.max_model_len)
    return engine
