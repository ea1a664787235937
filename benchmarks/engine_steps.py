"""In-process A/B of native-engine variants: `python benchmarks/engine_steps.py`.

    python benchmarks/engine_steps.py [--variants default,onednn-linear,eager]
                                      [--concurrency 1,32] [--rounds 4] [--dtype auto]

`benchmarks/engine.py` runs whole servers one after the other, so this host's drift (10-25 %
within an hour) lands between them and can swamp a change of a few percent. Here every
variant lives in one process and the runs interleave — round after round, each variant in
turn at each concurrency — so drift hits all of them alike. Each run drives the engine core
directly (no HTTP): `concurrency` requests of distinct random prompts of `--prompt` tokens
(128; longer ones weigh attention more), `--output` tokens each, greedy, EOS ignored; it
records the median decode step over the run's last steps and the run's output tokens/s.
Reported per variant: the median over rounds and the ratio to the first variant.

Variants:
- `default`: the engine as `quiver serve` builds it (compiled, C++ kernels; with
  `--device cuda`, decode steps replayed from CUDA graphs).
- `onednn-linear`: its own runner, its weights packed for oneDNN instead of Quiver's tile or
  panel layouts (`quiver::set_linear_tiles(False)` while it loads) and the one-or-two-row kernel
  switched off (`quiver::set_skinny_max_rows(0)` around its runs): oneDNN takes every
  projection.
- `dynamo-guards`: the default engine (the same one) with dynamo checking the compiled
  graphs' guards on every block call instead of once per block and step size
  (`serving.models.graph_dispatch`).
- `eager`: `--enforce-eager` (its own runner: C++ kernels, no compiled graphs; on CUDA no
  CUDA graphs).
- `other-model`: the default engine on `--other-model DIR` (e.g. an int8 or w4a16 artifact
  of `--model`: quantized against float, in one process).
Results: benchmarks/results/engine_steps.json, with the CPU's flags (and the GPU's name).
On CUDA the step times are wall-clock per step as the engine runs it (each step ends by
reading the sampled tokens back to the host).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engine import cpu_info  # noqa: E402
from serving.engine.config import (  # noqa: E402
    CacheConfig,
    CompilationConfig,
    SchedulerConfig,
    default_cache_dir,
)
from serving.engine.core import EngineCore, RequestStates  # noqa: E402
from serving.engine.factory import model_dtype  # noqa: E402
from serving.engine.model_runner import ModelRunner  # noqa: E402
from serving.engine.request import Request  # noqa: E402
from serving.engine.sampler import Sampler  # noqa: E402
from serving.engine.sampling_params import SamplingParams  # noqa: E402
from serving.engine.scheduler import Scheduler  # noqa: E402
from serving.kernels.build import load_cpu_kernels  # noqa: E402
from serving.models.compiled import CompiledForward  # noqa: E402

VARIANTS = ("default", "onednn-linear", "dynamo-guards", "eager", "other-model")
BLOCK_SIZE = 16
NUM_BLOCKS = 4096
PROMPT_TOKENS = 128


@dataclass
class Variant:
    name: str
    core: EngineCore
    vocab_size: int
    skinny_rows: int | None = None  # the linear kernel's row limit during its runs
    guarded_by_dynamo: bool = False  # dynamo checks guards on every compiled block call
    steps_ms: dict[int, list[float]] = field(default_factory=dict)
    tokens_per_s: dict[int, list[float]] = field(default_factory=dict)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if self.guarded_by_dynamo:
                forward = self.core._runner.forward
                if not isinstance(forward, CompiledForward):
                    raise SystemExit("the dynamo-guards variant needs the compiled engine")
                stack.enter_context(forward.guarded_by_dynamo())
            if self.skinny_rows is not None:
                previous = torch.ops.quiver.set_skinny_max_rows(self.skinny_rows)
                stack.callback(torch.ops.quiver.set_skinny_max_rows, previous)
            yield


@contextlib.contextmanager
def onednn_packing(cache_dir: Path) -> Iterator[None]:
    """Weights packed meanwhile get oneDNN's layout, not Quiver's tiles."""
    if load_cpu_kernels(cache_dir).library is None:  # no library: nothing packs tiles
        yield
        return
    previous = torch.ops.quiver.set_linear_tiles(False)
    try:
        yield
    finally:
        torch.ops.quiver.set_linear_tiles(previous)


def make_core(model: Path, *, eager: bool, cache_dir: Path, device: str = "cpu",
              tiles: bool = True, dtype: str = "auto") -> EngineCore:
    if not tiles:
        with onednn_packing(cache_dir):
            return make_core(model, eager=eager, cache_dir=cache_dir, device=device,
                             dtype=dtype)
    sampler = Sampler(torch.device(device))
    scheduler_config = SchedulerConfig(max_model_len=2048)
    # as `quiver serve --dtype` resolves it (auto: bf16 where the CPU has native bf16, else
    # float32)
    resolved = model_dtype(model, dtype, torch.device(device), cache_dir=cache_dir)
    runner = ModelRunner(model, device=torch.device(device), dtype=resolved,
                         num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, sampler=sampler,
                         compilation=CompilationConfig(enforce_eager=eager,
                                                       cache_dir=cache_dir),
                         max_num_seqs=scheduler_config.max_num_seqs,
                         max_model_len=scheduler_config.max_model_len)
    scheduler = Scheduler(scheduler_config,
                          CacheConfig(block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS))
    return EngineCore(scheduler, runner, RequestStates(sampler, runner.pooler))


def make_variants(model: Path, names: list[str], cache_dir: Path | None = None,
                  other_model: Path | None = None, device: str = "cpu",
                  dtype: str = "auto") -> list[Variant]:
    cores: dict[tuple[Path, bool, bool], EngineCore] = {}

    def core(model_dir: Path, eager: bool, tiles: bool) -> EngineCore:
        if (model_dir, eager, tiles) not in cores:
            cores[model_dir, eager, tiles] = make_core(
                model_dir, eager=eager, cache_dir=cache_dir or default_cache_dir(),
                device=device, tiles=tiles, dtype=dtype)
        return cores[model_dir, eager, tiles]

    variants = []
    for name in names:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}: choose from {', '.join(VARIANTS)}")
        if name == "other-model" and other_model is None:
            raise SystemExit("the other-model variant needs --other-model DIR")
        model_dir = other_model if name == "other-model" else model
        vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        onednn = name == "onednn-linear"
        variants.append(Variant(name, core(model_dir, name == "eager", not onednn), vocab_size,
                                skinny_rows=0 if onednn else None,
                                guarded_by_dynamo=name == "dynamo-guards"))
    return variants


def run(variant: Variant, concurrency: int, output_tokens: int, rng: random.Random,
        tag: str, prompt_tokens: int = PROMPT_TOKENS) -> tuple[float, float]:
    """(median decode step in ms over the last steps, output tokens/s) of one run."""
    core = variant.core
    for i in range(concurrency):
        prompt = [rng.randrange(variant.vocab_size) for _ in range(prompt_tokens)]
        params = SamplingParams(max_tokens=output_tokens, ignore_eos=True, temperature=0.0)
        core.add_request(Request(request_id=f"{tag}-{i}", prompt_token_ids=prompt,
                                 sampling_params=params))
    steps = []
    with variant.active(), torch.inference_mode():
        start = time.perf_counter()
        while core.has_unfinished_requests():
            step_start = time.perf_counter()
            core.step()
            steps.append(time.perf_counter() - step_start)
        elapsed = time.perf_counter() - start
    decode = steps[-max(1, output_tokens // 2):]  # past prefill: every request decoding
    return statistics.median(decode) * 1e3, concurrency * output_tokens / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models/smollm2-135m-instruct")
    parser.add_argument("--variants", default="default,onednn-linear",
                        type=lambda text: text.split(","))
    parser.add_argument("--concurrency", default="1,32",
                        type=lambda text: [int(c) for c in text.split(",")])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--output", type=int, default=64, help="output tokens a request")
    parser.add_argument("--prompt", type=int, default=PROMPT_TOKENS,
                        help="prompt tokens a request (long contexts: attention's share grows)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--compile-cache-dir", type=Path, default=None,
                        help="built kernels and compiled graphs (default: quiver serve's)")
    parser.add_argument("--other-model", type=Path, default=None,
                        help="the other-model variant's checkpoint or artifact")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                        help="as quiver serve's --dtype (auto: bf16 where the CPU has native "
                             "bf16, else float32)")
    args = parser.parse_args()
    variants = make_variants(args.model.resolve(), args.variants, args.compile_cache_dir,
                             args.other_model.resolve() if args.other_model else None,
                             args.device, args.dtype)
    rng = random.Random(0)
    for concurrency in args.concurrency:  # warm-up: first-use costs stay out of the rounds
        for variant in variants:
            run(variant, concurrency, 8, rng, f"warm-{variant.name}-{concurrency}", args.prompt)
    for round_index in range(args.rounds):
        for concurrency in args.concurrency:
            for variant in variants:
                step_ms, tokens_per_s = run(variant, concurrency, args.output, rng,
                                            f"r{round_index}-{variant.name}-{concurrency}",
                                            args.prompt)
                variant.steps_ms.setdefault(concurrency, []).append(round(step_ms, 2))
                variant.tokens_per_s.setdefault(concurrency, []).append(round(tokens_per_s, 1))
    rows = []
    for concurrency in args.concurrency:
        base = statistics.median(variants[0].steps_ms[concurrency])
        for variant in variants:
            step = statistics.median(variant.steps_ms[concurrency])
            rows.append({"variant": variant.name, "concurrency": concurrency,
                         "decode_step_ms": round(step, 2),
                         "step_vs_first": round(step / base, 3),
                         "tokens_per_s": statistics.median(variant.tokens_per_s[concurrency]),
                         "rounds_step_ms": variant.steps_ms[concurrency]})
    cpu = cpu_info(args.device)
    print(f"CPU: {cpu['model']} ({cpu['cores']} cores; {' '.join(cpu['flags'])})"
          + (f"; on {cpu['gpu']}" if "gpu" in cpu else ""))
    print(f"{'variant':<16}{'concurrency':>12}{'step ms':>10}{'vs first':>10}{'tok/s':>10}")
    for row in rows:
        print(f"{row['variant']:<16}{row['concurrency']:>12}{row['decode_step_ms']:>10}"
              f"{row['step_vs_first']:>10}{row['tokens_per_s']:>10.1f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_steps.json").write_text(json.dumps(
        {"cpu": cpu, "dtype": str(variants[0].core._runner.dtype).removeprefix("torch."),
         "rounds": args.rounds, "output_tokens": args.output,
         "prompt_tokens": args.prompt, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
