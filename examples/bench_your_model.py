"""Benchmark your own model: any nn.Module torch.export can capture, with repeated residual blocks.

    python examples/bench_your_model.py [--quick]
"""

import argparse
import statistics
import time

import torch
from torch import nn

import modfx


class Block(nn.Module):  # yours: whatever a block is, as long as it is x -> x + something(x)
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(x)


class MyModel(nn.Module):
    def __init__(self, d=128, n=6, vocab=1000):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.out = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.out(x)


def median_ms(f, x, n=5):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f(x)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    model = MyModel(d=64, n=4) if a.quick else MyModel()
    ids = torch.randint(0, 1000, (2, 64 if a.quick else 512))
    mod = modfx.transform(model.eval(), (ids,), capacity=0.125).eval()
    print(modfx.plan(mod))
    with torch.no_grad():
        dense, routed = torch.compile(model, fullgraph=True), torch.compile(mod, fullgraph=True)
        dense(ids), routed(ids)
        d_ms, m_ms = median_ms(dense, ids), median_ms(routed, ids)
    print(f"compiled dense {d_ms:.1f} ms, compiled MoD {m_ms:.1f} ms: {d_ms / m_ms:.2f}x (medians, same run)")


if __name__ == "__main__":
    main()
