"""Turn one `benchmarks/engine.py` run into its JSON summary, table and plot.

Ratios are taken within the run (these hosts are noisy; ratios move less than absolute
figures). The targets are DESIGN.md's, against vLLM's default (compiled) server.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ANCHOR = "vllm"
TARGETS = {  # name: (what, threshold, higher is better)
    "c32_vs_vllm": ("native tokens/s at 32 concurrent / vLLM default's", 1.5, True),
    "c1_vs_vllm": ("native tokens/s at 1 request / vLLM default's", 1.2, True),
    "ready_cold_vs_vllm": ("native time to ready / vLLM default's, cold caches", 1 / 3, False),
    "ready_warm_vs_vllm": ("native time to ready / vLLM default's, warm caches", 1 / 5, False),
}


def rate(result: dict | None, concurrency: int) -> float | None:
    for level in (result or {}).get("levels", []):
        if level["concurrency"] == concurrency:
            return level["tokens_per_s"]
    return None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def summarize(results: dict, ceiling: dict, cpu: dict, args: argparse.Namespace) -> dict:
    ceilings = {row["batch"]: row for row in ceiling["ceiling"]}
    rows = []
    for concurrency in args.concurrency:
        rates = {name: rate(result, concurrency) for name, result in results.items()}
        native = rates.get("native")
        row_ceiling = ceilings.get(concurrency, {}).get("ceiling_tokens_per_s")
        rows.append({
            "concurrency": concurrency, "tokens_per_s": rates,
            "native_vs": {name: ratio(native, other) for name, other in rates.items()
                          if name != "native"},
            "gemm_ceiling_tokens_per_s": row_ceiling,
            "native_share_of_ceiling": ratio(native, row_ceiling),
        })
    native, anchor = results.get("native", {}), results.get(ANCHOR, {})
    measured = {
        "c32_vs_vllm": ratio(rate(native, 32), rate(anchor, 32)),
        "c1_vs_vllm": ratio(rate(native, 1), rate(anchor, 1)),
        "ready_cold_vs_vllm": ratio(native.get("ready_cold_s"), anchor.get("ready_cold_s")),
        "ready_warm_vs_vllm": ratio(native.get("ready_warm_s"), anchor.get("ready_warm_s")),
    }
    targets = {
        name: {"what": what, "target": round(threshold, 3), "measured": measured[name],
               "met": None if measured[name] is None else
               (measured[name] >= threshold if higher else measured[name] <= threshold)}
        for name, (what, threshold, higher) in TARGETS.items()
    }
    return {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": str(args.model), "prompt_tokens": args.prompt_tokens,
            "output_tokens": args.output_tokens, "cpu": cpu, "gemm_ceiling": ceiling,
            "servers": results, "by_concurrency": rows, "targets": targets}


def table(summary: dict) -> str:
    names = list(summary["servers"])
    lines = [f"CPU: {summary['cpu']['model']} ({summary['cpu']['cores']} cores; "
             f"{' '.join(summary['cpu']['flags'])})"
             + (f"; native on {summary['cpu']['gpu']}" if "gpu" in summary["cpu"] else ""),
             "tokens/s        " + "".join(f"{name:>14}" for name in names)
             + f"{'GEMM ceiling':>14}{'native share':>14}"]
    for row in summary["by_concurrency"]:
        cells = "".join(f"{row['tokens_per_s'][name] or '-':>14}" for name in names)
        lines.append(f"c={row['concurrency']:<14}{cells}"
                     f"{row['gemm_ceiling_tokens_per_s'] or '-':>14}"
                     f"{row['native_share_of_ceiling'] or '-':>14}")
    for key, label in (("ready_cold_s", "ready cold (s)"), ("ready_warm_s", "ready warm (s)")):
        lines.append(f"{label:<16}" + "".join(
            f"{summary['servers'][name].get(key, '-'):>14}" for name in names))
    for name, target in summary["targets"].items():
        verdict = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
        lines.append(f"{name}: {target['measured']} (target {target['target']}): {verdict}")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrency = [row["concurrency"] for row in summary["by_concurrency"]]
    fig, ax = plt.subplots(figsize=(7.0, 4.4), dpi=100)
    for name, result in summary["servers"].items():
        label = (f"{name} (ready {result['ready_cold_s']:.0f} s cold, "
                 f"{result['ready_warm_s']:.0f} s warm)")
        ax.plot(concurrency, [rate(result, c) for c in concurrency], marker="o", label=label)
    ceiling = [row["gemm_ceiling_tokens_per_s"] for row in summary["by_concurrency"]]
    if any(ceiling):  # measured on CPU runs only
        ax.plot(concurrency, ceiling, linestyle="--", color="gray",
                label="GEMM ceiling (decode)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(concurrency, [str(c) for c in concurrency])
    ax.set_xlabel("concurrent requests (streamed, through each HTTP server)")
    ax.set_ylabel("output tokens / s")
    cpu = summary["cpu"]
    ax.set_title(f"SmolLM2-135M, {summary['prompt_tokens']} in / {summary['output_tokens']} out\n"
                 + (f"native on {cpu['gpu']}; " if "gpu" in cpu else "")
                 + f"{cpu['model']}, {cpu['cores']} cores, {' '.join(cpu['flags'])}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
