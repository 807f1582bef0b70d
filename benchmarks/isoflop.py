"""IsoFLOP comparison of dense and Mixture-of-Depths llamas, byte level, on the Python standard library.

    python benchmarks/isoflop.py --quick                 # the whole pipeline in seconds, tiny sizes
    python benchmarks/isoflop.py --d-model 128 --layers 6 --seq 256 --batch 8 --dense-steps 300 --seeds 3

Data: every *.py file under sysconfig's stdlib (site-packages and test folders left out), sorted by path,
every 10th file to validation; bytes are the tokens (vocab 256), so a loss in bits is bits per byte.

Runs (reference llamas; AdamW, linear warmup, cosine decay over each run's own steps, same lr for all).
The training budget F is the dense parent's: `--dense-steps` x its FLOPs per step.
    dense      the parent, n_layers x d_model                               seeds 0..n-1
    mod        modfx.transform(parent): capacity 0.125, every 2nd block,   seeds 0..n-1 (same init as dense)
               predictor on; trained for F FLOPs, i.e. more steps
    mod_deep   MoD with more layers, FLOPs per step ~ the dense parent's; F FLOPs
    ctrl1      dense, narrower, FLOPs per step ~ mod's; as many steps as mod
    ctrl2      dense with only mod's non-routed blocks (n_layers - n_layers // 2), trained from scratch; F FLOPs
    (ctrl2 also: each trained mod evaluated with its routed blocks removed, same weights, eager llama)
FLOPs per step are modfx.flops(model, (x,)).train_at: forward + backward of the model at [batch, seq]
(the loss and the optimizer are not counted). Validation loss is measured at the same training FLOPs
(F * i / n_evals) for every run, on the same fixed validation batches. For MoD also: loss with predictor
routing (modfx.set_routing(mod, "predictor")) and the predictor's accuracy, precision and recall against
top-k membership (modfx.routing_stats after eval forwards in top-k mode), next to always-skip (1 - capacity).

A difference whose seed ranges overlap is called a tie. Writes <out>/isoflop.json, <out>/isoflop.png (when
matplotlib is installed) and <out>/dense_seed0.pt (for benchmarks/convert.py).
"""

import argparse
import hashlib
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import sysconfig
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate

import modfx
from modfx.models import llama

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}


def log(msg):
    print(f"[isoflop {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- data --------------------------------------------------------------------------------------------

def load_corpus(max_files=None):
    """(train bytes, val bytes, info): the stdlib's .py files, sorted, every 10th file to val."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                   if not SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    files = files[:max_files]
    train, val = bytearray(), bytearray()
    for i, f in enumerate(files):
        (val if i % 10 == 9 else train).extend((root / f).read_bytes())
    info = dict(root=str(root), files=len(files), train_bytes=len(train), val_bytes=len(val),
                file_list_sha256=hashlib.sha256("\n".join(files).encode()).hexdigest(),
                content_sha256=hashlib.sha256(bytes(train) + bytes(val)).hexdigest())
    as_tensor = lambda b: torch.frombuffer(b, dtype=torch.uint8).clone()  # noqa: E731
    return as_tensor(train), as_tensor(val), info


def get_batch(data, B, S, gen):
    i = torch.randint(len(data) - S - 1, (B,), generator=gen).tolist()
    xy = torch.stack([data[j:j + S + 1] for j in i]).long()
    return xy[:, :-1], xy[:, 1:]


# --- models and FLOPs --------------------------------------------------------------------------------

def config(args, n_layers, d_model):
    return llama.LlamaConfig(n_layers=n_layers, d_model=d_model, n_heads=args.heads, max_seq_len=args.seq)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def block_costs(report):
    """{"outside", "full", "routed"}: rows (fwd, train FLOPs) of a flops report, one block of each kind."""
    rows = {"outside": next(r for r in report.blocks if r.routed is None)}
    rows["full"] = next(r for r in report.blocks if r.routed is False)
    rows["routed"] = next((r for r in report.blocks if r.routed), None)
    return rows


def per_step(costs, n_layers, routed=()):
    """(train, forward) FLOPs per step of a llama of n_layers such blocks, those in `routed` routed."""
    rows = [costs["outside"]] + [costs["routed"] if i in routed else costs["full"] for i in range(n_layers)]
    return sum(r.train for r in rows), sum(r.fwd for r in rows)


_dense_costs = {}


def dense_flops(args, n_layers, d_model, x):
    """(train, forward) FLOPs per step of a dense llama, from the rows of a 2-layer capture at this width."""
    if d_model not in _dense_costs:
        torch.manual_seed(0)
        _dense_costs[d_model] = block_costs(modfx.flops(llama.Llama(config(args, 2, d_model)), (x,)))
    return per_step(_dense_costs[d_model], n_layers)


def transform(args, model, x):
    return modfx.transform(model, (x,), capacity=args.capacity, every=2, weighting=args.weighting, predictor=True,
                           router_aux_weight=args.router_aux)


# --- training and evaluation -------------------------------------------------------------------------

def lr_at(step, steps, lr):
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def evaluate(model, val_batches):
    """Mean validation loss in bits per byte (and, for MoD in top-k mode, the mean routing stats)."""
    model.eval()
    loss, stats = 0.0, []
    for x, y in val_batches:
        loss += F.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten()).item()
        if hasattr(model, "modfx_plan"):
            stats.append(modfx.routing_stats(model))
    model.train()
    bpb = loss / len(val_batches) / math.log(2)
    if not stats:
        return bpb, None
    names = stats[0][next(iter(stats[0]))].keys()
    per_block = {b: {k: statistics.fmean(s[b][k] for s in stats) for k in names} for b in stats[0]}
    mean = {k: statistics.fmean(v[k] for v in per_block.values()) for k in names}
    return bpb, dict(mean=mean, per_block=per_block)


def train(model, steps, flops_per_step, budget, args, seed, train_data, val_batches, name):
    """Train for `steps`; evaluate at the training FLOPs budget * i / n_evals. Returns the record."""
    gen = torch.Generator().manual_seed(seed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    is_router = lambda n: ".mod_router." in n or ".mod_predictor." in n  # noqa: E731
    groups = [dict(params=[p for n, p in named if is_router(n) == r], mult=m)
              for r, m in ((False, 1.0), (True, getattr(args, "router_lr_mult", 1.0)))]
    params = [p for _, p in named]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    at = {min(steps, max(1, round(budget * i / args.n_evals / flops_per_step))) for i in range(1, args.n_evals + 1)}
    losses, curve, wall = [], [], 0.0
    model.train()
    for step in range(steps):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, args.lr) * g["mult"]
        x, y = get_batch(train_data, args.batch, args.seq, gen)
        loss = F.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        wall += time.perf_counter() - t0
        losses.append(loss.item())
        if step + 1 in at or step + 1 == steps:
            bpb, _ = evaluate(model, val_batches)
            curve.append(dict(step=step + 1, train_flops=(step + 1) * flops_per_step, val_bpb=bpb))
            log(f"{name}: step {step + 1}/{steps}, train loss {loss.item():.3f}, val {bpb:.4f} bpb, {wall:.0f} s")
    return dict(name=name, seed=seed, params=n_params(model), flops_per_step=flops_per_step, steps=steps,
                train_flops=steps * flops_per_step, wall_s=wall, train_loss=losses, curve=curve,
                val_bpb=curve[-1]["val_bpb"])


def mod_figures(mod, cfg, val_batches):
    """Top-k and predictor-routed loss, predictor accuracy/precision/recall, and the loss with the routed
    blocks removed (a plain llama on the same weights, routed layers dropped)."""
    bpb_topk, stats = evaluate(mod, val_batches)
    modfx.set_routing(mod, "predictor")
    bpb_pred, pstats = evaluate(mod, val_batches)
    modfx.set_routing(mod, "topk")
    routed = {b.index for b in modfx.plan(mod).routed}
    plain = llama.Llama(cfg)
    missing, _ = plain.load_state_dict({k: v for k, v in mod.state_dict().items() if ".mod_" not in k}, strict=False)
    assert not missing, missing
    plain.layers = torch.nn.ModuleList(layer for i, layer in enumerate(plain.layers) if i not in routed)
    bpb_removed, _ = evaluate(plain, val_batches)
    return dict(bpb_topk=bpb_topk, bpb_predictor=bpb_pred, bpb_routed_removed=bpb_removed,
                predictor_vs_topk=bpb_pred / bpb_topk - 1, predictor_accuracy=stats["mean"]["accuracy"],
                predictor_precision=stats["mean"]["precision"], predictor_recall=stats["mean"]["recall"],
                predictor_selected_topk_mode=stats["mean"]["selected"],
                predictor_selected=pstats["mean"]["selected"], always_skip_accuracy=1 - mod.modfx_config.capacity,
                per_block=stats["per_block"])


# --- report ------------------------------------------------------------------------------------------

def spread(v):
    if len(v) == 1:
        return f"{v[0]:.4f}"
    return f"{statistics.fmean(v):.4f} ± {statistics.stdev(v):.4f} [{min(v):.4f}, {max(v):.4f}]"


def verdict(a, ref):
    """Lower is better; a tie when the seed ranges overlap."""
    if any(math.isnan(v) for v in ref):
        return "-"
    if max(a) < min(ref):
        return "lower"
    if min(a) > max(ref):
        return "higher"
    return "tie"


def summarize(runs, dense_fwd):
    groups = {}
    for r in runs:
        groups.setdefault(r["name"], []).append(r)
    ref = [r["val_bpb"] for r in groups.get("dense", [])] or [math.nan]
    rows = []
    for name, rs in groups.items():
        bpb = [r["val_bpb"] for r in rs]
        rows.append(dict(run=name, seeds=len(rs), params=rs[0]["params"], flops_per_step=rs[0]["flops_per_step"],
                         fwd_fraction=rs[0]["fwd_flops"] / dense_fwd, steps=rs[0]["steps"],
                         train_flops=rs[0]["train_flops"], wall_s=statistics.fmean(r["wall_s"] for r in rs),
                         val_bpb=bpb, val_bpb_mean=statistics.fmean(bpb),
                         delta_vs_dense=statistics.fmean(bpb) - statistics.fmean(ref),
                         vs_dense="-" if name == "dense" else verdict(bpb, ref)))
    mods = [r for r in runs if "mod" in r]
    removed = [r["mod"]["bpb_routed_removed"] for r in runs if r["name"] == "mod"]
    if removed:
        rows.append(dict(run="ctrl2 (mod, routed blocks removed)", seeds=len(removed), params=None,
                         flops_per_step=None, fwd_fraction=None, steps=None, train_flops=None, wall_s=None,
                         val_bpb=removed, val_bpb_mean=statistics.fmean(removed),
                         delta_vs_dense=statistics.fmean(removed) - statistics.fmean(ref), vs_dense=verdict(removed, ref)))
    return rows, mods


def print_tables(rows, mods):
    print(tabulate([(r["run"], r["seeds"], r["params"], f"{r['flops_per_step'] / 1e9:.3f}" if r["flops_per_step"] else "",
                     f"{r['fwd_fraction']:.3f}" if r["fwd_fraction"] else "", r["steps"] or "",
                     f"{r['train_flops'] / 1e12:.2f}" if r["train_flops"] else "",
                     f"{r['wall_s']:.0f}" if r["wall_s"] is not None else "", spread(r["val_bpb"]),
                     f"{r['delta_vs_dense']:+.4f}", r["vs_dense"]) for r in rows],
                   headers=["run", "seeds", "params", "GFLOPs/step", "fwd vs dense", "steps", "train TFLOPs",
                            "wall s", "val bpb (mean ± sd [min, max])", "Δ vs dense", "vs dense"]))
    keys = ("bpb_topk", "bpb_predictor", "predictor_vs_topk", "predictor_accuracy", "always_skip_accuracy",
            "predictor_precision", "predictor_recall", "predictor_selected", "bpb_routed_removed")
    print(tabulate([(f"{r['name']} s{r['seed']}", *(r["mod"][k] for k in keys)) for r in mods],
                   headers=["run", "bpb top-k", "bpb predictor", "pred/top-k - 1", "pred acc", "always-skip acc",
                            "precision", "recall", "pred selected", "bpb routed removed"], floatfmt=".4f"))


def plot(runs, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = {}
    for r in runs:
        c = colors.setdefault(r["name"], f"C{len(colors)}")
        f = [p["train_flops"] for p in r["curve"]]
        b = [p["val_bpb"] for p in r["curve"]]
        ax.plot(f, b, "o-", color=c, alpha=0.8, ms=3, label=r["name"] if r["seed"] == 0 else None)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (fwd + bwd, modfx.flops)")
    ax.set_ylabel("validation loss (bits per byte)")
    ax.set_title("dense vs MoD llama at equal training FLOPs (byte-level, Python stdlib)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


# --- main --------------------------------------------------------------------------------------------

def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, whole pipeline in seconds")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dense-steps", type=int, default=300, help="the dense parent's steps; sets the FLOP budget")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--capacity", type=float, default=0.125)
    ap.add_argument("--weighting", default="raw", choices=modfx.config.WEIGHTINGS)
    ap.add_argument("--router-lr-mult", type=float, default=1.0, help="lr multiplier of routers and predictors")
    ap.add_argument("--router-aux", type=float, default=0.0,
                    help="router_aux_weight: BCE of the router score vs top-k membership (0: off)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the dense-vs-mod pair")
    ap.add_argument("--control-seeds", type=int, default=1, help="seeds of mod_deep, ctrl1, ctrl2")
    ap.add_argument("--runs", default="dense,mod,mod_deep,ctrl1,ctrl2")
    ap.add_argument("--val-batches", type=int, default=16)
    ap.add_argument("--n-evals", type=int, default=4, help="validation points along the FLOP axis")
    ap.add_argument("--max-files", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 because on a shared CPU a descheduled OpenMP thread stalls every op")
    ap.add_argument("--out", default="out/isoflop")
    args = ap.parse_args(argv)
    if args.quick:
        args.d_model, args.heads, args.layers, args.seq, args.batch = 32, 2, 2, 64, 4
        args.dense_steps, args.seeds, args.val_batches, args.n_evals, args.max_files = 40, 2, 2, 2, 60
    return args


def main(argv=None):
    args = parse(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    train_data, val_data, corpus = load_corpus(args.max_files)
    print(f"corpus: {corpus['files']} files under {corpus['root']}, {corpus['train_bytes']:,} train bytes, "
          f"{corpus['val_bytes']:,} val bytes, file list sha256 {corpus['file_list_sha256'][:16]}, "
          f"content sha256 {corpus['content_sha256'][:16]}")
    vgen = torch.Generator().manual_seed(1234)
    val_batches = [get_batch(val_data, args.batch, args.seq, vgen) for _ in range(args.val_batches)]
    x = val_batches[0][0]
    wanted = set(args.runs.split(","))
    L, d = args.layers, args.d_model

    # FLOPs per step of every run, and the budget
    torch.manual_seed(0)
    parent0 = llama.Llama(config(args, L, d))
    mod0 = transform(args, parent0, x)  # seed 0's pair; also the probe for the routed block's cost
    costs = block_costs(modfx.flops(mod0, (x,)))
    routed = {b.index for b in modfx.plan(mod0).routed}
    f_dense, dense_fwd = dense_flops(args, L, d, x)
    f_mod = modfx.flops(mod0, (x,)).train_at
    budget = args.dense_steps * f_dense
    steps_of = lambda f: max(1, round(budget / f))  # noqa: E731
    odd = lambda n: {i for i in range(n) if i % 2 == 1}  # noqa: E731  the blocks every=2 routes
    # mod_deep: the even depth whose MoD FLOPs per step are nearest the dense parent's
    deep = min(range(L + 2, 4 * L + 1, 2), key=lambda n: abs(per_step(costs, n, odd(n))[0] - f_dense))
    # ctrl1: of the two widths (multiples of 2 * heads) around d * sqrt(mod / dense), the one nearest mod's FLOPs
    step = 2 * args.heads
    guess = int(d * math.sqrt(f_mod / f_dense)) // step * step
    narrow = min((guess, guess + step), key=lambda w: abs(dense_flops(args, L, w, x)[0] - f_mod))
    n_kept = L - len(routed)
    print(f"budget: {args.dense_steps} dense steps x {f_dense / 1e9:.3f} GFLOPs = {budget / 1e12:.3f} TFLOPs; "
          f"mod {f_mod / 1e9:.3f} GFLOPs/step; mod_deep {deep} layers; ctrl1 d_model {narrow}; ctrl2 {n_kept} layers")

    runs = []

    def run(name, model, fwd_train, seed, n_steps=None, cfg=None):
        train_f, fwd = fwd_train
        rec = train(model, n_steps or steps_of(train_f), train_f, budget, args, seed, train_data, val_batches, name)
        rec["fwd_flops"] = fwd
        if cfg is not None:
            rec["mod"] = mod_figures(model, cfg, val_batches)
        runs.append(rec)

    for seed in range(args.seeds):
        if seed == 0:
            parent, mod = parent0, mod0
        else:
            torch.manual_seed(seed)
            parent = llama.Llama(config(args, L, d))
            mod = transform(args, parent, x)  # same initial weights as the dense run of this seed
        if "dense" in wanted:
            run("dense", parent, (f_dense, dense_fwd), seed)
            if seed == 0:
                torch.save(dict(config=vars(config(args, L, d)), state_dict=parent.state_dict(), args=vars(args)),
                           out / "dense_seed0.pt")
        if "mod" in wanted:
            rep = modfx.flops(mod, (x,))
            run("mod", mod, (rep.train_at, rep.total_at), seed, cfg=config(args, L, d))
    for seed in range(args.control_seeds):
        torch.manual_seed(seed)
        if "mod_deep" in wanted:
            mod = transform(args, llama.Llama(config(args, deep, d)), x)
            rep = modfx.flops(mod, (x,))
            run("mod_deep", mod, (rep.train_at, rep.total_at), seed, cfg=config(args, deep, d))
        if "ctrl1" in wanted:  # as many steps as mod
            run("ctrl1", llama.Llama(config(args, L, narrow)), dense_flops(args, L, narrow, x), seed, steps_of(f_mod))
        if "ctrl2" in wanted:
            run("ctrl2", llama.Llama(config(args, n_kept, d)), dense_flops(args, n_kept, d, x), seed)

    rows, mods = summarize(runs, dense_fwd)
    print_tables(rows, mods)
    png = plot(runs, out / "isoflop.png")
    result = dict(
        args=vars(args), corpus=corpus, budget_train_flops=budget, mod_deep_layers=deep, ctrl1_d_model=narrow,
        ctrl2_layers=n_kept, summary=rows, runs=runs, plot=png, total_wall_s=time.perf_counter() - t_start,
        versions=dict(python=platform.python_version(), torch=torch.__version__, modfx=modfx.__version__),
        machine=dict(platform=platform.platform(), cpu=_cpu_name(), threads=torch.get_num_threads(), cores=os.cpu_count()),
    )
    (out / "isoflop.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'isoflop.json'}" + (f" and {png}" if png else "") + f"; {result['total_wall_s']:.0f} s in all")
    return result


def _cpu_name():
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
