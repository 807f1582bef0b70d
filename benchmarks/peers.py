"""modfx against a public peer: the `mixture-of-depth` package (PyPI, v1.2.0), which patches Hugging Face
Llama layers with a Python-level MoD wrapper (`MoD.apply_mod_to_hf`).

    python benchmarks/peers.py                    # creates benchmarks/.peers-venv/... on first use (~1 min)
    python benchmarks/peers.py --seq 512 --batch 2 --layers 4 --d-model 256 --repeat 5

Both sides build the same `transformers.LlamaConfig` with random weights (seed 0, no download), route
every other layer (1, 3, ...: the peer's fixed choice) at capacity 0.125, and time the forward pass in eval
mode under no_grad: dense eager, dense compiled, MoD eager, MoD compiled (`torch.compile`, default options,
graph breaks counted by `torch._dynamo.explain`). Each side runs in its own environment and process:
modfx in this interpreter's environment, the peer in a venv with the transformers release it was written
for (its decoder-layer wrapper takes the layer call signature of transformers 4.4x). Each side's speedups
are against its own dense compiled model, since the two transformers releases differ. FLOPs come from
`FlopCounterMode` (which counts no FLOPs for SDPA on CPU, so attention is left out on both sides).
A variant that raises is reported with its error: a failure is a result.
"""

import argparse
import copy
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
PEER = "mixture-of-depth==1.2.0"


# --- worker: runs inside one environment, prints one JSON line -----------------------------------------

def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_model * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=max(2048, args.seq), use_cache=False)
    cfg.architectures = ["LlamaForCausalLM"]  # the peer picks its layer list by this name
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    # positions given explicitly, [B, S]: the peer indexes them per batch row (HF's default is [1, S])
    return model, {"input_ids": ids, "position_ids": torch.arange(args.seq).expand(args.batch, -1)}


def mod_of(side, model, inputs, capacity):
    if side == "peer":
        from MoD import apply_mod_to_hf

        mod = apply_mod_to_hf(copy.deepcopy(model))  # capacity 0.125 and odd layers are fixed in the package
        return mod.eval()
    import modfx

    return modfx.transform(model, example_kwargs=inputs, capacity=capacity, every=2).eval()


def flops(m, inputs):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(**inputs)
    return fc.get_total_flops()


def worker(side, args):
    import torch

    torch.set_num_threads(args.threads)
    model, inputs = build(args)
    out = {"side": side, "torch": torch.__version__, "variants": {}}
    import transformers

    out["transformers"] = transformers.__version__
    if side == "peer":
        from importlib.metadata import version

        out["mixture_of_depth"] = version("mixture-of-depth")
    else:
        import modfx

        out["modfx"] = getattr(modfx, "__version__", "0.1.0")
    models = {"dense": model}
    try:
        models["mod"] = mod_of(side, model, inputs, args.capacity)
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        out["variants"]["MoD eager"] = out["variants"]["MoD compiled"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    steps = {}
    for name, m in models.items():
        try:
            with torch.no_grad():
                logits = m(**inputs).logits
            out.setdefault("logits_shape", {})[name] = list(logits.shape)
            out.setdefault("flops", {})[name] = flops(m, inputs)
        except Exception as e:  # noqa: BLE001
            out["variants"][f"{'MoD' if name == 'mod' else name} eager"] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        label = "MoD" if name == "mod" else "dense"
        steps[f"{label} eager"] = (lambda m=m: m(**inputs))
        try:
            torch._dynamo.reset()
            explain = torch._dynamo.explain(m)(**inputs)
            breaks = explain.graph_break_count
            torch._dynamo.reset()
            compiled = torch.compile(m)
            t = time.perf_counter()
            with torch.no_grad():
                compiled(**inputs)
            out["variants"][f"{label} compiled"] = {"compile_s": time.perf_counter() - t, "graph_breaks": breaks}
            steps[f"{label} compiled"] = (lambda c=compiled: c(**inputs))
        except Exception as e:  # noqa: BLE001
            out["variants"][f"{label} compiled"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"[:300]}
    times = {v: [] for v in steps}
    with torch.no_grad():
        for step in steps.values():
            for _ in range(args.warmup):
                step()
        for _ in range(args.repeat):  # interleaved rounds, so load drift hits every variant alike
            for v, step in steps.items():
                t = time.perf_counter()
                step()
                times[v].append((time.perf_counter() - t) * 1e3)
    for v, ts in times.items():
        out["variants"].setdefault(v, {}).update(median_ms=statistics.median(ts), min_ms=min(ts), max_ms=max(ts))
    print("PEERS-JSON " + json.dumps(out), flush=True)


# --- orchestrator -------------------------------------------------------------------------------------

def peer_python(venv: pathlib.Path, transformers: str) -> str:
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"creating {venv} (torch 2.13.0 CPU, transformers {transformers}, {PEER}) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0", f"transformers=={transformers}",
                        PEER], check=True)
    return str(py)


def run_side(python: str, side: str, argv: list[str]) -> dict:
    cmd = [python, __file__, "--worker", side, *argv]
    print(f"$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}  # compile seconds without cache hits
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("PEERS-JSON "):
            return json.loads(line[len("PEERS-JSON "):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
    return {"side": side, "error": f"worker exited with {p.returncode}: " + " | ".join(tail)}


def rows_of(res: dict) -> list[tuple]:
    if "error" in res:
        return [(res["side"], "-", "-", "-", "-", "-", "-", res["error"][:160])]
    v, f = res["variants"], res.get("flops", {})
    base = v.get("dense compiled", {}).get("median_ms")
    rows = []
    for name in ("dense eager", "dense compiled", "MoD eager", "MoD compiled"):
        r = v.get(name, {})
        fl = f.get("mod" if name.startswith("MoD") else "dense")
        if "median_ms" not in r:
            rows.append((res["side"], name, "-", "-", "-", "-", "-", r.get("error", "not run")[:160]))
            continue
        rows.append((res["side"], name, f"{fl / 1e9:.2f}" if fl else "-",
                     f"{r['median_ms']:.1f} ({r['min_ms']:.1f}-{r['max_ms']:.1f})",
                     f"{base / r['median_ms']:.2f}x" if base else "-",
                     f"{r['compile_s']:.1f}" if "compile_s" in r else "-",
                     str(r.get("graph_breaks", "-")), r.get("error", "")))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=("peer", "modfx"), help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--capacity", type=float, default=0.125, help="modfx's; the peer's is fixed at 0.125")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--transformers", default="4.40.2",
                    help="transformers release for the peer's venv (4.40.2 is the newest seen to run its eager MoD)")
    ap.add_argument("--venv", help="the peer's venv (default benchmarks/.peers-venv/transformers-VERSION)")
    ap.add_argument("--json", default=str(HERE / "results" / "peers_cpu.json"))
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args)
    shared = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
              ("layers", "d_model", "heads", "vocab", "seq", "batch", "capacity", "repeat", "warmup", "threads")]
    results = [run_side(sys.executable, "modfx", shared),
               run_side(peer_python(pathlib.Path(args.venv or HERE / ".peers-venv" / f"transformers-{args.transformers}"),
                                    args.transformers), "peer", shared)]
    from tabulate import tabulate

    rows = [r for res in results for r in rows_of(res)]
    print(f"HF LlamaForCausalLM L={args.layers} d={args.d_model} heads={args.heads} vocab={args.vocab}, "
          f"B={args.batch} S={args.seq} fp32 cpu, {args.threads} thread(s), forward (eval, no_grad), "
          f"median of {args.repeat} interleaved rounds; capacity 0.125 on layers 1, 3, ...")
    print(tabulate(rows, headers=["side", "variant", "GFLOPs (no SDPA)", "median ms (min-max)",
                                  "vs own dense compiled", "compile s", "graph breaks", "error"],
                   disable_numparse=True))
    for res in results:
        if "flops" in res and "mod" in res["flops"]:
            print(f"{res['side']}: MoD/dense FLOPs {res['flops']['mod'] / res['flops']['dense']:.3f}, "
                  f"torch {res['torch']}, transformers {res['transformers']}")
    meta = dict(date=time.strftime("%Y-%m-%d"), python=platform.python_version(), machine=platform.platform(),
                cpus=os.cpu_count(), args={k: v for k, v in vars(args).items() if k != "worker"})
    pathlib.Path(args.json).write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
