"""`quiver optimize int8`: weight-only int8 (W8A16), per output channel, symmetric.

Round-to-nearest with llmcompressor's `QuantizationModifier` (no calibration data needed),
every Linear layer but `lm_head`, saved as compressed-tensors `pack-quantized`. Activations
stay in the source's float dtype. Quality target (DESIGN.md): perplexity +<= 1 %.
"""

from __future__ import annotations

import argparse
import logging

from optimize.methods.base import BuildContext, BuildResult

logger = logging.getLogger(__name__)


class Int8Method:
    name = "int8"
    summary = "weight-only int8 (W8A16, per channel, symmetric) as compressed-tensors"
    default_max_ppl_increase: float | None = 1.0

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def build(self, context: BuildContext) -> BuildResult:
        from optimize.methods import compress

        model, dtype = compress.load_source(context.source)
        sizes = compress.linear_input_sizes(model)
        scheme = compress.weight_scheme(num_bits=8, symmetric=True)
        logger.info("int8: quantizing %d Linear layers per channel", len(sizes))
        compress.quantize(model, compress.quantization_modifier(scheme))
        compress.save_artifact(model, context.source, context.out, dtype)
        params = {"bits": 8, "scheme": "W8A16", "strategy": "channel", "symmetric": True,
                  "ignore": list(compress.IGNORE), "num_quantized_layers": len(sizes),
                  "compression_format": compress.FORMAT, "dtype": str(dtype).split(".")[-1]}
        return BuildResult(format="compressed-tensors", params=params)


METHOD = Int8Method()
