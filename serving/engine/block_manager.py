"""Paged KV cache bookkeeping with prefix caching (a hash chain with a ref count per block).

A request's block table lists the physical blocks holding its tokens' KV, in order.
A full block is identified by the hash of (its parent block's hash, its token ids), so a
hash names a whole prefix. Blocks nobody references sit in the free list in LRU order
(least recently freed first) and keep their hash until reused, so a later request with
the same prefix can take them back. Tokens are never written into a shared block: only
full, computed blocks are registered in the prefix cache.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from serving.engine.request import BlockHash, Request


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """SHA-256 of the parent hash followed by the token ids packed as little-endian int64.

    Stable across processes, machines and Python versions (unlike `hash()`), and
    collision-resistant, so a hit never serves another prompt's KV.
    """
    digest = hashlib.sha256(parent_hash or b"")
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return digest.digest()


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None


class BlockManager:
    """Allocates KV blocks to requests; running out returns None, never raises."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(block_id) for block_id in range(num_blocks)]
        # Keys are block ids; the first key is the least recently freed block.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[BlockHash, Block] = {}
        self.block_tables: dict[str, list[int]] = {}
        # Per request: how many leading blocks cache_full_blocks has already handled.
        self.num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request (vllm:kv_cache_usage_perc)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_block_table(self, request_id: str) -> list[int]:
        return list(self.block_tables.get(request_id, ()))

    def get_computed_blocks(self, request: Request) -> tuple[list[Block], int]:
        """The longest cached chain of the request's full blocks, and the tokens it covers.

        Capped below the request's length so the last token is always computed and the
        model yields logits for it.
        """
        if not self.enable_prefix_caching:
            return [], 0
        self._update_block_hashes(request)
        max_num_blocks = (request.num_tokens - 1) // self.block_size
        computed_blocks = []
        for block_hash in request.block_hashes[:max_num_blocks]:
            block = self.hash_to_block.get(block_hash)
            if block is None:
                break
            computed_blocks.append(block)
        return computed_blocks, len(computed_blocks) * self.block_size

    def can_allocate(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[Block] = ()
    ) -> bool:
        num_new_blocks = self._num_new_blocks(request, num_new_tokens, computed_blocks)
        # Cached blocks that are free now stop being free once this request takes them.
        num_free_hits = sum(1 for block in computed_blocks if block.ref_count == 0)
        return num_new_blocks <= self.num_free_blocks - num_free_hits

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[Block] = ()
    ) -> list[int] | None:
        """Make room for `num_new_tokens` more tokens after the computed ones.

        `computed_blocks` (from `get_computed_blocks`, first admission only) are prefix
        hits that the request takes a reference on. Returns the newly allocated block ids,
        or None, allocating nothing, when there are not enough free blocks.
        """
        if not self.can_allocate(request, num_new_tokens, computed_blocks):
            return None
        num_new_blocks = self._num_new_blocks(request, num_new_tokens, computed_blocks)
        block_table = self.block_tables.get(request.request_id)
        if block_table is None:
            block_table = self._open_block_table(request, computed_blocks)
        else:
            assert not computed_blocks, "prefix hits are taken at first allocation only"
        new_block_ids = [self._allocate_block() for _ in range(num_new_blocks)]
        block_table.extend(new_block_ids)
        return new_block_ids

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's newly full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        block_table = self.block_tables[request.request_id]
        num_full_blocks = request.num_computed_tokens // self.block_size
        start = self.num_cached_blocks[request.request_id]
        if num_full_blocks <= start:
            return
        self._update_block_hashes(request)
        for index in range(start, num_full_blocks):
            block = self.blocks[block_table[index]]
            block_hash = request.block_hashes[index]
            # Two requests can compute the same prefix at once; the first one wins and
            # the duplicate block stays unhashed (it is freed as a plain block).
            if block.block_hash is None and block_hash not in self.hash_to_block:
                block.block_hash = block_hash
                self.hash_to_block[block_hash] = block
        self.num_cached_blocks[request.request_id] = num_full_blocks

    def free(self, request: Request) -> None:
        """Drop the request's references, tail first, so its tail is evicted first."""
        block_table = self.block_tables.pop(request.request_id, None)
        if block_table is None:
            return
        del self.num_cached_blocks[request.request_id]
        for block_id in reversed(block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Like vLLM, refuses (returns False) while blocks are in
        use. The hit and query counters are cumulative and are not reset."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.hash_to_block.clear()
        return True

    def check_invariants(self) -> None:
        """Assert the bookkeeping is consistent; for tests."""
        holders = Counter(block_id for table in self.block_tables.values() for block_id in table)
        for block in self.blocks:
            assert block.ref_count == holders[block.block_id], block
            assert (block.ref_count == 0) == (block.block_id in self.free_block_ids), block
            if block.block_hash is not None:
                assert self.hash_to_block.get(block.block_hash) is block, block
        for block_hash, block in self.hash_to_block.items():
            assert block.block_hash == block_hash, block
        for request_id, table in self.block_tables.items():
            assert len(set(table)) == len(table), request_id
            assert self.num_cached_blocks[request_id] <= len(table), request_id
        assert self.block_tables.keys() == self.num_cached_blocks.keys()
        assert len(self.free_block_ids) == sum(1 for b in self.blocks if b.ref_count == 0)

    def _num_new_blocks(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[Block]
    ) -> int:
        num_allocated = len(self.block_tables.get(request.request_id, ())) + len(computed_blocks)
        num_tokens = (
            request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        )
        num_required = -(-num_tokens // self.block_size)
        return max(0, num_required - num_allocated)

    def _open_block_table(self, request: Request, computed_blocks: Sequence[Block]) -> list[int]:
        """Start the request's block table with its prefix hits; count the lookup."""
        assert request.num_computed_tokens == 0, request.request_id
        if self.enable_prefix_caching and request.num_preemptions == 0:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(computed_blocks) * self.block_size
        for block in computed_blocks:
            self._take_ref(block)
        block_table = [block.block_id for block in computed_blocks]
        self.block_tables[request.request_id] = block_table
        self.num_cached_blocks[request.request_id] = len(block_table)
        return block_table

    def _take_ref(self, block: Block) -> None:
        if block.ref_count == 0:
            del self.free_block_ids[block.block_id]
        block.ref_count += 1

    def _allocate_block(self) -> int:
        """Reuse the least recently freed block, evicting its stale hash if it has one."""
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        assert block.ref_count == 0, block
        if block.block_hash is not None:
            del self.hash_to_block[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def _update_block_hashes(self, request: Request) -> None:
        """Extend the request's hash chain over its full blocks."""
        block_hashes = request.block_hashes
        num_full_blocks = request.num_tokens // self.block_size
        parent_hash = block_hashes[-1] if block_hashes else None
        token_ids = request.all_token_ids
        for index in range(len(block_hashes), num_full_blocks):
            start = index * self.block_size
            parent_hash = hash_block_tokens(parent_hash, token_ids[start : start + self.block_size])
            block_hashes.append(parent_hash)
