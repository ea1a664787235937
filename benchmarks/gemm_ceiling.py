"""The host's GEMM ceiling for one model's decode step: `python benchmarks/gemm_ceiling.py DIR`.

A decode step at batch B multiplies B rows through every projection of every layer and the
LM head. Timed here alone, in the dtype `quiver serve --dtype auto` runs here, with the
fastest path on this host per shape — oneDNN on weights reordered for that batch, plain
`F.linear`, or Quiver's own `quiver::linear` on weights packed as the engine packs them (its
bandwidth-bound kernel at one or two rows, its tile kernel from three up on AVX512-BF16
CPUs, bf16 panels for a bf16 checkpoint served in float32 on AVX2) where its C++ library
builds (cached under
`--kernel-cache`) — and one weight copy per layer, so weights stream from memory as they
do in a real step. B divided by that time is the most tokens/s any engine could decode at
batch B on this host with these kernels: the share of it an engine reaches says how much of
its step is not GEMM. Prints one JSON line (`kernels`: which path won each shape).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.models.config import ModelArchConfig  # noqa: E402
from serving.models.linear import onednn_supports  # noqa: E402

TRIALS = 5


def decode_shapes(model_dir: Path) -> tuple[list[tuple[int, int]], int, tuple[int, int]]:
    """(N, K) of one layer's fused projections, the layer count, the LM head's (N, K)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    qkv = (heads + 2 * kv_heads) * head_dim
    layer = [(qkv, hidden), (hidden, heads * head_dim), (2 * config["intermediate_size"], hidden),
             (hidden, config["intermediate_size"])]
    return layer, config["num_hidden_layers"], (config["vocab_size"], hidden)


def time_shape(n: int, k: int, batch: int, copies: int, dtype: torch.dtype,
               with_quiver: bool, stored: torch.dtype) -> tuple[float, str]:
    """(seconds, kernel) of the fastest multiply of `batch` rows by an [n, k] weight,
    `copies` distinct weights cycled so none stays in cache. `stored`: the checkpoint's
    dtype — a bf16 checkpoint served in float32 has bf16 values, which Quiver's panel
    kernel takes (`csrc/panel_linear.h`)."""
    weights = [torch.randn(n, k).to(stored).to(dtype) for _ in range(copies)]
    x = torch.randn(batch, k).to(dtype)
    candidates = {"f.linear": lambda i: F.linear(x, weights[i])}
    if onednn_supports(x.device, dtype):  # bf16 needs AVX-512 (or AVX-NE-CONVERT)
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, batch) for w in weights]
        candidates["onednn"] = lambda i: torch.ops.mkldnn._linear_pointwise(
            x, packed[i], None, "none", [], "")
    if with_quiver:  # packed as the engine packs them (tiles, or oneDNN's layout as above)
        for weight in weights:
            torch.ops.quiver.pack_linear_weight(weight, batch)
        candidates["quiver"] = lambda i: torch.ops.quiver.linear(x, weights[i], None)
    best, best_kernel = float("inf"), ""
    for kernel, fn in candidates.items():
        for i in range(copies):
            fn(i)
        for _ in range(TRIALS):  # the best trial: this host's noise only ever adds time
            start = time.perf_counter()
            for i in range(copies):
                fn(i)
            elapsed = (time.perf_counter() - start) / copies
            if elapsed < best:
                best, best_kernel = elapsed, kernel
    return best, best_kernel


def ceiling(model_dir: Path, batch: int, dtype: torch.dtype, with_quiver: bool) -> dict:
    layer, num_layers, lm_head = decode_shapes(model_dir)
    stored = ModelArchConfig.from_model_dir(model_dir).dtype
    copies = num_layers  # every layer its own weights: they stream from memory as in a step
    timed = [time_shape(n, k, batch, copies, dtype, with_quiver, stored) for n, k in layer]
    lm_head_s, lm_head_kernel = time_shape(*lm_head, batch, 2, dtype, with_quiver, stored)
    step_s = sum(seconds for seconds, _ in timed) * num_layers + lm_head_s
    flops = 2 * batch * (num_layers * sum(n * k for n, k in layer) + lm_head[0] * lm_head[1])
    return {"batch": batch, "gemm_ms_per_step": round(step_s * 1e3, 2),
            "gflop_per_s": round(flops / step_s / 1e9, 1),
            "ceiling_tokens_per_s": round(batch / step_s, 1),
            "kernels": [kernel for _, kernel in timed] + [lm_head_kernel]}


def serving_dtype(model_dir: Path, name: str, *, cpu_kernels: bool = True,
                  cache_dir: Path | None = None) -> torch.dtype:
    """The dtype `quiver serve --dtype NAME` runs the model in on this CPU (auto: bf16 where
    oneDNN has native bf16 kernels, else float32 — for a quantized model only where Quiver's
    float32 low-bit kernels, from the C++ library in `cache_dir`, run: see
    `serving.engine.factory.model_dtype`)."""
    from serving.engine.factory import model_dtype

    return model_dtype(model_dir, name, torch.device("cpu"), cpu_kernels=cpu_kernels,
                       cache_dir=cache_dir)


def load_quiver_kernels(cache_dir: Path) -> bool:
    from serving.kernels.build import load_cpu_kernels

    loaded = load_cpu_kernels(cache_dir)
    if loaded.library is None:
        print(f"quiver::linear left out: {loaded.reason}", file=sys.stderr)
    return loaded.library is not None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", type=Path)
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="auto: what `quiver serve --dtype auto` runs the model in here")
    parser.add_argument("--kernel-cache", type=Path, default=None,
                        help="where Quiver's C++ library is built and cached (default: "
                             "quiver serve's compile cache); 'none' leaves quiver::linear out")
    args = parser.parse_args()
    from serving.engine.config import default_cache_dir

    with_quiver = str(args.kernel_cache) != "none" and load_quiver_kernels(
        args.kernel_cache or default_cache_dir())
    dtype = serving_dtype(args.model, args.dtype, cpu_kernels=with_quiver,
                          cache_dir=args.kernel_cache)
    torch.manual_seed(0)
    with torch.inference_mode():
        rows = [ceiling(args.model, int(batch), dtype, with_quiver)
                for batch in args.batches.split(",")]
    print(json.dumps({"dtype": str(dtype).removeprefix("torch."),
                      "threads": torch.get_num_threads(), "quiver_kernels": with_quiver,
                      "ceiling": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
