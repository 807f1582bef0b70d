"""Measured vs FLOP-ideal speedup of compiled MoD over compiled dense, as a function of capacity (issue 5).

    python benchmarks/capacity_sweep.py [--layers 8 --d-model 256 --seq 512 --batch 2] [--quick]
    python benchmarks/capacity_sweep.py --device cuda --dtype bfloat16 --tag gpu ...   # on a GPU

Reference llama (random weights), fp32 by default, forward in eval mode under no_grad. Dense is compiled once
(`torch.compile(m, fullgraph=True)`); for every capacity, `modfx.transform(dense, capacity=c, every=2,
predictor=False)` (the predictor is off so that only top-k routing is measured) is compiled the same way.
Every variant gets --warmup untimed steps, then --repeat timed steps interleaved across variants (one
round = one step of each), so load drift hits all alike; medians are reported.
Ideal speedup = modfx.flops(dense).total_at / modfx.flops(mod).total_at (forward FLOPs).
Writes <out>/capacity_sweep[_<tag>].json and .png (plot skipped if matplotlib is missing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
from tabulate import tabulate

import modfx
from modfx import cli
from modfx.models import llama

CAPACITIES = (0.05, 0.125, 0.25, 0.5, 0.75, 1.0)


def plot(res: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        cli.log("matplotlib not installed: skipping the plot")
        return False
    rows = res["rows"]
    caps = [r["capacity"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(caps, [r["ideal_speedup"] for r in rows], "o--", label="FLOP-ideal (modfx.flops)")
    ax.plot(caps, [r["speedup"] for r in rows], "s-", label="measured (median, compiled)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("capacity (fraction of tokens through each routed block)")
    ax.set_ylabel("speedup vs dense compiled")
    c = res["config"]
    ax.set_title(f"llama L={c['layers']} d={c['d_model']} S={c['seq']} B={c['batch']} {c['dtype']} {c['device']} fwd, "
                 f"every {c['every']} routed", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--capacities", type=float, nargs="+", default=list(CAPACITIES))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--tag", help="suffix of the output files' names")
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 capacities, 2 timed steps (seconds)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.d_model, args.heads, args.seq, args.batch = 2, 64, 4, 64, 1
        args.capacities, args.repeat, args.warmup = [0.25, 1.0], 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    load_start = os.getloadavg()
    t_start = time.perf_counter()

    torch.manual_seed(0)
    cfg = llama.LlamaConfig(n_layers=args.layers, d_model=args.d_model, n_heads=args.heads,
                            vocab_size=args.vocab, max_seq_len=max(2048, args.seq + 1))
    dense = llama.Llama(cfg).to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    dense_flops = modfx.flops(dense, (ids,)).total_at

    models, info = {"dense": dense}, {}
    for c in args.capacities:
        cli.log(f"transforming capacity {c}")
        t = time.perf_counter()
        m = modfx.transform(dense, (ids,), capacity=c, every=args.every, predictor=False).eval()
        rep = modfx.flops(m, (ids,))
        info[c] = {"k": int(modfx.MoDConfig(capacity=c).k(args.seq)), "flops": rep.total_at, "transform_s": time.perf_counter() - t,
                   "routed_blocks": [b.name for b in modfx.plan(m).routed]}
        models[c] = m

    steps, compile_s = {}, {}
    for name, m in models.items():
        cli.log(f"compiling {name}")
        t = time.perf_counter()
        step = cli.make_step(torch.compile(m, fullgraph=True), ((ids,), {}), False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
            step()
        compile_s[name] = time.perf_counter() - t
        steps[name] = step
    cli.log(f"{args.warmup} warmup + {args.repeat} timed rounds over {len(steps)} variants")
    times = cli.round_robin(steps, args.device, args.warmup, args.repeat)
    med = {n: statistics.median(t) for n, t in times.items()}

    rows = []
    for c in args.capacities:
        ideal = dense_flops / info[c]["flops"]
        speedup = med["dense"] / med[c]
        rows.append({"capacity": c, **info[c], "ideal_speedup": ideal, "median_ms": med[c], "times_ms": times[c],
                     "speedup": speedup, "fraction_of_ideal": speedup / ideal,
                     "speedup_on_min": min(times["dense"]) / min(times[c]), "first_call_s": compile_s[c]})
    res = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/capacity_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {k: v for k, v in vars(args).items()},
        "timed": "forward", "mode": "eval + no_grad", "predictor": False,
        "dense": {"flops": dense_flops, "median_ms": med["dense"], "times_ms": times["dense"],
                  "first_call_s": compile_s["dense"]},
        "rows": rows, "wall_s": time.perf_counter() - t_start, "loadavg_1_5_15min_at_start": load_start,
        "versions": {**cli.versions(), "matplotlib": _mpl_version()},
        "machine": cli.machine(),
    }

    print(f"capacity sweep: llama L={args.layers} d={args.d_model} heads={args.heads} B={args.batch} S={args.seq} "
          f"{args.dtype} {args.device} forward (eval, no_grad), every {args.every} routed, predictor off, "
          f"median of {args.repeat} after {args.warmup} warmup, {torch.get_num_threads()} threads")
    print(f"dense compiled: {dense_flops / 1e9:.3f} GFLOPs, median {med['dense']:.1f} ms "
          f"({min(times['dense']):.1f}-{max(times['dense']):.1f})")
    print(tabulate([(r["capacity"], r["k"], f"{r['flops'] / 1e9:.3f}", f"{r['ideal_speedup']:.2f}x",
                     f"{r['median_ms']:.1f}", f"{min(r['times_ms']):.1f}-{max(r['times_ms']):.1f}",
                     f"{r['speedup']:.2f}x", f"{r['fraction_of_ideal']:.2f}") for r in rows],
                   headers=["capacity", "k", "GFLOPs", "ideal", "median ms", "min-max ms", "measured", "fraction of ideal"],
                   disable_numparse=True))
    print(f"load average (1 min) {load_start[0]:.2f} at start, {res['machine']['loadavg_1_5_15min_at_end'][0]:.2f} at end; "
          f"wall {res['wall_s']:.0f} s")
    stem = "capacity_sweep" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    import json

    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(res, f, indent=2)
    cli.log(f"wrote {os.path.join(args.out, stem + '.json')}")
    png = os.path.join(args.out, stem + ".png")
    if plot(res, png):
        cli.log(f"wrote {png}")
    return 0


def _mpl_version():
    try:
        import matplotlib

        return matplotlib.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
