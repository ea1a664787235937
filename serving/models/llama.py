"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) over a paged KV cache.

embed -> N x (RMSNorm -> attention -> residual, RMSNorm -> MLP -> residual) -> RMSNorm,
then `compute_logits` applies the (tied or separate) LM head only to the rows that sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from serving.kernels import REFERENCE_ATTENTION, AttentionOp
from serving.models.attention import AttentionMetadata, paged_attention
from serving.models.config import ModelArchConfig
from serving.models.layers import GatedMLP, RMSNorm, empty_parameter
from serving.models.linear import Packing, effective_packing, linear, prepack
from serving.models.quant import FloatProjection, Projection
from serving.models.rope import RotaryEmbedding


class LlamaAttention(nn.Module):
    """Fused qkv projection (with bias for Qwen2), RoPE, paged attention, o_proj."""

    def __init__(
        self,
        arch: ModelArchConfig,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        attention_op: AttentionOp,
    ) -> None:
        super().__init__()
        self.attention_op = attention_op
        self.num_heads = arch.num_attention_heads
        self.num_kv_heads = arch.num_key_value_heads
        self.head_dim = arch.head_dim
        self.scale = arch.head_dim**-0.5
        q_size = self.num_heads * self.head_dim
        qkv_size = q_size + 2 * self.num_kv_heads * self.head_dim
        self.qkv_proj: Projection = FloatProjection(
            qkv_size, arch.hidden_size, bias=arch.attention_bias, dtype=dtype, device=device
        )
        self.o_proj: Projection = FloatProjection(
            arch.hidden_size, q_size, bias=False, dtype=dtype, device=device
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = hidden_states.shape[0]
        qkv = self.qkv_proj(hidden_states)
        num_qk_heads = self.num_heads + self.num_kv_heads
        qkv = qkv.view(num_tokens, num_qk_heads + self.num_kv_heads, self.head_dim)
        # RoPE on q and k together: one set of elementwise ops per layer.
        query_key = RotaryEmbedding.apply(qkv[:, :num_qk_heads], cos, sin)
        query, key = query_key.split((self.num_heads, self.num_kv_heads), dim=1)
        value = qkv[:, num_qk_heads:]
        output = paged_attention(
            self.attention_op, query, key, value, kv_cache, metadata, self.scale
        )
        return self.o_proj(output)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        arch: ModelArchConfig,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        attention_op: AttentionOp,
    ) -> None:
        super().__init__()
        norm_args = {"eps": arch.rms_norm_eps, "dtype": dtype, "device": device}
        self.input_layernorm = RMSNorm(arch.hidden_size, **norm_args)
        self.self_attn = LlamaAttention(
            arch, dtype=dtype, device=device, attention_op=attention_op
        )
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, **norm_args)
        self.mlp = GatedMLP(arch.hidden_size, arch.intermediate_size, dtype=dtype, device=device)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        attn_output = self.self_attn(
            self.input_layernorm(hidden_states), cos, sin, kv_cache, metadata
        )
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DecoderBlock(nn.Module):
    """Consecutive decoder layers run as one unit: `serving.models.compiled` compiles a block
    into one graph. Not a submodule of the model (its layers are the model's own)."""

    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden_states = layer(hidden_states, cos, sin, kv_cache, metadata)
        return hidden_states


# Runs one block of a step: (block, hidden_states, cos, sin, the block's KV caches, metadata)
# -> hidden_states. The default calls the block; `serving.models.compiled` passes one that
# runs the block's compiled code directly.
BlockRunner = Callable[[DecoderBlock, torch.Tensor, torch.Tensor, torch.Tensor,
                        list[torch.Tensor], AttentionMetadata], torch.Tensor]


def call_block(block: DecoderBlock, hidden_states: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, kv_caches: list[torch.Tensor],
               metadata: AttentionMetadata) -> torch.Tensor:
    """The default `BlockRunner`: the block itself (through dynamo where it is compiled)."""
    return block(hidden_states, cos, sin, kv_caches, metadata)


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        arch: ModelArchConfig,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        max_model_len: int | None = None,
        attention_op: AttentionOp = REFERENCE_ATTENTION,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.dtype = dtype
        self.embed_tokens = empty_parameter(
            arch.vocab_size, arch.hidden_size, dtype=dtype, device=device
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(arch, dtype=dtype, device=device, attention_op=attention_op)
            for _ in range(arch.num_hidden_layers)
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype=dtype, device=device)
        self.lm_head = (
            self.embed_tokens
            if arch.tie_word_embeddings
            else empty_parameter(arch.vocab_size, arch.hidden_size, dtype=dtype, device=device)
        )
        self.rotary_emb = RotaryEmbedding(
            arch.rope,
            arch.head_dim,
            max_model_len or arch.max_position_embeddings,
            dtype,
            device,
        )
        self.lm_head_packing = Packing.NONE
        self.lm_head_packed: torch.Tensor | None = None
        self.group_layers(1)

    def group_layers(self, layers_per_block: int) -> None:
        """Run the decoder layers in blocks of `layers_per_block`, which must divide their
        number (so every block has the same code: one compiled graph serves them all)."""
        num_layers = len(self.layers)
        if layers_per_block < 1 or num_layers % layers_per_block:
            raise ValueError(f"{layers_per_block} layers per block do not divide "
                             f"{num_layers} layers")
        # a plain list: the blocks hold the model's own layers, not new parameters
        self.blocks = [DecoderBlock(self.layers[start:start + layers_per_block])
                       for start in range(0, num_layers, layers_per_block)]

    def prepack(self, packing: Packing) -> None:
        """Reorder float weights (projections, LM head) for the kernel `packing` names;
        call after loading, again to change float kernels (`serving.models.linear`; low-bit
        weights repacked for Quiver's kernels keep them)."""
        self.lm_head_packing = effective_packing(self.lm_head, packing)
        self.lm_head_packed = prepack(self.lm_head, self.lm_head_packing)
        for module in self.modules():
            if isinstance(module, Projection):
                module.prepack(packing)

    @contextmanager
    def attention_op_as(self, op: AttentionOp) -> Iterator[None]:
        """Every layer calls `op` for attention inside the block (e.g. while a CUDA graph
        of decode steps is captured), its own op again after it."""
        layers = [layer.self_attn for layer in self.layers]
        previous = [layer.attention_op for layer in layers]
        for layer in layers:
            layer.attention_op = op
        try:
            yield
        finally:
            for layer, layer_op in zip(layers, previous, strict=True):
                layer.attention_op = layer_op

    def kernel_token_splits(self) -> list[int]:
        """Batch sizes (tokens) past which some projection switches kernels."""
        splits = {module.max_kernel_tokens(self.dtype) for module in self.modules()
                  if isinstance(module, Projection)}
        return sorted(split for split in splits if split is not None)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
        *,
        run_block: BlockRunner = call_block,
    ) -> torch.Tensor:
        """Final-normed hidden states `[T, hidden]` of the flat batch `input_ids` `[T]`;
        `run_block` runs each block of layers."""
        hidden_states = F.embedding(input_ids, self.embed_tokens)
        cos, sin = self.rotary_emb.cos_sin(positions)
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"{len(kv_caches)} KV caches for {len(self.layers)} layers")
        start = 0
        for block in self.blocks:
            end = start + len(block.layers)
            hidden_states = run_block(block, hidden_states, cos, sin, kv_caches[start:end],
                                      metadata)
            start = end
        return self.norm(hidden_states)

    def compute_logits(
        self, hidden_states: torch.Tensor, logits_indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Float32 logits `[len(logits_indices), vocab]` (all rows when None)."""
        if logits_indices is not None:
            hidden_states = hidden_states.index_select(0, logits_indices)
        logits = linear(hidden_states, self.lm_head, None, packing=self.lm_head_packing,
                        packed=self.lm_head_packed)
        return logits.float()

    def make_kv_caches(self, num_blocks: int, block_size: int) -> list[torch.Tensor]:
        """Zeroed per-layer caches `[2, num_blocks * block_size, kv_heads, head_dim]`."""
        shape = (2, num_blocks * block_size, self.arch.num_key_value_heads, self.arch.head_dim)
        device = self.embed_tokens.device
        return [
            torch.zeros(shape, dtype=self.dtype, device=device)
            for _ in range(self.arch.num_hidden_layers)
        ]
