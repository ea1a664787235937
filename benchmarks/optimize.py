"""`quiver optimize` benchmark: every method on one model, measured the same way in one run.

    python benchmarks/optimize.py [--model models/smollm2-135m-instruct] [--only int8,awq,...]
                                  [--eval-samples 20] [--decode-tokens 64]
                                  [--distill-minutes 6 | --distill-steps N] [--skip-build]

Rows: the source checkpoint served as fp32 and as bf16 (the baselines, always measured),
int8, awq, onnx-fp32, onnx-int4, distill (half-depth student, KD) and distill-ce (the same
student, same steps, `--kd-weight 0`: the "without distillation" control).

Build: each artifact is made by the real CLI (`python -m quiver optimize METHOD ... --force`,
so a quality-gate failure still leaves the data point; its verdict is recomputed from the
manifest) into `artifacts/bench/<row>`. An artifact whose manifest names the same source
sha256 and the same parameters is reused, so a re-run only measures. The two students get
the same `--max-steps`: `--distill-steps`, else the steps that fit `--distill-minutes` of
KD training at the step time a short probe measures (a cap of twice the budget stops a
run that is slower than probed; unequal steps are then reported).

Measure, every row alike, each measurement in its own process (`optimize_worker.py`), one
after another: perplexity on the same held-out passages (`optimize.evaluate`: float32
scoring in the runtime that serves the artifact; taken from the manifest when it was
measured on the same tokens with the same baseline result), weight bytes, and decode
tokens/s at batch 1 and 32 through the serving engine (native engine for safetensors /
compressed-tensors, our onnx engine for ONNX; greedy, EOS ignored, after a warm-up),
`--repeats` round-robin rounds over all rows (median kept). Results (written after every
step) go to benchmarks/results/optimize.json and optimize.png; a README-ready markdown
table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This file is named like the `optimize` package: import that, not this script.
sys.path[:] = [str(ROOT)] + [p for p in sys.path
                             if Path(p or ".").resolve() != Path(__file__).resolve().parent]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_ARTIFACTS = ROOT / "artifacts" / "bench"
EVAL_DATA = "pydoc_data.topics:evaluation"
INT8_PPL, AWQ_PPL, AWQ_SIZE, ONNX_PARITY, DISTILL_SPEEDUP = 1.0, 8.0, 35.0, 1e-3, 1.6
GATES = {"int8": 1.0, "awq": 8.0, "onnx-fp32": 1.0, "onnx-int4": 10.0}
BATCHES = (1, 32)
TAIL_LINES = 40


@dataclass(frozen=True)
class Variant:
    name: str
    method: str | None                  # None: the source checkpoint itself
    cli_args: tuple[str, ...] = ()
    dtype: str = "auto"                 # native engine dtype for decoding
    expect: dict = field(default_factory=dict)  # manifest params a reused artifact must have


VARIANTS = [
    Variant("fp32", None, dtype="float32"),
    Variant("bf16", None, dtype="bfloat16"),
    Variant("int8", "int8"),
    Variant("awq", "awq"),
    Variant("onnx-fp32", "onnx", ("--precision", "fp32"), expect={"precision": "fp32"}),
    Variant("onnx-int4", "onnx", ("--precision", "int4"), expect={"precision": "int4"}),
    Variant("distill", "distill", ("--kd-weight", "0.5"), expect={"kd_weight": 0.5}),
    Variant("distill-ce", "distill", ("--kd-weight", "0"), expect={"kd_weight": 0.0}),
]
ALIASES = {"onnx": ["onnx-fp32", "onnx-int4"], "distill": ["distill", "distill-ce"],
           "baseline": []}


# -- subprocesses ------------------------------------------------------------------------

def run_streamed(cmd: list[str], prefix: str, timeout_s: float,
                 echo: bool = True) -> tuple[int, str, str]:
    """Run `cmd` in its own process group; echo its merged output line by line (tqdm's
    carriage returns count as line ends; a progress bar at most once a minute). Returns
    (exit code, full output, last lines); the group is killed on timeout (exit 124),
    Ctrl-C or any error."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=new_session)
    expired = threading.Event()
    timer = threading.Timer(timeout_s, lambda: (expired.set(), kill_group(proc)))
    timer.daemon = True
    timer.start()
    lines: list[str] = []
    last_bar, buffer = 0.0, b""
    try:
        while chunk := proc.stdout.read1(65536):
            *done, buffer = (buffer + chunk.replace(b"\r", b"\n")).split(b"\n")
            for line in (raw.decode(errors="replace").rstrip() for raw in done):
                if not line:
                    continue
                lines.append(line)
                is_bar = "%|" in line and "100%|" not in line
                if echo and (not is_bar or time.monotonic() - last_bar > 60):
                    last_bar = time.monotonic() if is_bar else last_bar
                    print(f"  [{prefix}] {line}", flush=True)
        lines += [buffer.decode(errors="replace")] if buffer.strip() else []
        code = proc.wait()
    finally:
        timer.cancel()
        kill_group(proc)
    tail = "\n".join(lines[-TAIL_LINES:])
    if expired.is_set():
        return 124, "\n".join(lines), f"{tail}\n{prefix} ran past {timeout_s:.0f} s"
    return code, "\n".join(lines), tail


def new_session() -> None:
    """Child setup: its own process group, and Ctrl-C handling even when this run was
    started in the background (which ignores SIGINT), so `kill_group` lets it clean up."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGINT (the optimize pipeline removes its staging dir), then SIGTERM, then SIGKILL."""
    for sig, grace_s in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def worker(task: dict, args: argparse.Namespace) -> dict:
    """One measurement in a fresh process: {"ok": True, ...result} or {"ok": False, error}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(task)]
    started = time.monotonic()
    load = round(os.getloadavg()[0], 2)
    code, output, tail = run_streamed(cmd, task["task"], args.timeout, echo=False)
    elapsed = round(time.monotonic() - started, 1)
    result_lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if code != 0 or not result_lines:
        print(f"  !! {task['task']} failed (exit {code}):\n{tail}", file=sys.stderr)
        return {"ok": False, "error": f"exit {code}: {tail[-1500:]}", "load_1m": load}
    return {"ok": True, **json.loads(result_lines[-1][7:]), "seconds": elapsed,
            "load_1m": load}


# -- building ------------------------------------------------------------------------------

def read_manifest(out: Path):
    from optimize.manifest import Manifest

    try:
        return Manifest.read(out)
    except Exception:  # noqa: BLE001 - an unreadable manifest is a stale artifact
        return None


def stale_reason(variant: Variant, out: Path, source_sha: str, expect: dict) -> str | None:
    """Why the artifact at `out` cannot be reused (None: it can)."""
    manifest = read_manifest(out)
    if manifest is None:
        return "no manifest"
    if manifest.method != variant.method:
        return f"method {manifest.method}"
    if manifest.source.sha256 != source_sha:
        return "source sha256 differs"
    for key, value in expect.items():
        if manifest.params.get(key) != value:
            return f"params.{key} = {manifest.params.get(key)!r}, want {value!r}"
    return None


def build(variant: Variant, out: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "quiver", "optimize", variant.method, "--model",
           str(args.model), "--out", str(out), "--eval-samples", str(args.eval_samples),
           "--eval-max-tokens", str(args.eval_max_tokens), "--decode-tokens", "0",
           "--force", "--overwrite", *variant.cli_args, *extra]
    print(f"== build {variant.name}: {' '.join(cmd[1:])}", flush=True)
    started = time.monotonic()
    code, _, tail = run_streamed(cmd, variant.name, args.build_timeout)
    seconds = round(time.monotonic() - started, 1)
    if code != 0 or read_manifest(out) is None:
        print(f"!! build {variant.name} failed (exit {code})", file=sys.stderr)
        return {"status": "build_failed", "build_seconds": seconds, "command": cmd[1:],
                "error": f"exit {code}; last lines:\n{tail}"}
    return {"status": "built", "build_seconds": seconds, "command": cmd[1:]}


def distill_steps(args: argparse.Namespace, wanted: list[Variant]) -> tuple[int, dict]:
    """The `--max-steps` both students get: given, else reused, else probed from the budget."""
    if args.distill_steps:
        return args.distill_steps, {"source": "--distill-steps"}
    for variant in wanted:
        manifest = read_manifest(args.artifacts / variant.name)
        if manifest is not None and manifest.method == "distill" and not args.rebuild_distill:
            return int(manifest.params["max_steps"]), {"source": f"reused {variant.name}"}
    probe = worker({"task": "distill_probe", "dir": str(args.model), "steps": 3}, args)
    if not probe["ok"]:
        return 100, {"source": "fallback (probe failed)", "probe": probe}
    steps = max(10, int(args.distill_minutes * 60 / probe["kd_step_s"]))
    print(f"   distill: {probe['kd_step_s']:.2f} s per KD step -> {steps} steps in "
          f"{args.distill_minutes:g} min", flush=True)
    return steps, {"source": "probe", "probe": probe}


def prepare(variant: Variant, args: argparse.Namespace, source_sha: str,
            steps: int | None) -> dict:
    """Make sure the artifact exists (build or reuse); returns the row's build record."""
    out = args.artifacts / variant.name
    expect, extra = dict(variant.expect), []
    if variant.method == "distill":
        expect["max_steps"] = steps
        extra = ["--max-steps", str(steps)]
        if not args.distill_steps:  # steps fitted to a budget: cap a much slower run
            extra += ["--minutes", f"{2 * args.distill_minutes:g}"]
    reason = stale_reason(variant, out, source_sha, expect)
    if reason is None:
        print(f"== {variant.name}: reusing {out}", flush=True)
        return {"status": "reused"}
    if args.skip_build:
        if read_manifest(out) is not None:
            return {"status": "stale", "stale_reason": reason}
        return {"status": "not_built", "error": f"--skip-build and {reason}"}
    print(f"== {variant.name}: building ({reason})", flush=True)
    return build(variant, out, args, extra)


# -- measuring -----------------------------------------------------------------------------

def param_count(model: Path) -> int:
    """Parameters in the source's safetensors files (from their headers, no tensors read)."""
    total = 0
    for path in sorted(model.glob("*.safetensors")):
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= dim
                total += count
    return total


def perplexity(row: dict, model_dir: Path, args: argparse.Namespace, base: dict | None) -> None:
    """From the manifest when it was measured on the same tokens against the same baseline
    result as this run's, else measured here."""
    manifest = read_manifest(model_dir)
    metrics = manifest.metrics if manifest else None
    if (base and metrics and metrics.perplexity and metrics.eval_data == EVAL_DATA
            and metrics.eval_tokens == base["eval_tokens"] and metrics.baseline_perplexity
            and abs(metrics.baseline_perplexity / base["perplexity"] - 1) < 1e-4):
        row.update(perplexity=metrics.perplexity, eval_tokens=metrics.eval_tokens,
                   ppl_source="manifest")
        return
    print(f"   {row['name']}: perplexity on {args.eval_samples} passages", flush=True)
    result = worker({"task": "ppl", "dir": str(model_dir), "samples": args.eval_samples,
                     "max_tokens": args.eval_max_tokens}, args)
    if result["ok"]:
        row.update(perplexity=result["perplexity"], eval_tokens=result["eval_tokens"],
                   ppl_source=f"measured ({result['runtime']})")
    else:
        row["errors"].append(f"perplexity: {result['error']}")


def decode_rounds(variants: list[Variant], rows: dict[str, dict],
                  args: argparse.Namespace) -> None:
    """Decode tokens/s of every row at each batch size, round-robin `--repeats` times
    (median kept), so a load spike on a shared machine hits every row alike."""
    live = [v for v in variants if "model_dir" in rows[v.name]]
    runs: dict[str, dict[int, list[dict]]] = {v.name: {b: [] for b in BATCHES} for v in live}
    for round_index in range(args.repeats):
        for variant, batch in ((v, b) for v in live for b in BATCHES):
            row = rows[variant.name]
            result = worker({"task": "decode", "dir": row["model_dir"], "dtype": variant.dtype,
                             "batch": batch, "tokens": args.decode_tokens}, args)
            runs[variant.name][batch].append(result)
            state = (f"{result['tokens_per_s']:.1f} tok/s ({result['engine']}, "
                     f"{result['dtype']}, load {result['load_1m']})" if result["ok"]
                     else "failed")
            print(f"   round {round_index + 1}/{args.repeats} {variant.name} b{batch}: {state}",
                  flush=True)
    for name, by_batch in runs.items():
        rows[name]["decode"] = {str(b): summarise(results) for b, results in by_batch.items()}
        for batch, result in rows[name]["decode"].items():
            if not result["ok"]:
                rows[name]["errors"].append(f"decode b{batch}: {result['error']}")


def summarise(results: list[dict]) -> dict:
    good = sorted((r for r in results if r["ok"]), key=lambda r: r["tokens_per_s"])
    if not good:
        return {"ok": False, "error": results[-1]["error"], "runs": results}
    middle = good[len(good) // 2]
    return {"ok": True, "tokens_per_s": middle["tokens_per_s"], "engine": middle["engine"],
            "dtype": middle["dtype"], "runs": [r.get("tokens_per_s") for r in results],
            "load_1m": [r["load_1m"] for r in results]}


def measure(variant: Variant, row: dict, args: argparse.Namespace, base: dict | None) -> None:
    from optimize.manifest import size_bytes

    model_dir = args.model if variant.method is None else args.artifacts / variant.name
    row["artifact"] = str(model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT)
                          else model_dir)
    manifest = read_manifest(model_dir) if variant.method else None
    row["manifest"] = manifest.model_dump(mode="json") if manifest else None
    row["size_bytes"] = ({"fp32": 4, "bf16": 2}[variant.name] * param_count(args.model)
                         if variant.method is None else size_bytes(model_dir))
    if base is not None and variant.method is None:
        row.update(perplexity=base["perplexity"], eval_tokens=base["eval_tokens"],
                   ppl_source="measured (native, float32 scoring)")
    else:
        perplexity(row, model_dir, args, base)
    row["model_dir"] = str(model_dir)


# -- analysis ------------------------------------------------------------------------------

def tok_s(row: dict | None, batch: int) -> float | None:
    result = (row or {}).get("decode", {}).get(str(batch))
    return result["tokens_per_s"] if result and result["ok"] else None


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def derive(rows: dict[str, dict]) -> None:
    """Per-row ratios against this run's baseline measurements."""
    bf16 = rows.get("bf16", {})
    base_ppl = bf16.get("perplexity")
    for name, row in rows.items():
        ppl = row.get("perplexity")
        row["delta_ppl_pct"] = (ppl / base_ppl - 1) * 100 if ppl and base_ppl else None
        size_ratio = ratio(row.get("size_bytes"), bf16.get("size_bytes"))
        row["size_pct_of_bf16"] = size_ratio * 100 if size_ratio is not None else None
        row["speed_vs_bf16_b1"] = ratio(tok_s(row, 1), tok_s(bf16, 1))
        row["speed_vs_fp32_b1"] = ratio(tok_s(row, 1), tok_s(rows.get("fp32"), 1))
        gate, rel = GATES.get(name), ratio(manifest_value(row, "metrics", "perplexity"),
                                           manifest_value(row, "metrics", "baseline_perplexity"))
        increase = row["manifest_ppl_increase_pct"] = (rel - 1) * 100 if rel else None
        if gate is not None and increase is not None:
            row["gate"] = {"max_ppl_increase": gate, "manifest_ppl_increase": increase,
                           "verdict": "pass" if increase <= gate else "fail (kept: --force)"}


def manifest_value(row: dict, *keys: str):
    value = row.get("manifest")
    for key in keys:
        value = (value or {}).get(key)
    return value


def teacher_row(rows: dict[str, dict], student: dict) -> dict | None:
    """The baseline decoded at the student's dtype (like for like)."""
    dtype = (student.get("decode", {}).get("1") or {}).get("dtype")
    return rows.get({"float32": "fp32", "bfloat16": "bf16"}.get(dtype, ""))


def check(name: str, value: float | None, passed: bool | None, detail: str) -> dict:
    verdict = "n/a" if value is None or passed is None else ("PASS" if passed else "MISS")
    return {"target": name, "value": value, "verdict": verdict, "detail": detail}


def targets(rows: dict[str, dict], margin_pct: float) -> list[dict]:
    get = rows.get
    out = []
    for name, limit in (("int8", INT8_PPL), ("awq", AWQ_PPL)):
        value = (get(name) or {}).get("delta_ppl_pct")
        out.append(check(f"{name} perplexity +<= {limit:g} %", value,
                         value is not None and value <= limit, fmt(value, "+.2f", " %")))
    size = (get("awq") or {}).get("size_pct_of_bf16")
    out.append(check(f"awq size <= {AWQ_SIZE:g} % of bf16", size,
                     size is not None and size <= AWQ_SIZE, fmt(size, ".1f", " %")))
    speed, vs_fp32 = ((get("awq") or {}).get(k) for k in ("speed_vs_bf16_b1",
                                                           "speed_vs_fp32_b1"))
    out.append(check("awq decode b1 faster than bf16", speed, speed is not None and speed > 1,
                     f"{fmt(speed, '.2f', 'x')} bf16; {fmt(vs_fp32, '.2f', 'x')} fp32"))
    diff = manifest_value(get("onnx-fp32") or {}, "metrics", "max_abs_logit_diff")
    out.append(check(f"onnx fp32 max |logit diff| <= {ONNX_PARITY:g}", diff,
                     diff is not None and diff <= ONNX_PARITY, fmt(diff, ".2e", " (manifest)")))
    out += distill_targets(rows, margin_pct)
    return out


def distill_targets(rows: dict[str, dict], margin_pct: float) -> list[dict]:
    student, control = rows.get("distill") or {}, rows.get("distill-ce") or {}
    teacher = teacher_row(rows, student) or {}
    speed = ratio(tok_s(student, 1), tok_s(teacher, 1))
    speed32 = ratio(tok_s(student, 32), tok_s(teacher, 32))
    out = [check(f"distilled student decode b1 >= {DISTILL_SPEEDUP:g}x teacher", speed,
                 speed is not None and speed >= DISTILL_SPEEDUP,
                 f"{fmt(speed, '.2f', 'x')} vs {teacher.get('name', '?')} at the same dtype; "
                 f"b32 {fmt(speed32, '.2f', 'x')}")]
    kd, ce = student.get("perplexity"), control.get("perplexity")
    gain = (1 - kd / ce) * 100 if kd and ce else None
    steps = [manifest_value(r, "params", "steps") for r in (student, control)]
    note = f"ppl {fmt(kd, '.3f')} vs {fmt(ce, '.3f')} without KD ({fmt(gain, '.1f', ' %')} " \
           f"lower); steps {steps[0]} vs {steps[1]}"
    passed = gain is not None and gain >= margin_pct and steps[0] == steps[1]
    out.append(check(f"distillation beats the same student without it by >= {margin_pct:g} % "
                     "ppl, same steps", gain, passed, note))
    return out


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


# -- output ------------------------------------------------------------------------------

COLUMNS = [("variant", "name", "s"), ("ppl", "perplexity", ".3f"),
           ("Δppl", "delta_ppl_pct", "+.2f"), ("size MB", "size_mb", ".1f"),
           ("size % bf16", "size_pct_of_bf16", ".1f"), ("tok/s b1", "tok_s_1", ".1f"),
           ("tok/s b32", "tok_s_32", ".1f"), ("b1 vs bf16", "speed_vs_bf16_b1", ".2f")]


def cells(row: dict) -> list[str]:
    values = {**row, "size_mb": row["size_bytes"] / 1e6 if row.get("size_bytes") else None,
              "tok_s_1": tok_s(row, 1), "tok_s_32": tok_s(row, 32)}
    out = []
    for _, key, spec in COLUMNS:
        value = values.get(key)
        out.append(value if spec == "s" else fmt(value, spec))
    if row["status"] not in ("measured",):
        out[0] += f" ({row['status']})"
    return out


def print_table(rows: dict[str, dict]) -> None:
    table = [[c[0] for c in COLUMNS]] + [cells(row) for row in rows.values()]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    for line in table:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                        for i, (v, w) in enumerate(zip(line, widths, strict=True))))


def markdown(rows: dict[str, dict]) -> str:
    head = [c[0] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] *
                                                             (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in rows.values()]
    return "\n".join(lines)


def plot(rows: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(rows)
    xs = range(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    deltas = [rows[n].get("delta_ppl_pct") or 0.0 for n in names]
    left.bar(xs, deltas, color=["tab:gray" if d <= AWQ_PPL else "tab:red" for d in deltas])
    for limit, label in ((INT8_PPL, "int8 target"), (AWQ_PPL, "awq target")):
        left.axhline(limit, linestyle="--", linewidth=1, color="tab:blue", alpha=0.6)
        left.text(len(names) - 0.5, limit, f"{label} +{limit:g} %", fontsize=7, ha="right",
                  va="bottom")
    for x, delta in zip(xs, deltas, strict=True):
        left.text(x, delta, f"{delta:+.1f}", ha="center", va="bottom", fontsize=7)
    left.set_yscale("symlog", linthresh=1)
    left.set_ylim(min(0.0, *deltas), max(AWQ_PPL, *deltas) * 1.6)
    left.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    left.set_ylabel("perplexity increase over bf16, % (symlog)")
    left.set_xticks(list(xs), names, rotation=30, fontsize=8)
    left.grid(alpha=0.3, axis="y")
    for offset, batch in ((-0.2, 1), (0.2, 32)):
        right.bar([x + offset for x in xs], [tok_s(rows[n], batch) or 0 for n in names],
                  width=0.4, label=f"batch {batch}")
    bf16_b1 = tok_s(rows.get("bf16"), 1)
    if bf16_b1:
        right.axhline(bf16_b1, linestyle="--", linewidth=1, color="tab:blue",
                      label="bf16 batch 1")
    right.set_yscale("log")
    right.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    right.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    right.set_ylabel("decode tokens / s (log)")
    right.set_xticks(list(xs), names, rotation=30, fontsize=8)
    right.grid(alpha=0.3, axis="y")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def machine() -> dict:
    info = {"cpu_model": platform.processor() or "unknown", "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name"):
            info["cpu_model"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            info["cpu_flags"] = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16",
                                                "avx512_vnni", "avx_vnni"})
            break
    from importlib.metadata import PackageNotFoundError, version

    for package in ("torch", "transformers", "llmcompressor", "onnxruntime",
                    "onnxruntime-genai"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    return info


# -- main ----------------------------------------------------------------------------------

def selected(only: str | None) -> list[Variant]:
    """The baselines always (every ratio needs them), then `--only`'s rows (all by default)."""
    names = [v.name for v in VARIANTS]
    wanted = set(names)
    if only:
        wanted = {"fp32", "bf16"}
        for part in filter(None, (p.strip() for p in only.split(","))):
            if part not in names and part not in ALIASES:
                raise SystemExit(f"--only: unknown row {part!r} (rows: {', '.join(names)}; "
                                 f"groups: {', '.join(ALIASES)})")
            wanted |= set(ALIASES.get(part, [part]))
    return [v for v in VARIANTS if v.name in wanted]


def save(summary: dict, args: argparse.Namespace) -> None:
    """Write the JSON as it stands (after every step, so an interrupted run leaves data)."""
    if args.build_only:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "optimize.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


def build_all(variants: list[Variant], args: argparse.Namespace, summary: dict) -> None:
    records = summary["builds"]
    steps = None
    distill = [v for v in variants if v.method == "distill"]
    if distill:
        steps, summary["distill"] = distill_steps(args, distill)
        summary["distill"]["max_steps"] = steps
    for variant in variants:
        if variant.method is None:
            records[variant.name] = {"status": "source"}
            continue
        try:
            records[variant.name] = prepare(variant, args, summary["source_sha256"], steps)
        except Exception as exc:  # noqa: BLE001 - one row failing must not stop the others
            records[variant.name] = {"status": "build_failed", "error": repr(exc)}
        save(summary, args)


def measure_all(variants: list[Variant], args: argparse.Namespace, summary: dict) -> None:
    print(f"== baseline perplexity: {args.model} on {args.eval_samples} passages", flush=True)
    base = worker({"task": "ppl", "dir": str(args.model), "samples": args.eval_samples,
                   "max_tokens": args.eval_max_tokens}, args)
    base = base if base["ok"] else None
    summary["eval"]["tokens"] = base["eval_tokens"] if base else None
    rows = summary["rows"]
    for variant in variants:
        record = summary["builds"][variant.name]
        row = {"name": variant.name, "method": variant.method, "errors": [],
               "build": record, "status": record["status"]}
        rows[variant.name] = row
        if record["status"] in ("build_failed", "not_built"):
            row["errors"].append(record.get("error", record["status"]))
            continue
        print(f"== measure {variant.name}", flush=True)
        try:
            measure(variant, row, args, base)
        except Exception as exc:  # noqa: BLE001 - report it, measure the rest
            row["errors"].append(repr(exc))
        save(summary, args)
    decode_rounds(variants, rows, args)
    for row in rows.values():
        if row["status"] in ("build_failed", "not_built"):
            continue
        row["status"] = ("measured" if not row["errors"] else "partial") + (
            " (stale)" if row["build"]["status"] == "stale" else "")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models/smollm2-135m-instruct")
    parser.add_argument("--only", default=None,
                        help="comma-separated rows (or groups onnx, distill) besides the "
                             "fp32 / bf16 baselines: " + ", ".join(v.name for v in VARIANTS))
    parser.add_argument("--eval-samples", type=int, default=20)
    parser.add_argument("--eval-max-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1,
                        help="decode rounds over all rows, median kept (default 1; more on a "
                             "busy machine)")
    parser.add_argument("--distill-minutes", type=float, default=6.0,
                        help="KD training budget per student (default 6); sets the steps")
    parser.add_argument("--distill-steps", type=int, default=None,
                        help="training steps of both students (overrides --distill-minutes)")
    parser.add_argument("--rebuild-distill", action="store_true",
                        help="probe the steps afresh instead of reusing the students' steps")
    parser.add_argument("--kd-margin", type=float, default=2.0,
                        help="perplexity %% by which KD must beat the control (default 2)")
    parser.add_argument("--skip-build", action="store_true",
                        help="measure the artifacts that exist; build nothing")
    parser.add_argument("--build-only", action="store_true",
                        help="build (or keep) the artifacts; measure and write nothing")
    parser.add_argument("--build-timeout", type=int, default=7200)
    parser.add_argument("--timeout", type=int, default=1800, help="per measurement, s")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results dir")
    parser.add_argument("--artifacts", type=Path, default=DEFAULT_ARTIFACTS,
                        help="where artifacts are built and reused (default artifacts/bench)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model, args.artifacts = args.model.resolve(), args.artifacts.resolve()
    return args


def report(summary: dict) -> None:
    rows = summary["rows"]
    print()
    print_table(rows)
    print()
    for target in summary["targets"]:
        print(f"{target['verdict']:<5} {target['target']}: {target['detail']}")
    for row in rows.values():
        if row.get("gate"):
            print(f"gate  {row['name']}: manifest {row['gate']['manifest_ppl_increase']:+.2f} % "
                  f"vs +{row['gate']['max_ppl_increase']:g} % -> {row['gate']['verdict']}")
        for error in row["errors"]:
            print(f"FAIL  {row['name']}: {error.splitlines()[0] if error else error}")
    for note in summary["notes"]:
        print(f"note: {note}")
    print("\nREADME table:\n")
    print(markdown(rows))


def notes(summary: dict) -> list[str]:
    flags = summary["machine"].get("cpu_flags", [])
    out = ["perplexity is float32 scoring in the artifact's runtime (optimize.evaluate); the "
           "fp32 and bf16 rows are the same checkpoint, so they share it",
           "baseline sizes = parameters x 4 (fp32) / x 2 (bf16) bytes; artifacts: their "
           "weight files"]
    if {"avx512_bf16", "amx_bf16"} & set(flags):
        out.append("this CPU has native bf16 (AVX512-BF16 / AMX): the engine's `auto` dtype "
                   "runs bf16 checkpoints in bf16 here")
    else:
        out.append("this CPU has no AVX512-BF16 / AMX: bf16 matmuls are emulated and slow; "
                   "the engine's `auto` dtype runs bf16 checkpoints in float32 here")
    load = summary["machine"]["load_average_at_start"][0]
    if load > (os.cpu_count() or 1) * 0.5:
        out.append(f"load average {load} on {os.cpu_count()} CPUs at start: shared machine, "
                   "speeds are noisy; compare ratios")
    return out


def main() -> int:
    args = parse_args()
    if args.worker:
        from benchmarks.optimize_worker import work

        print("RESULT " + json.dumps(work(json.loads(args.worker))), flush=True)
        return 0
    from optimize.manifest import sha256_of

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the children
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when in the background
    variants = selected(args.only)
    info = machine()
    started = time.monotonic()
    summary = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "complete": False, "model": str(args.model),
               "source_sha256": sha256_of(args.model),
               "eval": {"data": EVAL_DATA, "samples": args.eval_samples,
                        "max_tokens": args.eval_max_tokens, "tokens": None},
               "decode_tokens": args.decode_tokens, "batch_sizes": list(BATCHES),
               "repeats": args.repeats, "distill": None, "kd_margin_pct": args.kd_margin,
               "machine": info, "builds": {}, "rows": {}}
    build_all(variants, args, summary)
    if args.build_only:
        return 0 if all(b["status"] != "build_failed" for b in summary["builds"].values()) else 1
    measure_all(variants, args, summary)
    rows = summary["rows"]
    derive(rows)
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    summary.update(complete=True, targets=targets(rows, args.kd_margin),
                   seconds=round(time.monotonic() - started, 1))
    summary["notes"] = notes(summary)
    save(summary, args)
    plot(rows, args.out / "optimize.png",
         f"{args.model.name}: {args.eval_samples} held-out passages, {args.decode_tokens} "
         f"decode tokens, {info['cpu_count']} CPUs (load {info['load_average_at_start'][0]})")
    report(summary)
    return 0 if all(row["status"] == "measured" for row in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
