"""Convert a trained dense llama to Mixture-of-Depths by training only its routers and predictors (issue 7).

    python benchmarks/convert.py --ckpt out/isoflop/dense_seed0.pt --steps 150
    python benchmarks/convert.py --quick          # trains a tiny dense model here first

The dense model is the isoflop run's checkpoint (or one trained here for --dense-steps, same recipe).
It is transformed at capacity 0.5, every 2nd block, weighting "ste" (a routed token gets x + f(x), as in
the dense model; the router learns by straight-through), every weight but the routers and predictors
(".mod_router." / ".mod_predictor.") is frozen, and those are trained for --steps on the same data.
Reported on the isoflop validation batches, in bits per byte: the dense model, the MoD with its fresh
routers, the MoD after router training (top-k and predictor routing), the MoD with its routed blocks
removed, the predictor's accuracy against top-k, and the FLOPs of MoD / dense (forward and training).
"""

import argparse
import json
import pathlib
import time

import torch
from tabulate import tabulate

import modfx
from modfx.models import llama

import isoflop


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ckpt", default=None, help="dense checkpoint from isoflop.py (else train one here)")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dense-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=150, help="router + predictor training steps")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--capacity", type=float, default=0.5)
    ap.add_argument("--val-batches", type=int, default=16)
    ap.add_argument("--n-evals", type=int, default=3)
    ap.add_argument("--max-files", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/convert")
    args = ap.parse_args(argv)
    if args.quick:
        args.d_model, args.heads, args.layers, args.seq, args.batch = 32, 2, 2, 64, 4
        args.dense_steps, args.steps, args.val_batches, args.n_evals, args.max_files = 60, 30, 2, 2, 60
    return args


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.ckpt:  # model and data settings come from the checkpoint's run
        ckpt = torch.load(args.ckpt, weights_only=False)
        for k in ("seq", "batch", "heads", "max_files", "val_batches"):
            setattr(args, k, ckpt["args"][k])
        cfg = llama.LlamaConfig(**ckpt["config"])
    else:
        cfg = llama.LlamaConfig(n_layers=args.layers, d_model=args.d_model, n_heads=args.heads, max_seq_len=args.seq)
    train_data, val_data, corpus = isoflop.load_corpus(args.max_files)
    vgen = torch.Generator().manual_seed(1234)  # the same validation batches as isoflop.py
    val_batches = [isoflop.get_batch(val_data, args.batch, args.seq, vgen) for _ in range(args.val_batches)]
    x = val_batches[0][0]

    torch.manual_seed(args.seed)
    dense = llama.Llama(cfg)
    dense_rep = modfx.flops(dense, (x,))
    if args.ckpt:
        dense.load_state_dict(ckpt["state_dict"])
    else:
        f = dense_rep.train_at
        isoflop.train(dense, args.dense_steps, f, args.dense_steps * f, args, args.seed, train_data, val_batches, "dense")
    dense_bpb, _ = isoflop.evaluate(dense, val_batches)

    mod = modfx.transform(dense, (x,), capacity=args.capacity, every=2, weighting="ste")
    trainable = []
    for name, p in mod.named_parameters():
        p.requires_grad_(".mod_router." in name or ".mod_predictor." in name)
        if p.requires_grad:
            trainable.append(name)
    mod_rep = modfx.flops(mod, (x,))
    before = isoflop.mod_figures(mod, cfg, val_batches)
    f = mod_rep.train_at
    rec = isoflop.train(mod, args.steps, f, args.steps * f, args, args.seed + 1, train_data, val_batches, "convert")
    after = isoflop.mod_figures(mod, cfg, val_batches)

    rows = [("dense", dense_bpb, "", "", "", 1.0),
            ("MoD, fresh routers", before["bpb_topk"], before["bpb_predictor"], before["predictor_accuracy"],
             before["predictor_selected"], mod_rep.total_at / dense_rep.total_at),
            (f"MoD, routers trained {args.steps} steps", after["bpb_topk"], after["bpb_predictor"],
             after["predictor_accuracy"], after["predictor_selected"], mod_rep.total_at / dense_rep.total_at),
            ("routed blocks removed", after["bpb_routed_removed"], "", "", "", None)]
    print(f"convert: llama {cfg.n_layers}x{cfg.d_model}, capacity {args.capacity}, every 2, weighting ste; "
          f"trainable: {len(trainable)} tensors, {sum(mod.get_parameter(n).numel() for n in trainable):,} params")
    print(tabulate(rows, headers=["model", "val bpb (top-k)", "val bpb (predictor)", "pred acc", "pred selected",
                                  "fwd FLOPs vs dense"], floatfmt=".4f"))
    result = dict(args=vars(args), corpus=corpus, dense_bpb=dense_bpb, before=before, after=after,
                  train_loss=rec["train_loss"], curve=rec["curve"], wall_s=rec["wall_s"], trainable=trainable,
                  fwd_flop_ratio=mod_rep.total_at / dense_rep.total_at,
                  train_flop_ratio=mod_rep.train_at / dense_rep.train_at,
                  delta_vs_dense=after["bpb_topk"] / dense_bpb - 1)
    print(f"after router training: {100 * result['delta_vs_dense']:+.2f}% bpb vs dense (top-k), "
          f"{100 * (after['bpb_predictor'] / dense_bpb - 1):+.2f}% (predictor), at "
          f"{result['fwd_flop_ratio']:.3f} of the dense forward FLOPs "
          f"({100 * (1 - result['fwd_flop_ratio']):.1f}% saved)")
    (out / "convert.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"{time.perf_counter() - t0:.0f} s")
