"""Small pieces shared by the reference models: the output type, norms, MLPs, attention, RoPE, init."""

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class ModelOutput(NamedTuple):
    logits: Tensor  # [B, S, V] (encoder: [B, S+1, V or n_classes])


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


def swiglu_hidden(d_model: int, multiple_of: int = 32) -> int:
    """Default SwiGLU width: 8/3 * d (same parameter count as a 4x GELU MLP), rounded up."""
    return find_multiple(8 * d_model // 3, multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.type_as(x) * self.weight


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases (llama / moe experts)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nn.Module):
    """fc -> GELU -> proj with a 4x hidden width and biases (gpt / encoder)."""

    def __init__(self, d_model: int, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and biases (gpt / encoder).

    causal=True uses is_causal; otherwise an optional attn_mask (bool, True = attend) is passed to SDPA.
    """

    def __init__(self, d_model: int, n_heads: int, causal: bool, dropout: float = 0.0):
        super().__init__()
        assert d_model % n_heads == 0
        self.n_heads, self.causal, self.dropout = n_heads, causal, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        # unflatten/flatten instead of view(B, S, ...): the block's graph then never reads B or S
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x [B, S, D]
        q, k, v = (t.unflatten(-1, (self.n_heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B, H, S, hd]
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=self.causal)
        y = y.transpose(1, 2).flatten(-2)  # [B, S, D]
        return self.drop(self.proj(y))


# --- RoPE (rotate-half convention, as in HF Llama) ---

def rope_tables(max_seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos, sin tables, each [max_seq_len, head_dim] (the two halves repeat the same frequencies)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # [hd/2]
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # [L, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [L, hd]
    return emb.cos(), emb.sin()


def rope_at(cos: Tensor, sin: Tensor, S: int, input_pos: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Per-token cos/sin for the blocks: [1, S, hd] (input_pos None or [S]) or [B, S, hd] (input_pos [B, S])."""
    if input_pos is None:
        return cos[:S].unsqueeze(0), sin[:S].unsqueeze(0)
    cos, sin = cos[input_pos], sin[input_pos]  # [S, hd] or [B, S, hd]
    if input_pos.dim() == 1:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    return cos, sin


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, S, hd]; cos, sin: [1 or B, S, hd] (broadcast over heads here; same dtype as x)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [1 or B, 1, S, hd]
    return x * cos + rotate_half(x) * sin


class RopeAttention(nn.Module):
    """Causal attention with RoPE and grouped-query heads (n_kv_heads <= n_heads), no biases (llama / moe).

    Like SelfAttention it reshapes with unflatten/flatten, so the graph never reads B or S.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        assert d_model % n_heads == 0 and n_heads % n_kv_heads == 0
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d_model // n_heads
        self.wq = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        q = self.wq(x).unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)  # [B, H, S, hd]
        k = self.wk(x).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)  # [B, KV, S, hd]
        v = self.wv(x).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)  # [B, KV, S, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:  # GQA: repeat each kv head for its group of query heads
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # [B, H, S, hd]
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, S, hd]
        return self.wo(y.transpose(1, 2).flatten(-2))  # [B, S, D]


def init_weights(module: nn.Module) -> None:
    """normal(0, 0.02) for Linear/Embedding weights, zeros for biases (use with model.apply)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
