"""Decode throughput, dense vs MoD, both compiled, with the KV caches of modfx.generate.

    python benchmarks/decode.py                 # 12 layers, d 768, prompt 128, 256 new tokens, batch 1 and 8
    python benchmarks/decode.py --quick         # seconds
    python benchmarks/decode.py --device cuda --dtype bfloat16 --d-model 2048 --heads 16   # on a GPU

The MoD model is the reference llama transformed at capacity 0.125 every other block. Its predictors are
untrained, so each one's output bias is calibrated to select `capacity` of the tokens (what a trained
predictor does, by its BCE target): first by quantile on the prompt and its dense greedy continuation, then
(--rounds, default 2) by bisection, block by block, on the MoD model's own greedy continuation routed by the
predictors (so on the hidden states decoding sees). The calibrated rate is per token; the table gives
the measured rate at which a routed block ran at a decode step (any row selected) and the ideal speedup
at that rate. The dense baseline is the same transformed module with
`dense=True` (every block on every token, same caches, no routing ops). Tokens/s count decode steps only
(prefill and compilation excluded); times are medians over --repeat rounds, dense and MoD interleaved.
"""

import argparse
import json
import platform
import statistics
import sys

import torch
from tabulate import tabulate

import modfx
from modfx import cli
from modfx.models import llama
from modfx.models.common import rope_at


def calibrate(mod, model, ids, capacity):
    """Shift each predictor's bias so it selects `capacity` of the tokens of `ids` at its block."""
    with torch.no_grad():
        x = model.tok_emb(ids)
        cos, sin = rope_at(model.cos, model.sin, ids.shape[1])
        for i, layer in enumerate(model.layers):
            block = mod.get_submodule(f"layers.{i}")
            if hasattr(block, "mod_predictor"):
                logits = block.mod_predictor(x).flatten()
                block.mod_predictor[2].bias -= torch.quantile(logits.float(), 1 - capacity).to(logits.dtype)
            x = layer(x, cos, sin)


def recalibrate(mod, seq, capacity, steps=12, span=4.0):
    """Shift each predictor's bias, block by block in order, by bisection until it selects `capacity` of
    the tokens of `seq` in a full forward routed by the predictors (`routing_stats(...)["selected"]`)."""
    modfx.set_routing(mod, "predictor")
    with torch.no_grad():
        for name in (b.name for b in modfx.plan(mod).routed):
            bias = mod.get_submodule(f"{name}.mod_predictor")[2].bias
            base, lo, hi = bias.clone(), -span, span
            for _ in range(steps):
                mid = (lo + hi) / 2
                bias.copy_(base + mid)
                mod(seq)
                if modfx.routing_stats(mod)[name]["selected"] > capacity:
                    hi = mid
                else:
                    lo = mid
            bias.copy_(base + (lo + hi) / 2)


def decode_seconds(mod, ids, new, repeat, device="cpu"):
    """Seconds of `new - 1` decode steps, dense and MoD: each generate timed whole and with 1 new token
    (the prefill, subtracted), all four interleaved round by round (`cli.round_robin`)."""
    steps = {(v, n): (lambda v=v, n=n: modfx.generate(mod, ids, n, compile=True, dense=v == "dense"))
             for v in ("dense", "mod") for n in (1, new)}
    ms = {k: statistics.median(t) for k, t in cli.round_robin(steps, device, 1, repeat).items()}
    return {v: (ms[v, new] - ms[v, 1]) / 1e3 for v in ("dense", "mod")}


def routed_block_runs(mod, ids, new):
    """Fraction of (decode step, routed block) pairs in which the block ran (any row selected its
    token), counted on an eager generate: the execution rate the measured speedup should be read with."""
    blocks = [b.index for b in modfx.plan(mod).routed]
    calls = []
    handles = [mod.get_submodule(f"modfx_decode_{i}_run").register_forward_pre_hook(lambda *a: calls.append(1))
               for i in blocks]
    modfx.generate(mod, ids, new)
    for h in handles:
        h.remove()
    return len(calls) / ((new - 1) * len(blocks))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, help="grouped-query attention: kv heads (default: --heads)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--capacity", type=float, default=0.125)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="calibration rounds on the MoD's own continuation")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.quick:
        a.layers, a.d_model, a.heads, a.prompt, a.new, a.batch, a.repeat = 4, 64, 4, 16, 8, [1, 2], 1
    torch.manual_seed(0)
    cfg = llama.LlamaConfig(n_layers=a.layers, d_model=a.d_model, n_heads=a.heads, n_kv_heads=a.kv_heads or a.heads,
                            vocab_size=256, max_seq_len=max(2048, a.prompt + a.new))
    model = llama.Llama(cfg).to(device=a.device, dtype=getattr(torch, a.dtype)).eval()
    ideal = 1 / (0.5 + 0.5 * a.capacity)  # every other block routed; a skipped block costs nothing
    rows, record = [], []
    for B in a.batch:
        ids = torch.randint(0, 256, (B, a.prompt)).to(a.device)
        mod = modfx.transform(model, (ids,), capacity=a.capacity, every=2).eval()
        # calibrated on the prompt and its dense greedy continuation: the kind of tokens decoding will see
        calibrate(mod, model, modfx.generate(mod, ids, a.new, dense=True), a.capacity)
        for _ in range(a.rounds):  # then on the hidden states and tokens the MoD decode itself produces
            recalibrate(mod, modfx.generate(mod, ids, a.new)[:1], a.capacity)
        steps = a.new - 1
        print(f"batch {B}: timing dense and MoD decode ...", file=sys.stderr)
        secs = decode_seconds(mod, ids, a.new, a.repeat, a.device)
        dense_s, mod_s = secs["dense"], secs["mod"]
        dense_tps, mod_tps = B * steps / dense_s, B * steps / mod_s
        runs = routed_block_runs(mod, ids, a.new)
        at_rate = 1 / (0.5 + 0.5 * runs)  # blocks executed per step, weights-bound
        rows.append((B, f"{dense_tps:.1f}", f"{mod_tps:.1f}", f"{mod_tps / dense_tps:.2f}x", f"{runs:.3f}",
                     f"{at_rate:.2f}x", f"{ideal:.2f}x"))
        record.append(dict(batch=B, dense_tok_s=dense_tps, mod_tok_s=mod_tps, speedup=mod_tps / dense_tps,
                           routed_block_run_rate=runs, ideal_at_run_rate=at_rate, ideal_at_capacity=ideal))
    print(tabulate(rows, headers=["batch", "dense tok/s", "MoD tok/s", "speedup", "routed blocks run",
                                  "ideal at that rate", "ideal at capacity"]))
    if a.json:
        meta = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.platform(),
                    cpus=torch.get_num_threads(), args=vars(a),
                    gpu=torch.cuda.get_device_name() if a.device == "cuda" else None)
        with open(a.json, "w") as f:
            json.dump(dict(meta=meta, rows=record), f, indent=2)


if __name__ == "__main__":
    main()
