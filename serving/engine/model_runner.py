"""Runs one engine step on our Llama-family model: flat batch in, sampled tokens out.

Every scheduled request of a step — decodes and prefill chunks alike — goes through one
forward pass. The batch is ordered decodes first (one token each), then prefill chunks, as
`AttentionMetadata` expects. Logits are computed only at the last token of the requests
whose step completes their known tokens (`is_last_chunk`), and those rows are sampled.

At start the runner picks its paged-attention op (the C++ kernel where it builds) and, on
CPU, compiles the forward pass (`serving.models.compiled`) and warms every graph up, so no
request waits for a compile; where compiling fails it runs eagerly (`CompilationConfig`).
On CUDA attention runs Quiver's Triton kernels where they pass their start-up check (in the
model's dtype), and the runner records the forward pass of decode-only steps as CUDA graphs,
one per batch size up to `max_num_seqs` (`serving.models.cuda_graphs`), replayed for every
step of decodes only; other steps, and every step where recording fails, run eagerly.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from serving.engine.config import CompilationConfig
from serving.engine.outputs import Logprobs, ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from serving.engine.pooler import Pooler
from serving.engine.sampler import Sampler, SamplingRow
from serving.kernels import Kernels, select_kernels
from serving.kernels.openmp import run_in_passing_thread
from serving.models.attention import AttentionMetadata
from serving.models.compiled import CompiledForward, Forward
from serving.models.config import ModelArchConfig
from serving.models.cuda_graphs import DecodeGraphs, graph_batch_sizes
from serving.models.linear import Packing
from serving.models.llama import LlamaForCausalLM
from serving.models.loader import load_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInput:
    """The flat tensors of one step, on the model's device."""

    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampled] rows whose logits are sampled
    sampled_requests: list[ScheduledRequest]  # in the order of logits_indices
    # embedding requests: their [start, end) rows of the batch
    pooled_rows: dict[str, tuple[ScheduledRequest, int, int]]


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)


class ModelRunner:
    def __init__(
        self,
        model_dir: Path,
        *,
        device: torch.device,
        dtype: torch.dtype,
        num_blocks: int,
        block_size: int,
        sampler: Sampler,
        compilation: CompilationConfig | None = None,
        max_num_seqs: int | None = None,
        max_model_len: int | None = None,
    ) -> None:
        """`max_num_seqs` and `max_model_len` size the CUDA graphs of decode steps (without
        them, or on CPU, or with `enforce_eager`, none are recorded)."""
        compilation = compilation or CompilationConfig()
        self.device = torch.device(device)
        self.dtype = dtype
        self.block_size = block_size
        self.sampler = sampler
        self.pooler = Pooler()
        self.arch = ModelArchConfig.from_model_dir(model_dir)
        kernels = select_kernels(
            self.device, use_cpp=compilation.use_cpp_kernels, cache_dir=compilation.cache_dir,
            head_dim=self.arch.head_dim, num_queries_per_kv=self.arch.num_queries_per_kv,
            dtype=dtype,
        )
        graph_sizes = (graph_batch_sizes(max_num_seqs)
                       if self.device.type == "cuda" and not compilation.enforce_eager
                       and max_num_seqs and max_model_len else None)
        self.decode_graphs: DecodeGraphs | None = None
        # With graphs, one KV block more than the block manager hands out: the scratch block
        # that their padding rows write to.
        num_cache_blocks = num_blocks + (graph_sizes is not None)
        # Loading and compiling use torch's thread pool; doing it on a thread that then
        # exits leaves the step-running thread the only pool (serving.kernels.openmp).
        self.model, self.kv_caches, self.forward = run_in_passing_thread(
            lambda: self._load(model_dir, num_cache_blocks, compilation, kernels)
        )
        if graph_sizes is not None:
            self.decode_graphs = self._capture(num_blocks, graph_sizes, max_model_len)
        self.is_compiled = isinstance(self.forward, CompiledForward) and self.forward.is_compiled
        logger.info(
            "model runner: %s on %s (%s), KV cache %d blocks x %d tokens, %s, attention %s",
            model_dir,
            self.device,
            str(dtype).removeprefix("torch."),
            num_blocks,
            block_size,
            "compiled" if self.is_compiled else
            "CUDA graphs for decodes" if self.decode_graphs is not None else "eager",
            kernels.attention.name,
        )

    def _load(self, model_dir: Path, num_blocks: int, compilation: CompilationConfig,
              kernels: Kernels) -> tuple[LlamaForCausalLM, list[torch.Tensor], Forward]:
        model = load_model(
            model_dir, dtype=self.dtype, device=self.device, attention_op=kernels.attention,
            packing=Packing.KERNEL if kernels.has_cpp_library else Packing.EAGER,
        )
        kv_caches = model.make_kv_caches(num_blocks, self.block_size)
        return model, kv_caches, self._compile(model, kv_caches, compilation, kernels)

    def _capture(self, num_blocks: int, batch_sizes: list[int],
                 max_model_len: int) -> DecodeGraphs | None:
        """CUDA graphs of decode steps, recorded now; None (eager) where recording fails."""
        graphs = DecodeGraphs(self.model, self.kv_caches, block_size=self.block_size,
                              max_model_len=max_model_len, scratch_block=num_blocks,
                              batch_sizes=batch_sizes)
        try:
            seconds = graphs.capture()
        except Exception as exc:  # any capture failure: serve eagerly rather than not at all
            logger.warning("recording CUDA graphs failed, decoding eagerly: %s",
                           _first_line(exc))
            return None
        logger.info("CUDA graphs of decode steps for %d batch sizes up to %d recorded in "
                    "%.1f s", len(batch_sizes), batch_sizes[-1], seconds)
        return graphs

    def _compile(self, model: LlamaForCausalLM, kv_caches: list[torch.Tensor],
                 compilation: CompilationConfig, kernels: Kernels) -> Forward:
        """The compiled forward pass, warmed up and checked; the eager model where that fails.

        Only the C++ kernels are compiled around: inductor's code around the pure-torch
        attention op corrupted memory on AVX-512 hosts, so without the C++ library (no
        compiler, an unsupported head size, `--no-cpu-kernels`) the model runs eagerly."""
        if compilation.enforce_eager or self.device.type != "cpu":
            return model
        if not kernels.has_cpp_library:
            logger.warning("not compiling the model: it compiles only around the C++ kernels, "
                           "which are unavailable; running it eagerly")
            return model
        compiled = CompiledForward(model, compilation.cache_dir)
        try:
            seconds = compiled.warm_up(kv_caches, self._example_step,
                                       lambda n: self._check_step(n, kv_caches[0].shape[1]))
        except Exception as exc:  # any compiler failure: serve eagerly rather than not at all
            logger.warning("compiling the model failed, running it eagerly: %s",
                           _first_line(exc))
            compiled.run_eagerly()
            return compiled
        logger.info("model compiled and warmed up in %.1f s", seconds)
        return compiled

    def _example_step(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor,
                                                      AttentionMetadata]:
        """`num_tokens` one-token requests, all in block 0: a step for warming graphs up
        (whatever it writes to block 0 is overwritten before any request reads it)."""
        metadata = AttentionMetadata.build(
            query_lens=[1] * num_tokens, seq_lens=[1] * num_tokens,
            block_tables=[[0]] * num_tokens, block_size=self.block_size, device=self.device,
        )
        zeros = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        return zeros, zeros.clone(), metadata

    def _check_step(self, num_tokens: int, num_slots: int) -> tuple[
            torch.Tensor, torch.Tensor, AttentionMetadata] | None:
        """One request of `num_tokens` distinct tokens from position 0, each token in its
        own KV slot (blocks 0, 1, ...), for checking compiled graphs against eager; None
        when the cache has too few blocks (those blocks are overwritten before use)."""
        num_blocks = -(-num_tokens // self.block_size)
        if num_blocks * self.block_size > num_slots:
            return None
        metadata = AttentionMetadata.build(
            query_lens=[num_tokens], seq_lens=[num_tokens],
            block_tables=[list(range(num_blocks))], block_size=self.block_size,
            device=self.device,
        )
        input_ids = torch.arange(3, 3 + num_tokens, device=self.device) % self.arch.vocab_size
        return input_ids, torch.arange(num_tokens, device=self.device), metadata

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        if scheduler_output.is_empty:
            return ModelRunnerOutput(sampled_token_ids={})
        requests = scheduler_output.scheduled_requests
        if self.decode_graphs is not None and self._fits_graphs(requests):
            hidden_states = self.decode_graphs.run(
                [request.token_ids_to_compute[0] for request in requests],
                [request.start_position for request in requests],
                [request.block_table for request in requests],
            )
            return self._sample(self.model.compute_logits(hidden_states), requests)
        model_input = self.prepare_inputs(requests)
        hidden_states = self.forward(
            model_input.input_ids,
            model_input.positions,
            self.kv_caches,
            model_input.attn_metadata,
        )
        pooled = (self.pooler.pool(hidden_states, model_input.pooled_rows)
                  if model_input.pooled_rows else None)
        if not model_input.sampled_requests:
            return ModelRunnerOutput(sampled_token_ids={}, pooled=pooled)
        logits = self.model.compute_logits(hidden_states, model_input.logits_indices)
        return dataclasses.replace(self._sample(logits, model_input.sampled_requests),
                                   pooled=pooled)

    def _fits_graphs(self, requests: list[ScheduledRequest]) -> bool:
        """Decodes only (one token each, every row sampled), no more than the graphs hold,
        no block table wider than theirs."""
        graphs = self.decode_graphs
        assert graphs is not None
        return len(requests) <= graphs.max_batch_size and all(
            request.num_tokens == 1 and request.is_last_chunk
            and request.sampling_params.pooling is None
            and len(request.block_table) <= graphs.max_blocks for request in requests)

    def prepare_inputs(self, scheduled_requests: list[ScheduledRequest]) -> ModelInput:
        """Flat input ids, positions, slot mapping and metadata; decodes first."""
        requests = sorted(scheduled_requests, key=lambda request: request.num_tokens > 1)
        query_lens = [request.num_tokens for request in requests]
        start_positions = [request.start_position for request in requests]
        input_ids = list(
            itertools.chain.from_iterable(request.token_ids_to_compute for request in requests)
        )
        query_ends = list(itertools.accumulate(query_lens))
        # position of row i = i + (start_position - query_start) of its request
        offsets = [
            start - (end - n)
            for start, end, n in zip(start_positions, query_ends, query_lens, strict=True)
        ]
        positions = torch.arange(len(input_ids)) + torch.repeat_interleave(
            torch.tensor(offsets), torch.tensor(query_lens)
        )
        sampled = [index for index, request in enumerate(requests)
                   if request.is_last_chunk and request.sampling_params.pooling is None]
        pooled_rows = {request.request_id: (request, end - request.num_tokens, end)
                       for request, end in zip(requests, query_ends, strict=True)
                       if request.sampling_params.pooling is not None}
        positions = positions.to(self.device)
        attn_metadata = AttentionMetadata.build(
            query_lens=query_lens,
            seq_lens=[start + n for start, n in zip(start_positions, query_lens, strict=True)],
            block_tables=[request.block_table for request in requests],
            block_size=self.block_size,
            device=self.device,
        )
        return ModelInput(
            input_ids=torch.tensor(input_ids, device=self.device),
            positions=positions,
            attn_metadata=attn_metadata,
            logits_indices=torch.tensor([query_ends[i] - 1 for i in sampled], device=self.device),
            sampled_requests=[requests[i] for i in sampled],
            pooled_rows=pooled_rows,
        )

    def _sample(self, logits: torch.Tensor, requests: list[ScheduledRequest]) -> ModelRunnerOutput:
        rows = [
            SamplingRow(
                request_id=request.request_id,
                params=request.sampling_params,
                prompt_token_ids=request.prompt_token_ids,
                output_token_ids=request.output_token_ids,
            )
            for request in requests
        ]
        output = self.sampler(logits, rows)
        request_ids = [request.request_id for request in requests]
        logprobs: dict[str, Logprobs] = {
            request_id: row_logprobs
            for request_id, row_logprobs in zip(request_ids, output.logprobs, strict=True)
            if row_logprobs is not None
        }
        return ModelRunnerOutput(
            sampled_token_ids=dict(zip(request_ids, output.token_ids, strict=True)),
            logprobs=logprobs or None,
        )
