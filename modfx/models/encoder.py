"""BERT/ViT style bidirectional encoder: a learned CLS token, learned positions, pre-norm blocks with
non-causal masked attention, LayerNorm, 4x GELU MLP.

The CLS token is prepended inside forward, so for S input tokens the blocks see S+1 positions
(pos_emb therefore has max_seq_len + 1 rows). Block.forward(x, mask): x [B, S+1, D]; mask a bool
key-padding mask [B, 1, 1, S+1] (True = attend; CLS is always True), always a real tensor.

logits is the head applied to every position, CLS included: [B, S+1, vocab_size], or
[B, S+1, n_classes] when n_classes is set (then logits[:, 0] is the CLS classification).
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .common import GeluMLP, ModelOutput, SelfAttention, init_weights


@dataclass
class EncoderConfig:
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    vocab_size: int = 256
    max_seq_len: int = 2048  # input tokens, CLS not counted
    dropout: float = 0.0
    n_classes: Optional[int] = None  # None = head over the vocabulary


class Block(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model)
        self.attn = SelfAttention(config.d_model, config.n_heads, causal=False, dropout=config.dropout)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.mlp = GeluMLP(config.d_model, config.dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # [B, S+1, D], [B, 1, 1, S+1] -> [B, S+1, D]
        x = x + self.attn(self.norm1(x), mask)
        x = x + self.mlp(self.norm2(x))
        return x


class Encoder(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len + 1, config.d_model)
        self.cls = nn.Parameter(torch.zeros(1, 1, config.d_model))
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.n_classes or config.vocab_size)
        self.apply(init_weights)
        nn.init.normal_(self.cls, mean=0.0, std=0.02)

    def forward(self, idx: Tensor, padding_mask: Optional[Tensor] = None) -> ModelOutput:
        """idx: [B, S] int64; padding_mask: optional bool [B, S], True = real token (None = all real)."""
        B, S = idx.shape
        x = torch.cat([self.cls.expand(B, 1, -1), self.tok_emb(idx)], dim=1)  # [B, S+1, D]
        x = self.drop(x + self.pos_emb(torch.arange(S + 1, device=idx.device)))  # [B, S+1, D]
        keep = torch.ones(B, S + 1, dtype=torch.bool, device=idx.device)  # [B, S+1]
        if padding_mask is not None:
            keep = torch.cat([keep[:, :1], padding_mask.to(torch.bool)], dim=1)  # CLS always attends
        mask = keep[:, None, None, :]  # [B, 1, 1, S+1]
        for layer in self.layers:
            x = layer(x, mask)
        return ModelOutput(logits=self.head(self.norm(x)))  # [B, S+1, V or n_classes]
