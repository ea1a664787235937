"""The `tensorrt` method: TensorRT engines for an ONNX artifact (from `quiver optimize onnx`),
built by ONNX Runtime's TensorRT execution provider on an NVIDIA GPU host.

`--model` is an ONNX artifact dir. Its files are copied, `tensorrt.json` records the EP
settings, and a warm-up through the TensorRT EP (a prefill of `--max-prefill-tokens` and a
decode step, batch 1: the engines' shape range) fills `trt_cache/` (engines and timing
cache) inside the artifact, so loading it later skips the build. Nodes TensorRT cannot run
(og's GroupQueryAttention, a contrib op) fall back to the CUDA EP. `trtexec` is not used: it
cannot parse those contrib ops. Parity: max |logit diff| vs the source ONNX artifact on CPU.

Without an NVIDIA GPU, onnxruntime-gpu's TensorrtExecutionProvider and the TensorRT
libraries, the command stops at once (`check_host`, exit code 3) with a message naming each
missing piece: before the baseline is measured and before anything is written.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from common.errors import QuiverError
from optimize.methods.base import BuildContext, BuildResult, HostRequirementError

logger = logging.getLogger(__name__)

ENGINE_CACHE = "trt_cache"
TRT_LIBRARIES = ("libnvinfer.so.10", "libnvinfer.so")
PARITY_MAX_TOKENS = 128


def _cuda_device_count() -> int | None:
    """CUDA devices the driver sees, or None when there is no NVIDIA driver."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def _has_tensorrt_libraries() -> bool:
    try:
        import tensorrt  # noqa: F401  (its wheel loads libnvinfer into the process)
        return True
    except ImportError:
        pass
    for name in TRT_LIBRARIES:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def missing_requirements(device_id: int) -> list[str]:
    """What this host lacks to build TensorRT engines on GPU `device_id` (empty: nothing)."""
    import onnxruntime

    missing = []
    count = _cuda_device_count()
    if count is None:
        missing.append("an NVIDIA GPU with its driver (libcuda.so.1 not found)")
    elif count <= device_id:
        missing.append(f"an NVIDIA GPU number {device_id} (the driver sees {count})")
    available = onnxruntime.get_available_providers()
    if "TensorrtExecutionProvider" not in available:
        missing.append("onnxruntime-gpu with the TensorRT execution provider (this "
                       f"onnxruntime {onnxruntime.__version__} offers "
                       f"{', '.join(available)})")
    if not _has_tensorrt_libraries():
        missing.append("the TensorRT 10 libraries (libnvinfer.so.10: `pip install tensorrt` "
                       "from NVIDIA's index, or put them on LD_LIBRARY_PATH)")
    return missing


def requirements_message(missing: list[str]) -> str:
    return ("cannot build a TensorRT engine on this host; it needs " + "; ".join(missing)
            + ". Run it on a GPU host (an ONNX artifact from `quiver optimize onnx` serves on "
            "CPU as it is). Nothing was written.")


def gpu_index(value: str) -> int:
    try:
        device_id = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a GPU number") from None
    if device_id < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a GPU number (0, 1, ...)")
    return device_id


def copy_onnx_artifact(source: Path, out: Path) -> None:
    from serving.backends.onnx_config import TENSORRT_CONFIG

    if not (source / "genai_config.json").is_file():
        raise QuiverError(f"--model {source} is not an ONNX artifact (no genai_config.json): "
                          "build one with `quiver optimize onnx` first")
    if (source / TENSORRT_CONFIG).is_file():
        raise QuiverError(f"--model {source} is a tensorrt artifact already: pass the ONNX "
                          "artifact it was built from")
    for path in source.iterdir():
        if path.is_file() and path.name != "manifest.json":
            shutil.copy2(path, out / path.name)


def build_engines(out: Path, max_prefill_tokens: int) -> int:
    """Warm-up through the TensorRT EP (prefill + one decode step); returns engine files."""
    from optimize.onnx_eval import OnnxDecoder, session_providers

    providers = session_providers(out)
    if providers[0][0] != "TensorrtExecutionProvider":
        raise QuiverError(f"{out} has no TensorRT settings: cannot build its engines")
    decoder = OnnxDecoder.load(out, providers)
    if "TensorrtExecutionProvider" not in decoder.session.get_providers():
        raise QuiverError("ONNX Runtime did not attach the TensorRT execution provider "
                          f"(it runs on {', '.join(decoder.session.get_providers())}): check "
                          "the TensorRT and CUDA libraries onnxruntime-gpu was built for")
    prompt = [1 + j % 50 for j in range(max_prefill_tokens)]
    logits, past = decoder.run(prompt, decoder.empty_past(), 0)
    decoder.run([int(logits[-1].argmax())], past, len(prompt))
    decoder.run(prompt[:1], decoder.empty_past(), 0)
    engines = [p for p in (out / ENGINE_CACHE).rglob("*") if p.suffix == ".engine"]
    if not engines:
        raise QuiverError(f"the TensorRT EP wrote no engine into {out / ENGINE_CACHE}")
    return len(engines)


def measure_parity(artifact: Path, source: Path, args: argparse.Namespace) -> dict[str, Any]:
    """max |logit diff| of the engines vs the source ONNX artifact on CPU."""
    from optimize.data import load_texts, token_ids
    from optimize.onnx_eval import max_abs_diff, onnx_logits

    texts = load_texts(args.eval_data, "evaluation", limit=args.parity_samples)
    ids_list = token_ids(source, texts.texts, min(args.eval_max_tokens, PARITY_MAX_TOKENS))
    diff = max_abs_diff(onnx_logits(source, ids_list, ["CPUExecutionProvider"]),
                        onnx_logits(artifact, ids_list))
    return {"max_abs_logit_diff": diff, "parity_reference": "source ONNX artifact on CPU",
            "parity_texts": len(ids_list), "parity_tokens": sum(map(len, ids_list))}


class TensorrtMethod:
    name = "tensorrt"
    summary = ("TensorRT engines for an ONNX artifact (ONNX Runtime's TensorRT execution "
               "provider; needs an NVIDIA GPU)")
    default_max_ppl_increase: float | None = 1.0

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--gpu", type=gpu_index, default=0,
                            help="CUDA device to build on (default 0); checked first: an "
                                 "NVIDIA GPU, onnxruntime-gpu's TensorRT EP and the TensorRT "
                                 "libraries")
        parser.add_argument("--trt-precision", choices=["fp16", "fp32"], default="fp16",
                            help="TensorRT engine precision (default fp16)")
        parser.add_argument("--max-prefill-tokens", type=int, default=512,
                            help="longest prompt the engines' shape profile covers "
                                 "(default 512; longer ones rebuild an engine)")
        parser.add_argument("--parity-samples", type=int, default=4,
                            help="evaluation texts the logit parity check runs on (default 4)")

    def check_host(self, args: argparse.Namespace) -> None:
        missing = missing_requirements(args.gpu)
        if missing:
            raise HostRequirementError(requirements_message(missing))

    def build(self, context: BuildContext) -> BuildResult:
        args = context.args
        device_id = args.gpu
        self.check_host(args)  # callers that go around the pipeline
        from serving.backends.onnx_config import TENSORRT_CONFIG

        copy_onnx_artifact(context.source, context.out)
        settings = {"provider": "TensorrtExecutionProvider", "device_id": device_id,
                    "precision": args.trt_precision, "engine_cache": ENGINE_CACHE,
                    "max_prefill_tokens": args.max_prefill_tokens}
        (context.out / ENGINE_CACHE).mkdir()
        (context.out / TENSORRT_CONFIG).write_text(json.dumps(settings, indent=2) + "\n",
                                                   encoding="utf-8")
        logger.info("building TensorRT engines on GPU %d (%s)", device_id, args.trt_precision)
        num_engines = build_engines(context.out, args.max_prefill_tokens)
        metrics = measure_parity(context.out, context.source, args)
        return BuildResult(format="tensorrt",
                           params={**settings, "num_engines": num_engines,
                                   "source_format": "onnx"},
                           metrics=metrics)


METHOD = TensorrtMethod()
