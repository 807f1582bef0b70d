"""Train a reference llama with Mixture-of-Depths on local text (the Python standard library's own
source, byte level), then sample from it with the predictor and KV caches.

    python examples/train_llama.py [--quick]
"""

import argparse
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import modfx
from modfx.models import llama


def stdlib_bytes(limit: int) -> torch.Tensor:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    data = b"".join(f.read_bytes() for f in files)[:limit]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    steps, seq, batch, d, layers = (20, 32, 8, 32, 4) if a.quick else (400, 256, 16, 128, 6)
    torch.manual_seed(0)
    data = stdlib_bytes(2_000_000)
    model = llama.Llama(llama.LlamaConfig(n_layers=layers, d_model=d, n_heads=4, vocab_size=256))
    batch_of = lambda: torch.stack([data[i : i + seq + 1] for i in torch.randint(0, len(data) - seq - 1, (batch,))])
    mod = modfx.transform(model, (batch_of()[:, :-1],), capacity=0.125, every=2)
    print(modfx.plan(mod))
    opt = torch.optim.AdamW(mod.parameters(), lr=3e-3)
    mod.train()
    t = time.time()
    for step in range(steps):
        xy = batch_of()
        loss = F.cross_entropy(mod(xy[:, :-1]).logits.flatten(0, 1), xy[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()  # the predictors' BCE loss is injected here too
        opt.step()
        if step % max(steps // 5, 1) == 0 or step == steps - 1:
            acc = modfx.routing_stats(mod)["layers.1"]["accuracy"]
            print(f"step {step:4d}  loss {loss.item():.3f}  predictor accuracy (layers.1) {acc:.3f}  {time.time() - t:.0f}s")
    mod.eval()
    prompt = data[:32][None]
    out = modfx.generate(mod, prompt, 48, temperature=0.8, top_k=20)
    print(bytes(out[0].tolist()).decode("utf-8", errors="replace"))


if __name__ == "__main__":
    main()
