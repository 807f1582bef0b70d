"""Routing overhead of one routed block, with modfx's own graphs compiled by Inductor.

    python benchmarks/bench_routing.py [--d-model 512 --seq 1024 --batch 4 --capacity 0.125] [--backward]

Reference llamas at the target's width, all compiled with `torch.compile(m, fullgraph=True)`:
    dense1   1 layer                       embedding + block 0 + head
    dense2   2 layers                      + block 1 on all S tokens
    mod      2 layers, block 1 routed at k = ceil(capacity * S)
    mod_k2   2 layers, block 1 routed at k = 2 (the block itself ~ free: what is left is routing)
    mod_k2np the same without the predictor branch
(k = 2, not 1: a transform whose example gives k = 1 fails in modfx's FLOP check, see RESULTS.md.)
Differences against dense1 give one block's cost: full, routed at k, and routing ops alone (router,
sort, gather, scatter, with and without the predictor MLP). The ideal routed block is the full block's
time scaled by the FLOP ratio (block at k without routing ops / full block), from modfx.flops.
Times are medians over interleaved rounds.
"""

import argparse
import statistics
import sys

import torch
from tabulate import tabulate

import modfx
from modfx import cli
from modfx.models import llama


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--capacity", type=float, default=0.125)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--backward", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(0)
    ids = torch.randint(0, 256, (args.batch, args.seq))
    cfg = lambda n: llama.LlamaConfig(n_layers=n, d_model=args.d_model, n_heads=args.heads,  # noqa: E731
                                      max_seq_len=max(2048, args.seq))
    dense1, dense2 = llama.Llama(cfg(1)).eval(), llama.Llama(cfg(2)).eval()
    models = {"dense1": dense1, "dense2": dense2}
    for name, cap, pred in (("mod", args.capacity, True), ("mod_k2", 2 / args.seq, True), ("mod_k2np", 2 / args.seq, False)):
        cli.log(f"transforming {name}")
        models[name] = modfx.transform(dense2, (ids,), capacity=cap, every=2, predictor=pred).eval()
    for m in models.values():
        m.train(args.backward)

    pick = (lambda r: r.train) if args.backward else (lambda r: r.fwd)
    block1 = lambda rep: pick(next(r for r in rep.blocks if r.name == "layers.1"))  # noqa: E731
    rep_m, rep_k2 = modfx.flops(models["mod"], (ids,)), modfx.flops(models["mod_k2"], (ids,))
    full_flops = block1(modfx.flops(dense2, (ids,)))
    k_flops = block1(rep_m) - pick(rep_m.overhead)  # the block's own ops on k tokens
    k2_flops = block1(rep_k2) - pick(rep_k2.overhead)

    steps = {}
    for name, m in models.items():
        cli.log(f"compiling {name}")
        steps[name] = cli.make_step(torch.compile(m, fullgraph=True), ids, args.backward)
        steps[name]()
    cli.log(f"{args.warmup} warmup + {args.repeat} timed rounds")
    for s in steps.values():
        for _ in range(args.warmup):
            s()
    times = {n: [] for n in steps}
    for _ in range(args.repeat):
        for n, s in steps.items():
            times[n] += cli.time_ms(s, "cpu", 1)
    med = {n: statistics.median(t) for n, t in times.items()}

    kind = "fwd+bwd" if args.backward else "forward"
    print(f"routing overhead, one block: llama d={args.d_model} B={args.batch} S={args.seq} fp32, {kind}, "
          f"capacity {args.capacity} (k={modfx.MoDConfig(capacity=args.capacity).k(args.seq)}), "
          f"{torch.get_num_threads()} threads, median of {args.repeat}")
    print(tabulate([(n, f"{med[n]:.1f}", f"{min(t):.1f}-{max(t):.1f}") for n, t in times.items()],
                   headers=["compiled model", "median ms", "min-max ms"], disable_numparse=True))
    full = med["dense2"] - med["dense1"]
    rows = [
        ("full block, S tokens (dense2 - dense1)", full, f"{full_flops / 1e9:.3f}"),
        ("routed block at k (mod - dense1)", med["mod"] - med["dense1"], f"{block1(rep_m) / 1e9:.3f}"),
        ("ideal routed block (full x FLOP ratio)", full * k_flops / full_flops, f"{k_flops / 1e9:.3f}"),
        ("routing ops + predictor (mod_k2 - dense1 - ideal block at 2)", med["mod_k2"] - med["dense1"] - full * k2_flops / full_flops,
         f"{pick(rep_m.overhead) / 1e9:.3f}"),
        ("routing ops, no predictor (mod_k2np - dense1 - ideal block at 2)",
         med["mod_k2np"] - med["dense1"] - full * k2_flops / full_flops, ""),
    ]
    print()
    print(tabulate([(n, f"{v:.1f}", f"{100 * v / full:.0f}%", g) for n, v, g in rows],
                   headers=["one block", "ms", "% of full block", f"GFLOPs ({kind})"], disable_numparse=True))


if __name__ == "__main__":
    sys.exit(main())
