"""Llama style decoder: RoPE, RMSNorm, grouped-query causal attention, SwiGLU MLP, no biases.

Block.forward(x, cos, sin): x [B, S, D]; cos, sin [1, S, head_dim] (or [B, S, head_dim] when explicit
per-sequence positions are given), rotate-half convention. The model keeps cos/sin tables for
max_seq_len as non-persistent buffers and slices (or gathers) them in forward.
"""

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn
from torch import Tensor

from .common import ModelOutput, RMSNorm, RopeAttention, SwiGLU, init_weights, rope_at, rope_tables, swiglu_hidden


@dataclass
class LlamaConfig:
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None = n_heads; fewer = grouped-query attention
    vocab_size: int = 256
    max_seq_len: int = 2048
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    ffn_hidden: Optional[int] = None  # None = swiglu_hidden(d_model)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_hidden is None:
            self.ffn_hidden = swiglu_hidden(self.d_model)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class Block(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.d_model, config.norm_eps)
        self.attn = RopeAttention(config.d_model, config.n_heads, config.n_kv_heads)
        self.norm2 = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.ffn_hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # [B, S, D], [1, S, hd] x2 -> [B, S, D]
        x = x + self.attn(self.norm1(x), cos, sin)
        x = x + self.mlp(self.norm2(x))
        return x


class Llama(nn.Module):
    block = Block  # the MoE model swaps in its own

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList([self.block(config) for _ in range(config.n_layers)])
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        cos, sin = rope_tables(config.max_seq_len, config.head_dim, config.rope_base)
        self.register_buffer("cos", cos, persistent=False)  # [L, hd]
        self.register_buffer("sin", sin, persistent=False)  # [L, hd]
        self.apply(init_weights)

    def forward(self, idx: Tensor, input_pos: Optional[Tensor] = None) -> ModelOutput:
        """idx: [B, S] int64; input_pos: optional absolute positions [S] or [B, S] (default arange(S))."""
        x = self.tok_emb(idx)  # [B, S, D]
        cos, sin = rope_at(self.cos, self.sin, idx.shape[1], input_pos)  # [1 or B, S, hd]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return ModelOutput(logits=self.head(self.norm(x)))  # [B, S, V]
