"""Decode steps replayed from CUDA graphs: on a GPU, what `serving.models.compiled` is on CPU.

A decode step of a small model is some thirty short kernels a layer; launched one by one
from Python, the launches, not the GPU, set the pace. At start `DecodeGraphs.capture`
records the model's forward pass once per batch size of `graph_batch_sizes` (1, 2, 4, then
every 8 up to the scheduler's `max_num_seqs`), largest first, all in one memory pool, over
static buffers. A step of decodes only is padded to the next recorded size: its token ids,
positions, slots, context lengths and block tables are written into a pinned host buffer,
one copy moves them to the device, and the graph replays. Steps with prefill chunks run
eagerly (the runner decides which steps the graphs take).

Inside the graphs every layer's attention is `quiver::paged_attention_decode`: it takes its
sizes from shapes and reads nothing back to the host, and on CUDA its Triton kernel walks
each request's blocks up to its length, so one graph serves every context length up to
`max_model_len`. Padding rows decode token 0 at position 0 into a scratch block that no
request owns (the runner allocates one KV block more than the block manager hands out) and
attend to that slot alone; every table entry past a row's blocks is the scratch block too,
so no stale id from a wider step is ever in a table.

Until `capture` runs, `run` executes the same padded steps eagerly: how the CPU tests check
the padding and the buffers.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from serving.kernels import DECODE_ATTENTION
from serving.kernels.metadata import decode_index_size, index_sections
from serving.models.attention import AttentionMetadata
from serving.models.llama import LlamaForCausalLM

# Batch sizes past the first few are recorded every this many rows (as vLLM's default):
# a step pads at most 7 rows, at ~3x fewer graphs (and capture time) than one per size.
BATCH_SIZE_STEP = 8


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every `BATCH_SIZE_STEP` rows, up to the first size ≥ `max_num_seqs`."""
    sizes: list[int] = []
    for size in (1, 2, 4, *range(BATCH_SIZE_STEP, max_num_seqs + BATCH_SIZE_STEP,
                                 BATCH_SIZE_STEP)):
        sizes.append(size)
        if size >= max_num_seqs:
            break
    return sizes


class DecodeGraphs:
    """The model's forward pass for decode-only steps of up to `max_batch_size` requests,
    padded to recorded batch sizes and replayed from CUDA graphs once `capture` ran."""

    def __init__(self, model: LlamaForCausalLM, kv_caches: list[torch.Tensor], *,
                 block_size: int, max_model_len: int, scratch_block: int,
                 batch_sizes: list[int]) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.scratch_block = scratch_block
        self.batch_sizes = sorted(batch_sizes)
        self.max_batch_size = self.batch_sizes[-1]
        device = kv_caches[0].device
        # [token ids | positions | step index], each region sized for the largest batch
        size = 2 * self.max_batch_size + decode_index_size(self.max_batch_size, self.max_blocks)
        self._host = torch.zeros(size, dtype=torch.long, pin_memory=device.type == "cuda")
        self._host_view = self._host.numpy()
        self._buffer = torch.zeros(size, dtype=torch.long, device=device)
        # The host buffer is rewritten only once the previous copy out of it has finished.
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}

    @property
    def is_captured(self) -> bool:
        return bool(self._graphs)

    def padded_size(self, num_rows: int) -> int:
        return next(size for size in self.batch_sizes if size >= num_rows)

    def capture(self) -> float:
        """Record one graph per batch size (after one eager warm-up run each, which also
        compiles the Triton kernel); seconds spent."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for num_rows in reversed(self.batch_sizes):
                self._load_inputs(num_rows, [], [], [])
                self._forward(num_rows)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._outputs[num_rows] = self._forward(num_rows)
                self._graphs[num_rows] = graph
        torch.cuda.synchronize()
        return time.perf_counter() - start

    def run(self, token_ids: list[int], positions: list[int],
            block_tables: list[list[int]]) -> torch.Tensor:
        """Final hidden states `[len(token_ids), hidden]` of one decode per request (a token
        at `positions[i]` of the request owning `block_tables[i]`). The result is a view of
        the graph's output buffer: read it before the next `run`."""
        num_rows = len(token_ids)
        if not 0 < num_rows <= self.max_batch_size:
            raise ValueError(f"{num_rows} decodes for graphs of 1 to {self.max_batch_size}")
        padded = self.padded_size(num_rows)
        self._load_inputs(padded, token_ids, positions, block_tables)
        graph = self._graphs.get(padded)
        if graph is None:
            return self._forward(padded)[:num_rows]
        graph.replay()
        return self._outputs[padded][:num_rows]

    def _forward(self, padded: int) -> torch.Tensor:
        largest = self.max_batch_size
        index = self._buffer[2 * largest:2 * largest + decode_index_size(padded, self.max_blocks)]
        metadata = AttentionMetadata(step_index=index, block_size=self.block_size)
        with self.model.attention_op_as(DECODE_ATTENTION):
            return self.model(self._buffer[:padded], self._buffer[largest:largest + padded],
                              self.kv_caches, metadata)

    def _load_inputs(self, padded: int, token_ids: list[int], positions: list[int],
                     block_tables: list[list[int]]) -> None:
        """Write a step padded to `padded` rows into the host buffer (the step index laid out
        as `serving.kernels.metadata` says, for `padded` decodes) and copy it over."""
        num_rows, largest, block_size = len(token_ids), self.max_batch_size, self.block_size
        if self._copied is not None:
            self._copied.synchronize()
        host = self._host_view
        host[:num_rows] = token_ids
        host[num_rows:padded] = 0
        host[largest:largest + num_rows] = positions
        host[largest + num_rows:largest + padded] = 0
        end = 2 * largest + decode_index_size(padded, self.max_blocks)
        index = host[2 * largest:end]
        header, slots, query_start, seq_lens, tables = np.split(
            index, np.cumsum(index_sections(padded, padded, self.max_blocks))[:-1])
        header[:] = (padded, padded, self.max_blocks, padded)
        tables = tables.reshape(padded, self.max_blocks)
        for row, (position, table) in enumerate(zip(positions, block_tables, strict=True)):
            tables[row, :len(table)] = table
            tables[row, len(table):] = self.scratch_block
            slots[row] = table[position // block_size] * block_size + position % block_size
        seq_lens[:num_rows] = positions
        seq_lens[:num_rows] += 1
        slots[num_rows:] = self.scratch_block * block_size
        seq_lens[num_rows:] = 1
        tables[num_rows:] = self.scratch_block
        query_start[:] = np.arange(padded + 1)
        self._buffer[:end].copy_(self._host[:end], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
