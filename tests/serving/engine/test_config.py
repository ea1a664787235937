import pytest

from serving.engine import (
    CacheConfig,
    PromptTooLongError,
    QueueFullError,
    SchedulerConfig,
    num_blocks_for_budget,
)
from tests.serving.engine.factories import create_scheduler


def test_config_defaults():
    cache_config = CacheConfig(num_blocks=10)
    assert (cache_config.block_size, cache_config.enable_prefix_caching) == (16, True)
    scheduler_config = SchedulerConfig(max_model_len=4096)
    assert scheduler_config.max_num_seqs == 64
    assert scheduler_config.max_num_batched_tokens == 2048
    assert scheduler_config.max_waiting_requests == 1024


@pytest.mark.parametrize(
    ("field", "build"),
    [
        ("block_size", lambda: CacheConfig(block_size=0, num_blocks=4)),
        ("num_blocks", lambda: CacheConfig(num_blocks=0)),
        ("max_num_seqs", lambda: SchedulerConfig(max_num_seqs=0, max_model_len=64)),
        ("max_model_len", lambda: SchedulerConfig(max_model_len=1)),
        ("max_waiting_requests", lambda: SchedulerConfig(max_model_len=64, max_waiting_requests=0)),
        (
            "max_num_batched_tokens",
            lambda: SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4, max_model_len=64),
        ),
    ],
)
def test_config_validation_names_the_field(field, build):
    with pytest.raises(ValueError, match=field):
        build()


def test_scheduler_rejects_max_model_len_larger_than_kv_cache():
    with pytest.raises(ValueError, match=r"max_model_len \(256\).*4 blocks x 16 tokens = 64"):
        create_scheduler(max_model_len=256, num_blocks=4)


def test_num_blocks_for_budget():
    # 2 (K, V) x 2 layers x 16 tokens x 4 heads x 8 dims x 2 bytes = 4096 bytes per block.
    kwargs = {"num_layers": 2, "num_kv_heads": 4, "head_dim": 8, "block_size": 16, "dtype_bytes": 2}
    assert num_blocks_for_budget(4096 * 10 + 4095, **kwargs) == 10
    assert num_blocks_for_budget(4096, **kwargs) == 1
    with pytest.raises(ValueError, match="fits no block.*4096 bytes"):
        num_blocks_for_budget(4095, **kwargs)
    with pytest.raises(ValueError, match="head_dim"):
        num_blocks_for_budget(1 << 30, **{**kwargs, "head_dim": 0})


def test_error_messages():
    full = QueueFullError(1024, retry_after_s=2.0)
    assert full.retry_after_s == 2.0
    assert "waiting queue is full" in str(full) and "1024" in str(full)
    too_long = PromptTooLongError(100, 30, 128)
    assert too_long.param == "prompt"
    assert "maximum context length is 128" in str(too_long)
    assert "130 tokens (100 in the prompt, 30 for the completion)" in str(too_long)
    assert "no room" in str(PromptTooLongError(128, None, 128))
