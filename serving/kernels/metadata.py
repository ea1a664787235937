"""Where one step's tokens go in the paged KV cache and what each attends to, packed into a
single int64 tensor for the attention ops.

One tensor (not five) keeps a compiled graph to one dynamic size per step besides the token
count: the graph never specialises on how many requests or blocks a step has. Layout:

    [num_tokens, num_seqs, max_blocks, num_decodes,
     slot_mapping[num_tokens], query_start[num_seqs + 1], seq_lens[num_seqs],
     block_tables[num_seqs * max_blocks]]

Requests come decodes first (one query token each), then prefill chunks. The slot of
position p of a request is `block_table[p // block_size] * block_size + p % block_size`;
`seq_lens` are context lengths after the step; block tables are padded with block 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate, chain

import torch

HEADER_SIZE = 4


def pack_step_index(
    *,
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
) -> torch.Tensor:
    """The packed int64 index of a step whose requests come decodes first."""
    num_decodes = count_leading_decodes(query_lens)
    max_blocks = max(len(table) for table in block_tables)
    slot_mapping = []
    for query_len, seq_len, table in zip(query_lens, seq_lens, block_tables, strict=True):
        for position in range(seq_len - query_len, seq_len):
            slot_mapping.append(table[position // block_size] * block_size + position % block_size)
    padded = (table + [0] * (max_blocks - len(table)) for table in block_tables)
    return torch.tensor(
        [len(slot_mapping), len(query_lens), max_blocks, num_decodes, *slot_mapping,
         0, *accumulate(query_lens), *seq_lens, *chain.from_iterable(padded)],
        dtype=torch.long,
    )


def count_leading_decodes(query_lens: list[int]) -> int:
    num_decodes = 0
    while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
        num_decodes += 1
    if any(n <= 1 for n in query_lens[num_decodes:]):
        raise ValueError(f"decodes must come before prefill chunks, got {query_lens}")
    return num_decodes


def index_sections(num_tokens: int, num_seqs: int, max_blocks: int) -> list[int]:
    """Lengths of the index's sections in order: header, slot mapping, query starts,
    context lengths, block tables."""
    return [HEADER_SIZE, num_tokens, num_seqs + 1, num_seqs, num_seqs * max_blocks]


def decode_index_size(num_seqs: int, max_blocks: int) -> int:
    """Length of the step index of `num_seqs` decodes with block tables `max_blocks` wide."""
    return sum(index_sections(num_seqs, num_seqs, max_blocks))


def unpack_decode_index(metadata: torch.Tensor, num_seqs: int) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slot mapping `[num_seqs]`, context lengths `[num_seqs]` and block tables
    `[num_seqs, max_blocks]` of a step index whose `num_seqs` rows are all decodes, found
    from its length alone: nothing is read back from the device, so a CUDA graph can hold
    the views and replay them over new values."""
    max_blocks, rest = divmod(metadata.numel() - decode_index_size(num_seqs, 0), num_seqs)
    if rest or max_blocks < 1:
        raise ValueError(f"a step index of {metadata.numel()} values does not hold "
                         f"{num_seqs} decodes")
    sections = index_sections(num_seqs, num_seqs, max_blocks)
    _, slot_mapping, _, seq_lens, tables = metadata.split(sections)
    return slot_mapping, seq_lens, tables.view(num_seqs, max_blocks)


@dataclass(frozen=True)
class StepIndex:
    """Views of a packed step index (the header as ints)."""

    num_tokens: int
    num_seqs: int
    num_decodes: int
    slot_mapping: torch.Tensor  # [num_tokens]
    query_start: torch.Tensor  # [num_seqs + 1]
    seq_lens: torch.Tensor  # [num_seqs]
    block_tables: torch.Tensor  # [num_seqs, max_blocks]

    @classmethod
    def unpack(cls, metadata: torch.Tensor) -> StepIndex:
        num_tokens, num_seqs, max_blocks, num_decodes = metadata[:HEADER_SIZE].tolist()
        sections = index_sections(num_tokens, num_seqs, max_blocks)
        _, slot_mapping, query_start, seq_lens, tables = metadata.split(sections)
        return cls(num_tokens, num_seqs, num_decodes, slot_mapping, query_start, seq_lens,
                   tables.view(num_seqs, max_blocks))
