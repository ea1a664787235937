"""The decoder layers compiled once at start by inductor, eager as the fallback.

`torch.compile` turns a decoder layer (RMSNorms, rotary, the SiLU·mul, the residual adds
around the projections and the attention op) into fused C++ loops around the GEMMs.
Every layer has the same code, so one compiled graph serves all of them (regional
compilation: the layers' weights are graph inputs), which keeps compiling to seconds, and
inductor's on-disk caches under `<cache_dir>/inductor` make a restart cheaper still. The
layers are compiled in blocks of a few (`MAX_LAYERS_PER_GRAPH`): each graph call costs
Python overhead a batch-1 step feels, each layer more per graph costs compile time. No
freezing: a frozen graph cannot be cached; the GEMMs get their reordered oneDNN weights
from Quiver's packed-linear op instead (`serving.models.linear`). Attention is one opaque
custom op per layer (`serving.kernels`), so one graph serves decodes and prefill chunks.

Shapes: every size is dynamic except where torch specialises 1, so a one-token step
(batch-1 decode) gets its own graph and every larger step shares one. Quantized
projections switch kernels at a token count (`serving.models.quant`), which splits the
dynamic graph at that size; `warm_up` runs one step on each side of every split, so after
it no request waits for a compile: a step that would need one runs eagerly (logged).

Serving calls each block's compiled code through `GraphDispatch`
(`serving.models.graph_dispatch`), which checks dynamo's guards once per block and step size
rather than on every call; where that is unavailable dynamo guards every call as usual.

Inductor's parallel compile workers are disabled: on a 2-core host they kept stealing the
engine's cores after compiling.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch._dynamo.config
import torch._inductor.config

from serving.models.attention import AttentionMetadata
from serving.models.graph_dispatch import GraphDispatch, NoCompiledGraph
from serving.models.llama import DecoderBlock, LlamaForCausalLM

logger = logging.getLogger(__name__)

# size_asserts: the graphs' wrapper checks every input's and every extern op's output's sizes
# and strides on each call, ~30 checks a block of three layers, ~55 us of a call's ~210 us of
# wrapper code at batch 1 (2-core Zen 2). Off: the ops' fake kernels fix their output shapes
# at compile time, and the inputs' sizes are what GraphDispatch checks the guards against,
# once per block and step size (so these asserts were the last check on every call); the
# start-up check runs every warmed graph against eager.
INDUCTOR_CONFIG = {"compile_threads": 1, "size_asserts": False}
# Float attributes (RMSNorm's eps) become constants of the graph: left unspecialised, each
# call turned each of them into a tensor before running the graph (six a block of three
# layers, ~0.3 ms of a batch-1 step).
DYNAMO_CONFIG = {"specialize_float": True}
# Each compiled graph's call cost ~75 us of dynamo and wrapper code (before GraphDispatch and
# the two settings above trimmed it), 30 of them a tenth of a batch-1 step; three layers a
# graph cut a SmolLM2 decode step by 5-12 % at batch 1 and 3-9 % at 32 (2-core Zen 4), at
# ~6 s more of a first compile. More layers a graph gained more
# (whole model: 18 %) but compiled for much longer (whole model: 87 s cold, 22 s warm).
MAX_LAYERS_PER_GRAPH = 3
# The largest error a compiled step may have against eager (L2 norm of the difference over
# the eager hidden states' norm): fused bf16 kernels round differently (SmolLM2 bf16 and its
# w4a16 artifact: 0.02-0.06 after 30 layers); a miscompile is off by O(1), or NaN.
CHECK_TOLERANCE = 0.15

Forward = Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor], AttentionMetadata],
                   torch.Tensor]
# Builds (input_ids, positions, metadata) of a step with that many tokens, for warm-up.
ExampleStep = Callable[[int], tuple[torch.Tensor, torch.Tensor, AttentionMetadata]]
# Builds a step of that many tokens for the start-up check, or None where the KV cache is
# too small to give each token its own slot.
CheckStep = Callable[[int], tuple[torch.Tensor, torch.Tensor, AttentionMetadata] | None]


def layers_per_graph(num_layers: int) -> int:
    """Decoder layers per compiled graph: the largest divisor of `num_layers` up to
    `MAX_LAYERS_PER_GRAPH`, so every block has the same code and one graph serves all."""
    return max(k for k in range(1, MAX_LAYERS_PER_GRAPH + 1) if num_layers % k == 0)


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """`|output - reference| / |reference|` (L2 norms, in float32); NaN stays NaN."""
    output, reference = output.float(), reference.float()
    return ((output - reference).norm() / reference.norm().clamp_min(1e-6)).item()


def use_inductor_cache(cache_dir: Path) -> None:
    """Point inductor's on-disk caches under `cache_dir` unless the user already chose
    (inductor reads its location from this variable only)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache_dir) / "inductor"))


class CompiledForward:
    """The model's forward pass with its decoder layers compiled; `warm_up` before serving."""

    def __init__(self, model: LlamaForCausalLM, cache_dir: Path) -> None:
        use_inductor_cache(cache_dir)
        model.group_layers(layers_per_graph(len(model.layers)))
        for block in model.blocks:
            block.compile(fullgraph=True, dynamic=True)
        self.model = model
        self.is_compiled = True
        self._is_warm = False
        self._dispatch: GraphDispatch | None = None
        self._has_logged_fallback = False

    def run_eagerly(self) -> None:
        """Give up on the compiled layers for good (compiling failed)."""
        self.is_compiled = False

    @property
    def dispatches_directly(self) -> bool:
        """Whether served steps run the blocks' compiled code through `GraphDispatch`."""
        return self._dispatch is not None

    @contextmanager
    def guarded_by_dynamo(self) -> Iterator[None]:
        """Meanwhile dynamo checks every call's guards, as without `GraphDispatch` (for
        benchmarks comparing the two)."""
        dispatch, self._dispatch = self._dispatch, None
        try:
            yield
        finally:
            self._dispatch = dispatch

    def warm_up_sizes(self) -> list[int]:
        """Step sizes (tokens) covering every graph: 1, 2 (the dynamic one) and one past each
        size where a projection switches kernels."""
        return sorted({1, 2, *(split + 1 for split in self.model.kernel_token_splits())})

    def warm_up(self, kv_caches: list[torch.Tensor], example_step: ExampleStep,
                check_step: CheckStep) -> float:
        """Compile (or load from the cache) every graph serving will need, then check each
        against eager (`check_step`); seconds spent. Raises whatever compiling raised, or
        what the check found: the caller falls back to eager."""
        sizes = self.warm_up_sizes()
        start = time.perf_counter()
        with (torch.inference_mode(), torch._inductor.config.patch(INDUCTOR_CONFIG),
              torch._dynamo.config.patch(DYNAMO_CONFIG)):
            for num_tokens in sizes:
                input_ids, positions, metadata = example_step(num_tokens)
                self.model(input_ids, positions, kv_caches, metadata)
            self._dispatch = self._new_dispatch()
            if self._dispatch is not None:
                logger.info("served steps call the compiled graphs directly (their guards "
                            "checked once per block and step size)")
            for num_tokens in sizes:
                if (step := check_step(num_tokens)) is not None:
                    self._check_against_eager(kv_caches, step, num_tokens)
        self._is_warm = True
        return time.perf_counter() - start

    @staticmethod
    def _new_dispatch() -> GraphDispatch | None:
        """A fresh dispatch (it must not keep code chosen for an earlier model state), or
        None where this torch cannot give one: dynamo then guards every call."""
        try:
            return GraphDispatch(DecoderBlock.forward)
        except RuntimeError as exc:
            logger.warning("dynamo checks the compiled graphs' guards on every call: %s", exc)
            return None

    def _check_against_eager(self, kv_caches: list[torch.Tensor],
                             step: tuple[torch.Tensor, torch.Tensor, AttentionMetadata],
                             num_tokens: int) -> None:
        """Raise if the compiled graph's answer to a step differs from the eager model's.

        A miscompile is rare but silent (seen: inductor's AVX2 code with the packed-linear op
        gave NaN hidden states), and serving garbage fast is worse than serving eagerly, so
        every warmed graph runs one step both ways at start: one request of `num_tokens`
        distinct tokens, each in its own KV slot (both runs write the same K/V there). The
        compiled run takes the warmed graphs only, as serving does: a check step that would
        need a new graph fails the check."""
        input_ids, positions, metadata = step
        compiled = self._compiled(input_ids, positions, kv_caches, metadata)
        eager = self._eager(input_ids, positions, kv_caches, metadata)
        error = relative_error(compiled, eager)
        logger.debug("compiled %d-token step: relative error %.2g against eager", num_tokens,
                     error)
        if not error <= CHECK_TOLERANCE:  # also false for NaN
            raise RuntimeError(f"the compiled {num_tokens}-token step differs from eager "
                               f"(relative error {error:.3g})")

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 kv_caches: list[torch.Tensor], metadata: AttentionMetadata) -> torch.Tensor:
        if not self.is_compiled:
            return self._eager(input_ids, positions, kv_caches, metadata)
        if not self._is_warm:
            return self.model(input_ids, positions, kv_caches, metadata)
        try:
            return self._compiled(input_ids, positions, kv_caches, metadata)
        except NoCompiledGraph as exc:
            reason = str(exc)
        except RuntimeError as exc:
            if "recompile" not in str(exc):
                raise
            reason = str(exc).splitlines()[0]
        if not self._has_logged_fallback:
            logger.warning("a %d-token step needed a new compiled graph; steps like it run "
                           "eagerly: %s", input_ids.shape[0], reason)
            self._has_logged_fallback = True
        return self._eager(input_ids, positions, kv_caches, metadata)

    def _compiled(self, input_ids: torch.Tensor, positions: torch.Tensor,
                  kv_caches: list[torch.Tensor], metadata: AttentionMetadata) -> torch.Tensor:
        """The step on the warmed graphs only: raises `NoCompiledGraph` (or dynamo's
        recompile error) where none takes it."""
        if self._dispatch is not None:
            return self.model(input_ids, positions, kv_caches, metadata,
                              run_block=self._dispatch)
        with torch.compiler.set_stance("fail_on_recompile"):
            return self.model(input_ids, positions, kv_caches, metadata)

    def _eager(self, input_ids: torch.Tensor, positions: torch.Tensor,
               kv_caches: list[torch.Tensor], metadata: AttentionMetadata) -> torch.Tensor:
        with torch.compiler.set_stance("force_eager"):
            return self.model(input_ids, positions, kv_caches, metadata)
