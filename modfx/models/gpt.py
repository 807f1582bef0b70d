"""GPT-2 style decoder (nanoGPT): learned absolute positions, LayerNorm, causal MHA, 4x GELU MLP.

Block.forward(x) takes only the residual stream [B, S, D]; positions are added once at the embedding.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .common import GeluMLP, ModelOutput, SelfAttention, init_weights


@dataclass
class GPTConfig:
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    vocab_size: int = 256
    max_seq_len: int = 2048
    dropout: float = 0.0


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model)
        self.attn = SelfAttention(config.d_model, config.n_heads, causal=True, dropout=config.dropout)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.mlp = GeluMLP(config.d_model, config.dropout)

    def forward(self, x: Tensor) -> Tensor:  # [B, S, D] -> [B, S, D]
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(init_weights)

    def forward(self, idx: Tensor, input_pos: Optional[Tensor] = None) -> ModelOutput:
        """idx: [B, S] int64; input_pos: optional absolute positions [S] or [B, S] (default arange(S))."""
        S = idx.shape[1]
        if input_pos is None:
            input_pos = torch.arange(S, device=idx.device)  # [S]
        x = self.drop(self.tok_emb(idx) + self.pos_emb(input_pos))  # [B, S, D]
        for layer in self.layers:
            x = layer(x)
        return ModelOutput(logits=self.head(self.norm(x)))  # [B, S, V]
