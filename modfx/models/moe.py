"""Llama style decoder whose MLP is a top-k mixture of SwiGLU experts.

Block.forward(x, cos, sin) exactly as in llama.py. The router is dense and static-shaped: every
expert runs on every token and the outputs are combined with a [B, S, n_experts] weight tensor that
is zero outside each token's top-k experts. This wastes (n_experts / top_k)x MLP FLOPs but has no
data-dependent shapes, so it exports and compiles with a dynamic sequence length.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import llama
from .common import SwiGLU


@dataclass
class MoEConfig(llama.LlamaConfig):
    """LlamaConfig plus the experts; ffn_hidden is per expert."""

    n_experts: int = 4
    top_k_experts: int = 2

    def __post_init__(self):
        super().__post_init__()
        assert 1 <= self.top_k_experts <= self.n_experts


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


class Block(llama.Block):
    """llama's block with the MLP replaced by the mixture of experts."""

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.mlp = MoEMLP(config)


class MoE(llama.Llama):
    block = Block
