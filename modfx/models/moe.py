"""Llama style decoder whose MLP is a top-k mixture of SwiGLU experts.

Block.forward(x, cos, sin) exactly as in llama.py. The router is dense and static-shaped: every
expert runs on every token and the outputs are combined with a [B, S, n_experts] weight tensor that
is zero outside each token's top-k experts. This wastes (n_experts / top_k)x MLP FLOPs but has no
data-dependent shapes, so it exports and compiles with a dynamic sequence length.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .common import ModelOutput, RMSNorm, RopeAttention, SwiGLU, init_weights, rope_at, rope_tables, swiglu_hidden


@dataclass
class MoEConfig:
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None = n_heads; fewer = grouped-query attention
    vocab_size: int = 256
    max_seq_len: int = 2048
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    ffn_hidden: Optional[int] = None  # per expert; None = swiglu_hidden(d_model)
    n_experts: int = 4
    top_k_experts: int = 2

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_hidden is None:
            self.ffn_hidden = swiglu_hidden(self.d_model)
        assert 1 <= self.top_k_experts <= self.n_experts

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class MoEMLP(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.top_k = config.top_k_experts
        self.gate = nn.Linear(config.d_model, config.n_experts, bias=False)
        self.experts = nn.ModuleList([SwiGLU(config.d_model, config.ffn_hidden) for _ in range(config.n_experts)])

    def forward(self, x: Tensor) -> Tensor:  # [B, S, D] -> [B, S, D]
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # [B, S, E]
        top_w, top_i = probs.topk(self.top_k, dim=-1)  # [B, S, k]
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)  # renormalise over the chosen k
        w = torch.zeros_like(probs).scatter(-1, top_i, top_w).to(x.dtype)  # [B, S, E], zero outside top-k
        ys = torch.stack([expert(x) for expert in self.experts], dim=-1)  # [B, S, D, E]
        return (ys * w.unsqueeze(-2)).sum(dim=-1)  # [B, S, D]


class Block(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.d_model, config.norm_eps)
        self.attn = RopeAttention(config.d_model, config.n_heads, config.n_kv_heads)
        self.norm2 = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MoEMLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # [B, S, D], [1, S, hd] x2 -> [B, S, D]
        x = x + self.attn(self.norm1(x), cos, sin)
        x = x + self.mlp(self.norm2(x))
        return x


class MoE(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
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
