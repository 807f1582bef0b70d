"""modfx against a public peer: the `mixture-of-depth` package (PyPI, v1.2.0), which patches Hugging Face
Llama layers with a Python-level MoD wrapper (`MoD.apply_mod_to_hf`).

    python benchmarks/peers.py                                     # forward; peer on transformers 4.40.2
    python benchmarks/peers.py --transformers 4.40.2 4.44.2 5.23.0 # the peer on three transformers releases
    python benchmarks/peers.py --backward                          # forward + backward, train mode

The peer runs in its own venv, created on first use under benchmarks/.peers-venv/transformers-VERSION
(torch==2.13.0 CPU, the transformers release given, mixture-of-depth==1.2.0); modfx runs in this
interpreter's environment. Each side is one worker process (`peers.py --worker modfx|peer`) that prints
one JSON line. Both build `LlamaForCausalLM` from the same `LlamaConfig` with seed-0 random weights (no
download) and route every other layer (1, 3, ...: the peer's fixed choice; modfx with `every=2`) at
capacity 0.125 (fixed in the peer). Four variants per side, timed in interleaved rounds: dense eager, dense
compiled, MoD eager, MoD compiled (`torch.compile(fullgraph=True)`, else default options; graph breaks
counted by `torch._dynamo.explain`). Speedups are against the side's own dense models, since the two
transformers releases differ. FLOPs come from `FlopCounterMode` (which counts nothing for SDPA on CPU, so
attention is left out on both sides). A variant that raises is reported with its error: a failure is a
result.
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
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    # positions given explicitly, [B, S]: the peer indexes them per batch row (HF's default is [1, S])
    return model, {"input_ids": ids, "position_ids": torch.arange(args.seq).expand(args.batch, -1)}


def mod_of(side, model, inputs, args):
    if side == "peer":
        from MoD import apply_mod_to_hf

        mod = apply_mod_to_hf(copy.deepcopy(model))  # capacity 0.125 and odd layers are fixed in the package
        for layer in mod.model.layers:
            if hasattr(layer, "training_step"):
                # in train mode the peer anneals capacity 1 -> 0.125 over 1,000 steps: start past that
                layer.training_step = 10**6
        return mod
    import modfx

    return modfx.transform(model, example_kwargs=inputs, capacity=args.capacity, every=2)


def make_step(m, inputs, backward):
    import torch

    def step():
        if backward:
            m(**inputs).logits.float().mean().backward()
            m.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                m(**inputs)
    return step


def error(e):
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def worker(side, args):
    import torch
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(args.threads)
    model, inputs = build(args)
    out = {"side": side, "torch": torch.__version__, "transformers": transformers.__version__, "variants": {},
           "logits": {}, "flops": {}}
    if side == "peer":
        from importlib.metadata import version

        out["mixture_of_depth"] = version("mixture-of-depth")
    models = {"dense": model}
    try:
        models["MoD"] = mod_of(side, model, inputs, args)
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        out["variants"]["MoD eager"] = out["variants"]["MoD compiled"] = {"error": error(e)}
    steps = {}
    for label, m in models.items():
        m.train(args.backward)
        step = make_step(m, inputs, args.backward)
        try:
            with torch.no_grad():
                logits = m(**inputs).logits
            out["logits"][label] = {"shape": list(logits.shape), "finite": bool(logits.isfinite().all())}
            with FlopCounterMode(display=False) as fc:
                step()
            out["flops"][label] = fc.get_total_flops()
            steps[f"{label} eager"] = step
        except Exception as e:  # noqa: BLE001
            out["variants"][f"{label} eager"] = out["variants"][f"{label} compiled"] = {"error": error(e)}
            continue
        try:
            torch._dynamo.reset()
            out["variants"][f"{label} compiled"] = {"graph_breaks": torch._dynamo.explain(m)(**inputs).graph_break_count}
        except Exception as e:  # noqa: BLE001
            out["variants"][f"{label} compiled"] = {"explain_error": error(e)}
    torch._dynamo.reset()  # compile last, after every explain, so no reset throws a compiled model's code away
    for label, m in models.items():
        res = out["variants"][f"{label} compiled"]
        for fullgraph in (True, False) if f"{label} eager" in steps else ():
            cstep = make_step(torch.compile(m, fullgraph=fullgraph), inputs, args.backward)
            try:
                t = time.perf_counter()
                cstep()
                res.update(compile_s=time.perf_counter() - t, fullgraph=fullgraph)
                steps[f"{label} compiled"] = cstep
                break
            except Exception as e:  # noqa: BLE001
                res["fullgraph_error" if fullgraph else "error"] = error(e)
    times = {v: [] for v in steps}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    # interleaved rounds, so load drift hits every variant alike (modfx.cli.round_robin's scheme, written out
    # here because the peer's environment has no modfx)
    for _ in range(args.repeat):
        for v, step in steps.items():
            t = time.perf_counter()
            step()
            times[v].append((time.perf_counter() - t) * 1e3)
    for v, ts in times.items():
        out["variants"].setdefault(v, {}).update(median_ms=statistics.median(ts), min_ms=min(ts), max_ms=max(ts))
    print("PEERS-JSON " + json.dumps(out), flush=True)


# --- orchestrator -------------------------------------------------------------------------------------

def peer_python(venv, transformers):
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"creating {venv} (torch 2.13.0 CPU, transformers {transformers}, {PEER}) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0", f"transformers=={transformers}",
                        PEER], check=True)
    return str(py)


def run_side(python, side, argv):
    cmd = [python, __file__, "--worker", side, *argv]
    print(f"$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}  # compile seconds without cache hits
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("PEERS-JSON "):
            return json.loads(line[len("PEERS-JSON "):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
    return {"side": side, "error": f"worker exited with {p.returncode}: " + " | ".join(tail)}


def rows_of(res):
    side = res["side"] if res["side"] == "modfx" else f"peer (transformers {res.get('transformers', '?')})"
    if "error" in res:
        return [(side, "-", "-", "-", "-", "-", "-", "-", "-", res["error"][:160])]
    v, f = res["variants"], res["flops"]
    eager, compiled = (v.get(f"dense {k}", {}).get("median_ms") for k in ("eager", "compiled"))
    rows = []
    for name in ("dense eager", "dense compiled", "MoD eager", "MoD compiled"):
        r = v.get(name, {})
        fl = f.get(name.split()[0])
        full = f"fullgraph=True: {r['fullgraph_error'][:100]}" if "fullgraph_error" in r else ""
        if "median_ms" not in r:
            err = (f"{full}; default: " if full else "") + r.get("error", "not run")
            rows.append((side, name, "-", "-", "-", "-", "-", "-", str(r.get("graph_breaks", "-")), err[:220]))
            continue
        ms = r["median_ms"]
        rows.append((side, name, f"{fl / 1e9:.2f}" if fl else "-", f"{ms:.1f} ({r['min_ms']:.1f}-{r['max_ms']:.1f})",
                     f"{eager / ms:.2f}x" if eager else "-", f"{compiled / ms:.2f}x" if compiled else "-",
                     f"{r['compile_s']:.1f}" if "compile_s" in r else "-",
                     ("yes" if r["fullgraph"] else "no") if "fullgraph" in r else "-",
                     str(r.get("graph_breaks", "-")), full))
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
    ap.add_argument("--backward", action="store_true", help="time forward + backward in train mode")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--transformers", nargs="+", default=["4.40.2"],
                    help="transformers release(s) for the peer's venv(s) (4.40.2: the newest its MoD runs on)")
    ap.add_argument("--venv-dir", default=str(HERE / ".peers-venv"), help="peer venvs go here, one per release")
    ap.add_argument("--json", help="default benchmarks/results/peers_cpu[_backward].json")
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args)
    shared = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
              ("layers", "d_model", "heads", "vocab", "seq", "batch", "capacity", "repeat", "warmup", "threads")]
    shared += ["--backward"] * args.backward
    results = [run_side(sys.executable, "modfx", shared)]
    for tv in args.transformers:
        py = peer_python(pathlib.Path(args.venv_dir) / f"transformers-{tv}", tv)
        results.append(run_side(py, "peer", shared))
    from tabulate import tabulate

    what = "forward + backward (train)" if args.backward else "forward (eval, no_grad)"
    print(f"HF LlamaForCausalLM L={args.layers} d={args.d_model} heads={args.heads} vocab={args.vocab}, "
          f"B={args.batch} S={args.seq} fp32 cpu, {args.threads} thread(s), {what}, median of {args.repeat} "
          f"interleaved rounds; capacity 0.125 on layers 1, 3, ...")
    print(tabulate([r for res in results for r in rows_of(res)],
                   headers=["side", "variant", "GFLOPs (no SDPA)", "median ms (min-max)", "vs own dense eager",
                            "vs own dense compiled", "compile s", "fullgraph", "graph breaks", "error"],
                   disable_numparse=True))
    for res in results:
        f, lg = res.get("flops", {}), res.get("logits", {})
        if "MoD" in f:
            print(f"{res['side']} (transformers {res['transformers']}): MoD/dense FLOPs {f['MoD'] / f['dense']:.3f}; "
                  f"logits dense {lg['dense']}, MoD {lg['MoD']}, same shape: {lg['dense']['shape'] == lg['MoD']['shape']}")
    meta = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "machine": platform.platform(),
            "cpus": os.cpu_count(), "args": {k: v for k, v in vars(args).items() if k != "worker"}}
    path = args.json or str(HERE / "results" / f"peers_cpu{'_backward' * args.backward}.json")
    pathlib.Path(path).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
