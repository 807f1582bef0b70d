"""Routing overhead of one routed block, with modfx's own graphs compiled by Inductor.

    python benchmarks/bench_routing.py [--d-model 512 --seq 1024 --batch 4 --capacity 0.125] [--backward]
    python benchmarks/bench_routing.py --device cuda --dtype bfloat16 --d-model 2048 --heads 16 --seq 4096 --batch 8 --ops

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

--ops adds a per-op breakdown: each routing op of one block, compiled on its own
(`torch.compile(fn, fullgraph=True)`) at the block's shapes, timed in isolation (median of --op-repeat),
forward or, with --backward, forward + backward: the router over S (ranking only; the routing without the
predictor), top-k over int64 keys (score bits, position) + index sort, gather of RoPE cos, sin, the router
on the k chosen tokens (passes/rescore.py), the chosen rows of x and the merge timed together (x -> x_k -> delta = x_k * u ->
merged x; their backwards meet in x's gradient): `split_tokens` + `index_put` (passes/route_topk.py), and
the router over S with the predictor's first layer as one [D, 1 + h] GEMM, then the rest of the predictor
MLP (its h -> 1 layer a weighted sum), target scatter and BCE (passes/fuse_scores.py; the routing with the
predictor). For comparison,
the earlier formulations: the predictor as its own GEMM next to the router's (before commit 843a86c), one GEMM
at h = 16 (17 columns), gather + scatter_add (before commit b475f86), gather + scatter of x_k + delta, and
the router over S with gradient, then a gather of r (both before 2026-12-04), and the stable sort of
[B, S] + slice that chose the k tokens and the predictor's h -> 1 layer as a GEMM, both before 2026-12-05.
In the real graph Inductor fuses some of these with their neighbours (in eval, the merge is written in
place by the kernel that computes x), so the sum is an upper estimate, not a measurement of the block.
The "in context" column times the ops that read or write the residual stream where they sit in the
model: x produced by a residual add, kept, and read next by an RMSNorm, minus that context alone, in
interleaved rounds (so fusion with both neighbours counts; small differences of noisy medians).
"""

import argparse
import statistics
import sys

import torch
from tabulate import tabulate

import modfx
from modfx import cli
from modfx.config import predictor_width
from modfx.models import llama
from modfx.passes.route_topk import split_tokens


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
    ap.add_argument("--ops", action="store_true", help="also time each routing op alone")
    ap.add_argument("--op-repeat", type=int, default=30)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = ap.parse_args()
    args.to = lambda t: t.to(args.device, getattr(torch, args.dtype) if t.is_floating_point() else t.dtype)

    torch.manual_seed(0)
    ids = torch.randint(0, 256, (args.batch, args.seq)).to(args.device)
    cfg = lambda n: llama.LlamaConfig(n_layers=n, d_model=args.d_model, n_heads=args.heads,  # noqa: E731
                                      max_seq_len=max(2048, args.seq))
    place = {"device": args.device, "dtype": getattr(torch, args.dtype)}
    dense1, dense2 = llama.Llama(cfg(1)).to(**place).eval(), llama.Llama(cfg(2)).to(**place).eval()
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
        steps[name] = cli.make_step(torch.compile(m, fullgraph=True), ((ids,), {}), args.backward)
        steps[name]()
    cli.log(f"{args.warmup} warmup + {args.repeat} timed rounds")
    times = cli.round_robin(steps, args.device, args.warmup, args.repeat)
    med = {n: statistics.median(t) for n, t in times.items()}

    kind = "fwd+bwd" if args.backward else "forward"
    print(f"routing overhead, one block: llama d={args.d_model} B={args.batch} S={args.seq} {args.dtype} {args.device}, {kind}, "
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
    if args.ops:
        ops_breakdown(args, full, med["mod"] - med["dense1"], full * k_flops / full_flops)


def ops_breakdown(args, full_ms: float, routed_ms: float, ideal_ms: float) -> None:
    """Each routing op of one routed block alone, compiled, at [B, S, D] / k (see the docstring); with
    --backward each op's forward + backward (autograd.grad with a fixed upstream gradient)."""
    B, S, D = args.batch, args.seq, args.d_model
    hd, k, h = D // args.heads, modfx.MoDConfig(capacity=args.capacity).k(args.seq), predictor_width(D)
    g = torch.Generator().manual_seed(0)
    x, cos, sin = torch.randn(B, S, D, generator=g), torch.randn(1, S, hd, generator=g), torch.randn(1, S, hd, generator=g)
    w = torch.randn(1, D, generator=g) / D ** 0.5
    r = torch.nn.functional.linear(x, w)
    idx = torch.sort(torch.sort(r.squeeze(-1), dim=1, descending=True, stable=True)[1][:, :k], dim=1)[0]
    xg, upd = torch.randn(B, k, D, generator=g), torch.randn(B, k, D, generator=g)

    def predictor_weights(n):  # Linear(D, n) -> GELU -> Linear(n, 1)
        return tuple(map(args.to, (torch.randn(n, D, generator=g) / D ** 0.5, torch.zeros(n),
                                   torch.randn(1, n, generator=g) / n ** 0.5, torch.zeros(1))))

    w1, b1, w2, b2 = predictor_weights(h)
    x, cos, sin, w, r, idx, xg, upd = map(args.to, (x, cos, sin, w, r, idx, xg, upd))
    wide = predictor_weights(h + 1)
    F = torch.nn.functional
    grad = args.backward

    def router(x, w):
        return F.linear(x, w)

    def router_rank(x, w):  # the score over S only ranks: no gradient
        return F.linear(x, w).detach()

    def topk(r):  # passes/route_topk.py: one int64 key per token, score bits above the reversed position
        f = r.squeeze(-1).float()
        bits = f.view(torch.int32).masked_fill(f == 0, 0)
        key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long() * 2**32 + torch.arange(S - 1, -1, -1, device=r.device)
        return torch.sort(torch.topk(key, k, 1, True, False)[1], dim=1)[0]

    def sort(r):  # before 2026-12-05
        order = torch.sort(r.squeeze(-1), dim=1, descending=True, stable=True)[1]
        return torch.sort(order[:, :k], dim=1)[0]

    def gather_rope(cos, sin, idx):
        i = idx.unsqueeze(-1).expand(-1, -1, hd)
        return torch.gather(cos.expand(B, -1, -1), 1, i), torch.gather(sin.expand(B, -1, -1), 1, i)

    def gather_r(r, idx):
        return torch.gather(r, 1, idx.unsqueeze(-1))

    def router_with_gather(x, w, idx):  # before 2026-12-04: grad through the router over all S tokens
        return gather_r(F.linear(x, w), idx)

    def merge(x, idx, u):  # the chosen rows and the merge (delta = x_k * u stands in for w * f(x_k))
        rows = (torch.arange(B, device=x.device)[:, None], idx)
        xp, xg = split_tokens(x, *rows)
        return torch.index_put(xp, rows, xg * u, accumulate=True)

    def merge_scatter_add(x, idx, u):  # before commit b475f86 (2026-12-04)
        index = idx.unsqueeze(-1).expand(-1, -1, D)
        return torch.scatter_add(x, 1, index, torch.gather(x, 1, index) * u)

    def merge_scatter(x, idx, u):  # before 2026-12-04: x_k + delta replaces the k rows
        index = idx.unsqueeze(-1).expand(-1, -1, D)
        xg = torch.gather(x, 1, index)
        return torch.scatter(x, 1, index, xg + xg * u)

    def predictor(x, idx, w1, b1, w2, b2):  # before commit 843a86c: its own GEMM, next to the router's
        p = F.linear(F.gelu(F.linear(x.detach(), w1, b1)), w2, b2).squeeze(-1)
        target = torch.zeros_like(p).scatter(1, idx, 1.0)
        return F.binary_cross_entropy_with_logits(p, target)

    def router_and_predictor(x, idx, w, w1, b1, w2, b2, second=None):  # one GEMM reads x for both: [D, 1 + h]
        o = F.linear(x.detach(), torch.cat([w.detach(), w1]))
        hid = F.gelu(o[..., 1:] + b1)
        p = (second(hid, w2, b2) if second else (hid * w2).sum(-1, keepdim=True) + b2).squeeze(-1)
        target = torch.zeros_like(p).scatter(1, idx, 1.0)
        return o[..., :1].detach(), F.binary_cross_entropy_with_logits(p, target)

    def second_layer_gemm(x, idx, w, w1, b1, w2, b2):  # before 2026-12-05: h -> 1 as a GEMM
        return router_and_predictor(x, idx, w, w1, b1, w2, b2, second=F.linear)

    # (name, fn, inputs, indices of the inputs that get a gradient in training, sums it counts in: "-" without
    # the predictor, "+" with it)
    ops = [("router over S, ranking only ([B,S,D] x [D,1], no grad)", router_rank, (x, w), (), "-"),
           ("top-k (int64 keys: score bits, position; top-k of [B,S], sort indices)", topk, (r,), (), "-+"),
           ("gather RoPE cos, sin -> [B,k,hd]", gather_rope, (cos, sin, idx), (), "-+"),
           ("router on the k chosen ([B,k,D] x [D,1])", router, (xg, w), (0, 1), "-+"),
           ("x_k and merge: split_tokens + index_put", merge, (x, idx, upd), (0, 2), "-+"),
           (f"router over S + predictor in one GEMM [D,1+{h}], MLP, target, BCE", router_and_predictor,
            (x, idx, w, w1, b1, w2, b2), (3, 4, 5, 6), "+"),
           ("before: the same with the predictor's second layer (h -> 1) as a GEMM", second_layer_gemm,
            (x, idx, w, w1, b1, w2, b2), (3, 4, 5, 6), ""),
           (f"before: predictor MLP (its own [D,{h}] GEMM) + target + BCE, next to the router", predictor,
            (x, idx, w1, b1, w2, b2), (2, 3, 4, 5), ""),
           (f"one GEMM at width {h + 1} ([D,{h + 2}]: one column more), MLP, target, BCE", router_and_predictor,
            (x, idx, w, *wide), (3, 4, 5, 6), ""),
           ("before: stable sort of [B,S], slice k, sort indices", sort, (r,), (), ""),
           ("before: x_k and merge: gather + scatter_add", merge_scatter_add, (x, idx, upd), (0, 2), ""),
           ("before: x_k and merge: gather + scatter", merge_scatter, (x, idx, upd), (0, 2), ""),
           ("before: router over S with grad + gather r", router_with_gather, (x, w, idx), (0, 1), "")]
    rows = []
    for name, fn, inp, needs, sums in ops:
        cli.log(f"op: {name}")
        t = cli.time_ms(_op_call(fn, inp, needs, grad), args.device, args.op_repeat)
        rows.append((name, statistics.median(t), min(t), sums))
    context = in_context(args, ops, grad)
    kind = "forward + backward" if grad else "forward"
    print(f"\nrouting ops alone, each compiled separately, {kind}, median of {args.op_repeat} "
          f"(B={B} S={S} D={D} k={k} predictor {D}->{h}->1);\n% of the full block (dense2 - dense1 = {full_ms:.1f} ms) "
          f"and of the routed block at k (mod - dense1 = {routed_ms:.1f} ms)")
    pct = lambda v: (f"{100 * v / full_ms:.2f}%", f"{100 * v / routed_ms:.1f}%")  # noqa: E731
    alone = {sign: sum(m for _, m, _, sums in rows if sign in sums) for sign in "-+"}
    ctx = {sign: sum(context.get(n, m) for n, m, _, sums in rows if sign in sums) for sign in "-+"}
    cell = lambda n: f"{context[n]:.3f}" if n in context else ""  # noqa: E731
    sums = [(f"sum {label} predictor", f"{alone[sign]:.3f}", "", *pct(alone[sign]), f"{ctx[sign]:.3f}")
            for sign, label in (("-", "without"), ("+", "with"))]
    print(tabulate([(n, f"{m:.3f}", f"{mn:.3f}", *pct(m), cell(n)) for n, m, mn, _ in rows] + sums,
                   headers=["op", "median ms", "min ms", "% of full block", "% of routed block", "in context ms"],
                   disable_numparse=True))
    print(f"rows starting 'before' or 'one GEMM at width' are comparisons, not in the sums. In context: the op on "
          f"x = a + b (kept) with RMSNorm(x) (or of the merged x) as the next consumer, minus that context alone; "
          f"medians of {args.op_repeat} interleaved rounds; sums use the isolated time where no in-context time is "
          f"given. With predictor: {100 * ctx['+'] / routed_ms:.1f}% of the routed block, without: "
          f"{100 * ctx['-'] / routed_ms:.1f}%; of the FLOP-ideal routed block ({ideal_ms:.1f} ms, steadier: the full "
          f"block's larger difference of medians): {100 * ctx['+'] / ideal_ms:.1f}% and {100 * ctx['-'] / ideal_ms:.1f}%.")


def _op_call(fn, inp, needs, grad):
    """A compiled, warmed-up call of fn(*inp): forward under no_grad, or forward + autograd.grad for the
    inputs at `needs` with a fixed random upstream gradient for every output that has one."""
    c = torch.compile(fn, fullgraph=True)
    inp = tuple(t.detach().requires_grad_(grad and i in needs) for i, t in enumerate(inp))
    if grad and needs:
        outs = c(*inp)
        outs = outs if isinstance(outs, tuple) else (outs,)
        up = [torch.randn_like(o) if o.requires_grad else None for o in outs]

        def call():
            got = c(*inp)
            got = got if isinstance(got, tuple) else (got,)
            pairs = [(o, u) for o, u in zip(got, up) if u is not None]
            torch.autograd.grad([o for o, _ in pairs], [inp[i] for i in needs], [u for _, u in pairs], allow_unused=True)
    else:
        def call():
            with torch.no_grad():
                c(*inp)
    for _ in range(3):
        call()
    return call


def in_context(args, ops, grad) -> dict[str, float]:
    """Each op that reads or writes the residual stream x, timed where it sits in the model: x comes out of
    a residual add (a + b), is kept (an output, as in the model, where several ops read it) and is read
    next by an RMSNorm (of the merged x, for the merges), so Inductor can fuse the op with both, as it
    does in the routed graph. Returns median(context + op) - median(context alone) per op name, timed in
    interleaved rounds."""
    B, S, D = args.batch, args.seq, args.d_model
    g = torch.Generator().manual_seed(1)
    a, b = args.to(torch.randn(B, S, D, generator=g)), args.to(torch.randn(B, S, D, generator=g))

    def rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def base(a, b):  # x is a model output here as in the model, where several ops read it
        x = a + b
        return x, rms(x)

    def wrap(fn, merges):
        def with_context(a, b, *rest):
            x = a + b
            out = fn(x, *rest)
            if merges:
                return out, rms(out)
            return (x, rms(x), *out) if isinstance(out, tuple) else (x, rms(x), out)
        return with_context

    torch._dynamo.config.recompile_limit = 64  # one `with_context` code object, compiled once per op
    calls = {"context": _op_call(base, (a, b), (0,), grad)}
    for name, fn, inp, needs, _ in ops:
        if inp[0].shape == (B, S, D):  # ops on x itself
            cli.log(f"op in context: {name}")
            merges = fn.__name__.startswith("merge")  # returns the new residual stream
            calls[name] = _op_call(wrap(fn, merges), (a, b, *inp[1:]), (0, *(i + 1 for i in needs if i)), grad)
    times = {n: [] for n in calls}
    for _ in range(args.op_repeat):
        for n, call in calls.items():
            times[n] += cli.time_ms(call, args.device, 1)
    alone = statistics.median(times.pop("context"))
    return {n: statistics.median(t) - alone for n, t in times.items()}


if __name__ == "__main__":
    sys.exit(main())
