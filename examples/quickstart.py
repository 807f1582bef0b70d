"""Transform the reference llama, compile dense and MoD with Inductor, time both, print a table.

    python examples/quickstart.py [--quick]
"""

import argparse
import statistics
import time

import torch
from tabulate import tabulate

import modfx
from modfx.models import llama


def median_ms(fn, x, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    args = ap.parse_args(argv)
    layers, d, seq, batch, repeat = (4, 64, 64, 2, 3) if args.quick else (8, 256, 512, 2, 5)
    torch.manual_seed(0)
    model = llama.Llama(llama.LlamaConfig(n_layers=layers, d_model=d, n_heads=8, vocab_size=256)).eval()
    ids = torch.randint(0, 256, (batch, seq))
    mod = modfx.transform(model, (ids,), capacity=0.125, every=2).eval()
    print(modfx.plan(mod))
    rows = []
    with torch.no_grad():
        for name, m in (("dense", model), ("MoD", mod)):
            t = time.perf_counter()
            compiled = torch.compile(m, fullgraph=True)
            compiled(ids)
            compile_s = time.perf_counter() - t
            err = (compiled(ids).logits - m(ids).logits).abs().max().item()
            rows.append((name, median_ms(m, ids, repeat), median_ms(compiled, ids, repeat), compile_s, err))
    dense_ms = rows[0][2]
    table = [(n, f"{e:.1f}", f"{c:.1f}", f"{dense_ms / c:.2f}x", f"{s:.1f}", f"{err:.1e}") for n, e, c, s, err in rows]
    print(tabulate(table, headers=["model", "eager ms", "compiled ms", "speedup vs dense", "compile s", "|compiled - eager|"]))
    print(modfx.flops(mod))


if __name__ == "__main__":
    main()
