"""Quiver's own linear kernels against the ones they replace, on one model's shapes.

    python benchmarks/linear_kernels.py [MODEL_DIR] [--rows 1,2,8,32,512,2048]
                                        [--dtype auto|bfloat16|float32]

In the dtype the engine serves the model in here (auto: bf16 where oneDNN has native bf16
kernels, else float32), for each projection shape of the model's decoder layers and its LM
head, and each row count, the time per call of:
- `onednn`: oneDNN's bf16 GEMM on a weight reordered once (what `quiver::linear` ran past
  two rows before the tile kernel, and still runs where tiles do not apply), the reference
  every ratio is taken against;
- `skinny`: `quiver::linear` at one or two rows (csrc/skinny_linear.h, the plain weight);
- `tiles`: `quiver::linear` from three rows up on a weight packed into tiles
  (csrc/tile_linear.h; AVX512-BF16, N a multiple of 32);
- `int8`, `int8-torch`: `quiver::int8_linear` and torch's `_weight_int8pack_mm` (per-channel
  int8; torch's only up to 32 rows, where the engine stops using it);
- `int4`, `int4-torch`: `quiver::int4_linear` and torch's `_weight_int4pack_mm_for_cpu`
  (group 64, zero points);
- in float32, `panels`: `quiver::linear` on a bf16 checkpoint's weight upcast to float32,
  packed as bf16 panels (csrc/panel_linear.h; AVX2), against oneDNN's float32 GEMM; and the
  same `int8`/`int4` columns on float32 rows (csrc/lowbit_float.h; AVX2 and FMA), torch's
  float32 low-bit kernels (scalar loops) only up to two rows.
Shapes a kernel cannot take (N not a multiple of its tile, K not of its group) leave it out.
Random weights, one copy per layer cycled so they stream from memory as in a decode step;
the best of several timed passes (this host's noise only ever adds time). Prints a table
(times in us, and each kernel's time over oneDNN's) with the CPU's flags; results:
benchmarks/results/linear_kernels.json. Quiver's low-bit kernels need AVX512-BF16 for bf16
rows and AVX2 with FMA for float32 rows: without them their columns are left out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engine import cpu_info  # noqa: E402
from benchmarks.gemm_ceiling import decode_shapes, serving_dtype  # noqa: E402
from serving.engine.config import default_cache_dir  # noqa: E402
from serving.kernels.build import load_cpu_kernels  # noqa: E402
from serving.kernels.ops import lowbit_kernels_run  # noqa: E402
from serving.models.quant import int4_tiles, int8_tiles  # noqa: E402

TRIALS = 5
GROUP = 64
TORCH_INT8_MAX_ROWS = 32
TORCH_FLOAT32_MAX_ROWS = 2  # torch's float32 low-bit kernels are scalar loops


def best_time(call: Callable[[int], object], copies: int) -> float:
    """Seconds per call, `call(i)` cycling through `copies` weights."""
    for i in range(copies):
        call(i)
    best = float("inf")
    for _ in range(TRIALS):
        start = time.perf_counter()
        for i in range(copies):
            call(i)
        best = min(best, (time.perf_counter() - start) / copies)
    return best


def kernels_for(n: int, k: int, copies: int, lowbit: bool,
                dtype: torch.dtype) -> dict[str, Callable]:
    """Each kernel as `fn(x, i)` over `copies` random weights of shape [n, k]."""
    if dtype == torch.float32:
        return float32_kernels(n, k, copies, lowbit)
    floats = [torch.randn(n, k).bfloat16() for _ in range(copies)]
    reordered = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in floats]
    kernels = {
        "onednn": lambda x, i: torch.ops.mkldnn._linear_pointwise(x, reordered[i], None,
                                                                  "none", [], ""),
        "skinny": lambda x, i: torch.ops.quiver.linear(x, floats[i], None),
    }
    if not lowbit:
        return kernels
    if n % 32 == 0 and k % 2 == 0:  # the tile kernel's shapes; skinny keeps one or two rows
        for weight in floats:
            torch.ops.quiver.pack_linear_weight(weight, 1)
        kernels["tiles"] = lambda x, i: torch.ops.quiver.linear(x, floats[i], None)
    kernels.update(lowbit_kernels(n, k, copies, torch.bfloat16))
    return kernels


def lowbit_kernels(n: int, k: int, copies: int, dtype: torch.dtype) -> dict[str, Callable]:
    kernels = {}
    if n % 16 == 0 and k % 2 == 0:  # the tiles' shape (torch's int4 packs 32 or 64 rows a block)
        kernels.update(int8_kernels(n, k, copies, dtype))
    if k % GROUP == 0 and n % 64 == 0:
        kernels.update(int4_kernels(n, k, copies, dtype))
    return kernels


def float32_kernels(n: int, k: int, copies: int, lowbit: bool) -> dict[str, Callable]:
    """float32 rows on a bf16 checkpoint's weights upcast to float32 (what `--dtype auto`
    serves on a CPU without native bf16): oneDNN's float32 GEMM against the panel kernel on
    their bf16 copy."""
    floats = [torch.randn(n, k).bfloat16().float() for _ in range(copies)]
    reordered = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in floats]
    kernels = {"onednn": lambda x, i: torch.ops.mkldnn._linear_pointwise(x, reordered[i], None,
                                                                         "none", [], ""),
               "f.linear": lambda x, i: F.linear(x, floats[i])}
    for weight in floats:
        torch.ops.quiver.pack_linear_weight(weight, 1)
    if torch.ops.quiver.packed_linear_layout(floats[0]) == "panels":
        kernels["panels"] = lambda x, i: torch.ops.quiver.linear(x, floats[i], None)
    if lowbit:
        kernels.update(lowbit_kernels(n, k, copies, torch.float32))
    return kernels


def int8_kernels(n: int, k: int, copies: int, dtype: torch.dtype) -> dict[str, Callable]:
    q8 = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(copies)]
    tiles8 = [int8_tiles(q) for q in q8]
    scale8 = [torch.rand(n) for _ in range(copies)]
    scale8_torch = [s.to(dtype) for s in scale8]
    return {
        "int8": lambda x, i: torch.ops.quiver.int8_linear(x, tiles8[i], scale8[i], None),
        "int8-torch": lambda x, i: torch._weight_int8pack_mm(x, q8[i], scale8_torch[i]),
    }


def int4_kernels(n: int, k: int, copies: int, dtype: torch.dtype) -> dict[str, Callable]:
    u4 = [torch.randint(0, 16, (n, k), dtype=torch.int32) for _ in range(copies)]
    tiles4 = [int4_tiles(u) for u in u4]
    scale4 = [torch.rand(k // GROUP, n) for _ in range(copies)]
    offset4 = [torch.rand(k // GROUP, n) for _ in range(copies)]
    torch4 = [torch._convert_weight_to_int4pack_for_cpu(u, 1) for u in u4]
    scales_zeros4 = [torch.stack([s, o], -1).to(dtype) for s, o in zip(scale4, offset4,
                                                                       strict=True)]
    return {
        "int4": lambda x, i: torch.ops.quiver.int4_linear(x, tiles4[i], GROUP, scale4[i],
                                                          offset4[i]),
        "int4-torch": lambda x, i: torch._weight_int4pack_mm_for_cpu(x, torch4[i], GROUP,
                                                                     scales_zeros4[i]),
    }


def applies(kernel: str, rows: int, dtype: torch.dtype) -> bool:
    if kernel == "skinny":
        return rows <= 2
    if kernel == "tiles":
        return rows >= 3
    if kernel.endswith("-torch") and dtype == torch.float32:
        return rows <= TORCH_FLOAT32_MAX_ROWS
    return kernel != "int8-torch" or rows <= TORCH_INT8_MAX_ROWS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path,
                        default=ROOT / "models/smollm2-135m-instruct")
    parser.add_argument("--rows", default="1,2,8,32,512,2048",
                        type=lambda text: [int(r) for r in text.split(",")])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="auto: what `quiver serve --dtype auto` runs SmolLM2 in here")
    parser.add_argument("--kernel-cache", type=Path, default=None,
                        help="where Quiver's C++ library is built (default: quiver serve's)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    loaded = load_cpu_kernels(args.kernel_cache or default_cache_dir())
    if loaded.library is None:
        raise SystemExit(f"Quiver's C++ kernels did not build: {loaded.reason}")
    dtype = serving_dtype(args.model, args.dtype, cache_dir=args.kernel_cache)
    lowbit = lowbit_kernels_run(dtype)
    layer, num_layers, lm_head = decode_shapes(args.model)
    torch.manual_seed(0)
    results = []
    with torch.inference_mode():
        for n, k in [*layer, lm_head]:
            copies = num_layers if (n, k) != lm_head else 2
            kernels = kernels_for(n, k, copies, lowbit, dtype)
            for rows in args.rows:
                x = torch.randn(rows, k).to(dtype)
                times = {name: best_time(lambda i, fn=fn, x=x: fn(x, i), copies)
                         for name, fn in kernels.items() if applies(name, rows, dtype)}
                results.append({"shape": [n, k], "rows": rows,
                                "us": {name: round(t * 1e6, 1) for name, t in times.items()},
                                "vs_onednn": {name: round(t / times["onednn"], 2)
                                              for name, t in times.items()}})
    cpu = cpu_info()
    print(f"CPU: {cpu['model']} ({cpu['cores']} cores; {' '.join(cpu['flags'])}); {dtype}")
    for row in results:
        ratios = "  ".join(f"{name} {us:.0f} ({row['vs_onednn'][name]}x)"
                           for name, us in row["us"].items())
        print(f"{row['shape'][0]}x{row['shape'][1]} rows={row['rows']}: {ratios}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "linear_kernels.json").write_text(json.dumps(
        {"cpu": cpu, "model": str(args.model), "dtype": str(dtype).removeprefix("torch."),
         "lowbit_kernels": lowbit, "group": GROUP,
         "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
