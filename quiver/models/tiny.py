"""`quiver models tiny`: a deterministic, randomly initialised tiny Llama for fast tests.

Llama architecture with grouped-query attention, RoPE and tied embeddings; a byte-level BPE
tokenizer trained on local text; a ChatML chat template. Same torch version, same bytes.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from common import corpus
from quiver.models.marker import ModelMarker, read_marker
from quiver.models.publish import publish_dir
from quiver.models.verify import read_config

logger = logging.getLogger(__name__)

RECIPE_VERSION = 1
SEED = 0
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MODEL_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    # Wider than the usual 0.02 so logits are peaked: greedy parity tests then compare
    # clear winners, not near-ties decided by summation order.
    "initializer_range": 0.1,
}


def build_tiny(dest: Path, *, force: bool = False) -> Path:
    """Make `dest` the tiny model dir; instant when it is already there."""
    marker = read_marker(dest)
    if marker and marker.recipe_version == RECIPE_VERSION and not force:
        logger.info("tiny model already at %s", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tiny-", dir=dest.parent) as work_dir:
        staging = Path(work_dir) / "model"
        tokenizer = train_tokenizer()
        num_parameters = save_model(staging, vocab_size=len(tokenizer))
        tokenizer.save_pretrained(staging)
        read_config(staging)
        ModelMarker(name="tiny-llama", source="random", source_sha256=f"seed-{SEED}",
                    recipe_version=RECIPE_VERSION,
                    verification={"num_parameters": num_parameters}).write(staging)
        publish_dir(staging, dest)
    logger.info("tiny model ready at %s", dest)
    return dest


def train_tokenizer():
    """A byte-level BPE tokenizer trained on the local corpus, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus.documents("all"), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
        model_input_names=["input_ids", "attention_mask"], clean_up_tokenization_spaces=False,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )


def save_model(out_dir: Path, *, vocab_size: int) -> int:
    """Seeded random Llama weights as fp32 safetensors; returns the parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        pad_token_id=2, dtype="float32", **MODEL_SHAPE,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    model.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())
