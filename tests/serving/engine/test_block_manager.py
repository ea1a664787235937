import pytest

from serving.engine import BlockManager, Request, SamplingParams, hash_block_tokens
from tests.serving.engine.factories import make_prompt

BLOCK_SIZE = 4


def make_request(request_id: str, token_ids: list[int]) -> Request:
    return Request(request_id, list(token_ids), SamplingParams(max_tokens=8))


def admit(manager: BlockManager, request: Request) -> list[int]:
    """Admit with prefix hits, compute the whole prompt and cache its full blocks."""
    computed_blocks, num_cached_tokens = manager.get_computed_blocks(request)
    new_block_ids = manager.allocate_slots(
        request, request.num_tokens - num_cached_tokens, computed_blocks
    )
    assert new_block_ids is not None
    request.num_computed_tokens = request.num_tokens
    manager.cache_full_blocks(request)
    manager.check_invariants()
    return manager.get_block_table(request.request_id)


def test_allocate_and_free_return_every_block():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    request = make_request("a", list(range(10)))
    assert manager.allocate_slots(request, 10) == [0, 1, 2]
    assert manager.num_free_blocks == 5
    assert manager.usage == pytest.approx(3 / 8)
    manager.check_invariants()
    manager.free(request)
    assert manager.num_free_blocks == 8
    assert manager.usage == 0.0
    assert manager.get_block_table("a") == []
    manager.check_invariants()


def test_allocate_grows_the_table_only_at_block_boundaries():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    request = make_request("a", list(range(4)))
    assert manager.allocate_slots(request, 4) == [0]
    request.num_computed_tokens = 4
    request.append_output_token_id(7)
    assert manager.allocate_slots(request, 1) == [1]
    request.num_computed_tokens = 5
    request.append_output_token_id(8)
    assert manager.allocate_slots(request, 1) == []
    assert manager.get_block_table("a") == [0, 1]


def test_running_out_returns_none_and_allocates_nothing():
    manager = BlockManager(num_blocks=3, block_size=BLOCK_SIZE)
    first = make_request("a", list(range(8)))
    second = make_request("b", list(range(100, 108)))
    assert manager.allocate_slots(first, 8) is not None
    assert not manager.can_allocate(second, 8)
    assert manager.allocate_slots(second, 8) is None
    assert manager.num_free_blocks == 1
    assert manager.get_block_table("b") == []
    manager.check_invariants()


def test_prefix_hit_shares_blocks_and_counts_tokens():
    manager = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    prompt = make_prompt("p", 10)
    first_table = admit(manager, make_request("a", prompt))
    second = make_request("b", prompt)
    computed_blocks, num_cached_tokens = manager.get_computed_blocks(second)
    assert num_cached_tokens == 8
    assert [block.block_id for block in computed_blocks] == first_table[:2]
    second_table = admit(manager, second)
    assert second_table[:2] == first_table[:2]
    assert second_table[2] != first_table[2]  # the partial block is never shared
    assert [manager.blocks[i].ref_count for i in second_table] == [2, 2, 1]
    assert manager.prefix_cache_queries == 20
    assert manager.prefix_cache_hits == 8


def test_never_serves_the_whole_prompt_from_cache():
    manager = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    prompt = make_prompt("p", 8)
    admit(manager, make_request("a", prompt))
    # Both blocks are cached, but the last token must be computed to get logits.
    _, num_cached_tokens = manager.get_computed_blocks(make_request("b", prompt))
    assert num_cached_tokens == 4


def test_hit_differs_after_first_differing_block():
    manager = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    prompt = make_prompt("p", 12)
    admit(manager, make_request("a", prompt))
    changed = [*prompt[:4], prompt[4] + 1, *prompt[5:]]
    _, num_cached_tokens = manager.get_computed_blocks(make_request("b", changed))
    assert num_cached_tokens == 4


def test_freed_cached_blocks_are_reused_by_a_later_prefix_hit():
    manager = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    prompt = make_prompt("p", 10)
    first = make_request("a", prompt)
    first_table = admit(manager, first)
    manager.free(first)
    assert manager.num_free_blocks == 16
    second_table = admit(manager, make_request("b", prompt))
    assert second_table[:2] == first_table[:2]
    assert manager.num_free_blocks == 13
    assert [manager.blocks[i].ref_count for i in second_table] == [1, 1, 1]


def test_output_token_blocks_are_cached_too():
    manager = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    first = make_request("a", make_prompt("p", 6))
    admit(manager, first)
    for token_id in (11, 12, 13):
        first.append_output_token_id(token_id)
        assert manager.allocate_slots(first, 1) is not None
        first.num_computed_tokens += 1
        manager.cache_full_blocks(first)
    manager.check_invariants()
    # tokens 0..8 computed: blocks 0 and 1 (prompt + two outputs) are cached.
    follow_up = make_request("b", [*first.all_token_ids, 99])
    _, num_cached_tokens = manager.get_computed_blocks(follow_up)
    assert num_cached_tokens == 8


def test_freed_cached_blocks_are_evicted_least_recently_freed_first():
    manager = BlockManager(num_blocks=6, block_size=BLOCK_SIZE)
    old = make_request("old", make_prompt("old", 8))
    new = make_request("new", make_prompt("new", 8))
    admit(manager, old)
    admit(manager, new)
    manager.free(old)
    manager.free(new)
    # The two never-used blocks are handed out first, then old's blocks (tail first).
    filler = make_request("filler", make_prompt("filler", 16))
    admit(manager, filler)
    assert manager.get_computed_blocks(make_request("x", old.prompt_token_ids + [1]))[1] == 0
    assert manager.get_computed_blocks(make_request("y", new.prompt_token_ids + [1]))[1] == 8


def test_free_evicts_the_tail_first():
    manager = BlockManager(num_blocks=3, block_size=BLOCK_SIZE)
    prompt = make_prompt("p", 12)
    first = make_request("a", prompt)
    admit(manager, first)
    manager.free(first)
    manager.allocate_slots(make_request("b", [1]), 1)  # evicts the last block only
    _, num_cached_tokens = manager.get_computed_blocks(make_request("c", prompt + [5]))
    assert num_cached_tokens == 8
    manager.check_invariants()


def test_stale_hash_is_evicted_when_its_block_is_reused():
    manager = BlockManager(num_blocks=2, block_size=BLOCK_SIZE)
    prompt = make_prompt("p", 5)
    first = make_request("a", prompt)
    block_id = admit(manager, first)[0]
    stale_hash = manager.blocks[block_id].block_hash
    assert manager.hash_to_block[stale_hash].block_id == block_id
    manager.free(first)
    assert manager.allocate_slots(make_request("b", list(range(8))), 8) is not None
    assert stale_hash not in manager.hash_to_block
    assert manager.blocks[block_id].block_hash is None
    assert manager.get_computed_blocks(make_request("c", prompt))[1] == 0
    manager.check_invariants()


def test_hit_on_free_blocks_counts_them_as_taken():
    manager = BlockManager(num_blocks=3, block_size=BLOCK_SIZE)
    prompt = make_prompt("p", 9)
    first = make_request("a", prompt)
    admit(manager, first)
    manager.free(first)
    second = make_request("b", prompt + list(range(7)))  # 16 tokens: 2 hits + 2 new blocks
    computed_blocks, num_cached_tokens = manager.get_computed_blocks(second)
    assert num_cached_tokens == 8
    assert not manager.can_allocate(second, 8, computed_blocks)
    assert manager.allocate_slots(second, 8, computed_blocks) is None
    manager.check_invariants()


def test_duplicate_computation_keeps_one_cached_copy():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    prompt = make_prompt("p", 5)
    first, second = make_request("a", prompt), make_request("b", prompt)
    for request in (first, second):  # admitted together: neither hits
        assert manager.get_computed_blocks(request)[1] == 0
        assert manager.allocate_slots(request, 5) is not None
    for request in (first, second):
        request.num_computed_tokens = 5
        manager.cache_full_blocks(request)
    manager.check_invariants()
    assert len(manager.hash_to_block) == 1
    manager.free(first)
    manager.free(second)
    manager.check_invariants()


def test_prefix_caching_disabled():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    prompt = make_prompt("p", 9)
    admit(manager, make_request("a", prompt))
    assert manager.get_computed_blocks(make_request("b", prompt)) == ([], 0)
    assert manager.hash_to_block == {}
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (0, 0)


def test_reset_prefix_cache_refuses_while_blocks_are_in_use():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    prompt = make_prompt("p", 9)
    first = make_request("a", prompt)
    admit(manager, first)
    assert not manager.reset_prefix_cache()
    manager.free(first)
    assert manager.reset_prefix_cache()
    assert manager.get_computed_blocks(make_request("b", prompt)) == ([], 0)
    assert manager.prefix_cache_queries == 9  # counters are cumulative
    manager.check_invariants()


def test_hash_chain_is_stable_and_depends_on_the_parent():
    first = hash_block_tokens(None, [1, 2, 3, 4])
    assert first == hash_block_tokens(None, (1, 2, 3, 4))
    assert len(first) == 32
    assert hash_block_tokens(first, [5, 6]) != hash_block_tokens(None, [5, 6])
    assert hash_block_tokens(None, [1, 2, 3, 4]) != hash_block_tokens(None, [1, 2, 4, 3])
