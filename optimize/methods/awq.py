"""`quiver optimize awq`: AWQ 4-bit weights (W4A16), asymmetric, grouped along K.

llmcompressor's `AWQModifier` searches per-channel smoothing scales on the calibration text
(each passage cut to `--calib-max-tokens`), folds them into the preceding norm / Linear, then
`QuantizationModifier` quantizes every Linear but `lm_head` to int4 with a zero point per
group of `--group-size` input columns. Saved as compressed-tensors `pack-quantized`.

Group size: compressed-tensors (and vLLM's and torch's int4 kernels) need every Linear's
input size K to be a multiple of it. When the requested size does not divide every K
(SmolLM2-135M: K = 576 and 1536, so 128 fails), the largest of 64 / 32 that does is used
instead, logged, and recorded as `group_size` next to `requested_group_size`.
Quality targets (DESIGN.md): perplexity +<= 8 %, size <= 35 % of bf16. The size target
assumes the embedding is a small part of the model: `lm_head` and the (tied) embedding stay
in the source dtype, as vLLM expects, so SmolLM2-135M (embedding 21 % of its bf16 bytes)
lands at ~42 %.
"""

from __future__ import annotations

import argparse
import logging

from common.errors import QuiverError
from optimize.methods.base import BuildContext, BuildResult

logger = logging.getLogger(__name__)

DEFAULT_GROUP_SIZE = 128
DEFAULT_MAX_TOKENS = 512
# Group sizes every int4 kernel we target runs (torch int4pack, Marlin, vLLM CPU WNA16).
FALLBACK_GROUP_SIZES = (128, 64, 32)


def fit_group_size(requested: int, input_sizes: dict[str, int]) -> int:
    """`requested` when it divides every K, else the largest fallback size that does."""
    if requested <= 0:
        raise QuiverError(f"--group-size must be positive, got {requested}")
    widths = sorted(set(input_sizes.values()))
    if all(width % requested == 0 for width in widths):
        return requested
    for size in FALLBACK_GROUP_SIZES:
        if size < requested and all(width % size == 0 for width in widths):
            logger.warning("awq: group size %d does not divide every Linear input size %s; "
                           "using group size %d instead", requested, widths, size)
            return size
    raise QuiverError(f"--group-size {requested} does not divide every Linear input size "
                      f"{widths}, and neither does any of {FALLBACK_GROUP_SIZES}")


class AwqMethod:
    name = "awq"
    summary = "AWQ 4-bit weights (W4A16, asymmetric, grouped) as compressed-tensors"
    default_max_ppl_increase: float | None = 8.0

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                            help="input columns sharing one scale and zero point (default "
                                 f"{DEFAULT_GROUP_SIZE}; a smaller power of two is used "
                                 "when it does not divide every layer's input size)")
        parser.add_argument("--calib-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                            help="tokens of each calibration passage used (default "
                                 f"{DEFAULT_MAX_TOKENS})")

    def build(self, context: BuildContext) -> BuildResult:
        from optimize.methods import compress

        model, dtype = compress.load_source(context.source)
        sizes = compress.linear_input_sizes(model)
        group_size = fit_group_size(context.args.group_size, sizes)
        dataset = compress.calibration_dataset(context.source, context.calibration.texts,
                                               context.args.calib_max_tokens)
        num_tokens = sum(len(ids) for ids in dataset["input_ids"])
        logger.info("awq: %d Linear layers, group size %d, calibrating on %d passages "
                    "(%d tokens)", len(sizes), group_size, len(dataset), num_tokens)
        awq = awq_modifier()
        scheme = compress.weight_scheme(num_bits=4, symmetric=False, group_size=group_size)
        compress.quantize(model, [awq, compress.quantization_modifier(scheme)], dataset,
                          max_seq_length=context.args.calib_max_tokens)
        mappings = compress.describe_mappings(model, awq.mappings or [])
        compress.save_artifact(model, context.source, context.out, dtype)
        params = {"bits": 4, "scheme": "W4A16_ASYM", "strategy": "group",
                  "group_size": group_size, "requested_group_size": context.args.group_size,
                  "symmetric": False, "ignore": list(compress.IGNORE),
                  "num_quantized_layers": len(sizes), "compression_format": compress.FORMAT,
                  "dtype": str(dtype).split(".")[-1], "calibration_data":
                  context.calibration.name, "num_calibration_samples": len(dataset),
                  "num_calibration_tokens": num_tokens,
                  "calib_max_tokens": context.args.calib_max_tokens,
                  "duo_scaling": awq.duo_scaling, "n_grid": awq.n_grid, "mappings": mappings}
        return BuildResult(format="compressed-tensors", params=params)


def awq_modifier():
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return AWQModifier()


METHOD = AwqMethod()
