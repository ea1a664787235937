"""The `onnx` method: an ONNX Runtime artifact with KV cache that the `onnx` engine serves.

Export: onnxruntime-genai's model builder (a subprocess: `python -m
onnxruntime_genai.models.builder`) writes `model.onnx` (+ `.data`) with its graph fusions
(GroupQueryAttention, SkipSimplifiedLayerNormalization, fused QKV; ONNX Runtime applies its
own graph optimisations when a session loads), `genai_config.json` and the tokenizer:

| precision | weights | execution provider | default gate |
|---|---|---|---|
| fp32 | float32 | cpu or cuda | +1 % perplexity, and max logit diff <= 1e-3 |
| fp16 | float16 | cuda only | +1 % |
| int8 | weight-only int8 (MatMulNBits, round to nearest) | cpu or cuda | +3 % |
| int4 | weight-only int4 (MatMulNBits, `--int4-algo`, below) | cpu or cuda | +10 % |

int4 recipes: `k_quant_mixed` (default: k-quant, with the LM head and the most sensitive
layers in int8) or `rtn` (every MatMul int4, round to nearest).

Measured on SmolLM2-135M (10 held-out texts, 3.9k tokens, CPU): fp32 +0.001 %, max logit
diff 9.5e-5; int8 +0.75 % (size 0.99x the bf16 source: the embedding stays fp32); int4
k_quant_mixed +11.3 % (0.42x), rtn +35 % (0.32x): a 135M model is too small for 4-bit
weights without calibration, and its default gate refuses it (use AWQ, or --force).
int8 is weight-only because ONNX Runtime's `quantize_dynamic` (int8 activations, per-channel
weights) measured +56 % there (activation outliers).

The gate's default follows `--precision` (see `PRECISION_GATES`); an explicit
`--max-ppl-increase` wins. Parity: max |logit diff| between the artifact (ONNX Runtime) and
the source (transformers, float32) on the first `--parity-samples` evaluation texts goes into
`metrics.max_abs_logit_diff`; an fp32 export beyond 1e-3 is refused (exit 4) unless --force.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from common.errors import QuiverError
from optimize.methods.base import BuildContext, BuildResult

logger = logging.getLogger(__name__)

PRECISION_GATES = {"fp32": 1.0, "fp16": 1.0, "int8": 3.0, "int4": 10.0}
FP32_PARITY_LIMIT = 1e-3
PARITY_MAX_TOKENS = 128
BUILDER_TIMEOUT_S = 3 * 3600
ERROR_TAIL_LINES = 12


class _PrecisionAction(argparse.Action):
    """`--precision P` also sets the gate default for P, unless --max-ppl-increase is given
    (before it; one given after it overrides anyway)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        if getattr(namespace, "max_ppl_increase", None) is None:
            namespace.max_ppl_increase = PRECISION_GATES[values]


def run_builder(source: Path, out: Path, *, precision: str, provider: str, cache: Path,
                extra_options: dict[str, Any] | None = None) -> None:
    """og's model builder; its failure (e.g. an unsupported architecture) -> QuiverError
    with the builder's last lines."""
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source),
               "-o", str(out), "-p", precision, "-e", provider, "-c", str(cache)]
    if extra_options:
        command += ["--extra_options", *(f"{key}={value}" for key, value in
                                         extra_options.items())]
    logger.info("exporting %s to ONNX (%s, %s)", source, precision, provider)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env,
                              timeout=BUILDER_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise QuiverError(f"the ONNX model builder ran past {BUILDER_TIMEOUT_S} s") from exc
    if done.returncode != 0 or not (out / "genai_config.json").is_file():
        lines = (done.stdout + done.stderr).replace("\r", "\n").splitlines()
        tail = "\n".join(line for line in lines if line.strip())
        tail = "\n".join(tail.splitlines()[-ERROR_TAIL_LINES:])
        raise QuiverError(f"the ONNX model builder failed on {source} "
                          f"({_architectures(source)}, exit {done.returncode}); its last "
                          f"lines:\n{tail}")
    shutil.rmtree(cache, ignore_errors=True)


def _architectures(source: Path) -> str:
    try:
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no readable config.json"
    return "architectures: " + ", ".join(config.get("architectures") or ["none"])


def check_target(precision: str, provider: str) -> None:
    """Refuse, before any work, a precision / provider this host cannot build or run."""
    if precision == "fp16" and provider != "cuda":
        raise QuiverError("--precision fp16 needs a GPU execution provider: pass "
                          "--execution-provider cuda on a host with an NVIDIA GPU (ONNX "
                          "Runtime's CPU kernels for the exported graph are fp32 / int8 / int4)")
    if provider == "cuda":
        import onnxruntime

        available = onnxruntime.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise QuiverError("--execution-provider cuda needs an NVIDIA GPU and onnxruntime-gpu "
                              "with onnxruntime-genai-cuda (this onnxruntime offers: "
                              f"{', '.join(available)})")


def measure_parity(artifact: Path, source: Path, args: argparse.Namespace) -> dict[str, Any]:
    """max |logit diff| of the artifact vs transformers float32, on a few eval texts."""
    from optimize.data import load_texts, token_ids
    from optimize.onnx_eval import max_abs_diff, onnx_logits, torch_logits

    texts = load_texts(args.eval_data, "evaluation", limit=args.parity_samples)
    ids_list = token_ids(source, texts.texts, min(args.eval_max_tokens, PARITY_MAX_TOKENS))
    if not ids_list:
        raise QuiverError(f"no parity text with at least two tokens in {texts.name}")
    diff = max_abs_diff(torch_logits(source, ids_list), onnx_logits(artifact, ids_list))
    logger.info("max |logit diff| vs transformers fp32: %.3g", diff)
    return {"max_abs_logit_diff": diff, "parity_reference": "transformers float32",
            "parity_texts": len(ids_list), "parity_tokens": sum(map(len, ids_list))}


def check_parity(precision: str, diff: float, *, force: bool) -> None:
    if precision != "fp32" or diff <= FP32_PARITY_LIMIT:
        return
    from optimize.gate import QualityGateError

    message = (f"ONNX fp32 logits differ from transformers by up to {diff:.3g}, beyond "
               f"{FP32_PARITY_LIMIT:g}: the export is wrong")
    if force:
        logger.warning("%s; writing it anyway (--force)", message)
        return
    raise QualityGateError(message + "; nothing written (--force writes it anyway)")


def quantization_options(precision: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """The builder's weight-only quantization options for int4 / int8 (None otherwise)."""
    if precision not in ("int4", "int8"):
        return None
    options: dict[str, Any] = {"block_size": args.block_size}
    if precision == "int4" and args.int4_algo == "k_quant_mixed":
        options |= {"algo_config": "k_quant",
                    "matmul_mixed_precision": "last_matmul:int8,mixed_layers:int8"}
    return options


class OnnxMethod:
    name = "onnx"
    summary = ("export to ONNX with KV cache (onnxruntime-genai) for the onnx engine: "
               "fp32, fp16 (cuda), int8 or int4")
    default_max_ppl_increase: float | None = PRECISION_GATES["fp32"]

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        gates = ", ".join(f"{name} {gate:g} %%" for name, gate in PRECISION_GATES.items())
        parser.add_argument("--precision", choices=list(PRECISION_GATES), default="fp32",
                            action=_PrecisionAction,
                            help="weights: fp32 (default), fp16 (cuda only), int8 or int4 "
                                 "(weight-only, MatMulNBits); the quality gate's "
                                 f"default follows it: {gates}")
        parser.add_argument("--execution-provider", choices=["cpu", "cuda"], default="cpu",
                            help="ONNX Runtime execution provider the graph is built for "
                                 "(default cpu)")
        parser.add_argument("--block-size", type=int, choices=[16, 32, 64, 128, 256],
                            default=32, help="int4 / int8 weight quantization block size "
                                             "(default 32)")
        parser.add_argument("--int4-algo", choices=["k_quant_mixed", "rtn"],
                            default="k_quant_mixed",
                            help="int4 recipe: k_quant_mixed (default; k-quant, the LM head "
                                 "and the most sensitive layers in int8) or rtn (all int4, "
                                 "round to nearest)")
        parser.add_argument("--parity-samples", type=int, default=4,
                            help="evaluation texts the logit parity check runs on (default 4)")

    def build(self, context: BuildContext) -> BuildResult:
        args = context.args
        precision, provider = args.precision, args.execution_provider
        check_target(precision, provider)
        if (context.source / "genai_config.json").is_file():
            raise QuiverError(f"--model {context.source} is already an ONNX artifact: export "
                              "from the HF safetensors dir it came from")
        extra = quantization_options(precision, args)
        run_builder(context.source, context.out, precision=precision, provider=provider,
                    cache=context.work_dir / "builder-cache", extra_options=extra)
        metrics = measure_parity(context.out, context.source, args)
        check_parity(precision, metrics["max_abs_logit_diff"], force=args.force)
        return BuildResult(format="onnx", params=self.params(args), metrics=metrics)

    @staticmethod
    def params(args: argparse.Namespace) -> dict[str, Any]:
        import onnxruntime
        import onnxruntime_genai

        params: dict[str, Any] = {
            "precision": args.precision, "execution_provider": args.execution_provider,
            "exporter": f"onnxruntime-genai {onnxruntime_genai.__version__} model builder",
            "onnxruntime": onnxruntime.__version__,
            "max_ppl_increase": (args.max_ppl_increase if args.max_ppl_increase is not None
                                 else PRECISION_GATES["fp32"])}
        options = quantization_options(args.precision, args)
        if options is not None:
            params["quantization"] = {"kind": f"weight-only {args.precision} (MatMulNBits)",
                                      "algo": options.get("algo_config", "rtn"), **options}
        return params


METHOD = OnnxMethod()
