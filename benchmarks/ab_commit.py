"""One routed block, this checkout's modfx against another commit's, in one process (interleaved rounds).

    python benchmarks/ab_commit.py --base b475f86~1 [--backward] [--rounds 20] [--no-predictor]

`git archive <base> modfx` is unpacked into a temporary folder as the package `modfx_base` (modfx's own
modules import each other relatively), so both versions transform the same 2-layer reference llama
(d=512, S=1024, B=4, block 1 routed at capacity 0.125) and are compiled and timed side by side with a
dense 1-layer and 2-layer model. Prints each model's median, the routed block (model - dense1) per
version and the paired per-round difference head - base.
"""

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile

import torch
from tabulate import tabulate

import modfx
from modfx import cli
from modfx.models import llama


def import_base(commit: str):
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True).stdout.strip()
    tar = subprocess.run(["git", "archive", commit, "modfx"], cwd=root, capture_output=True, check=True).stdout
    folder = tempfile.mkdtemp(prefix="modfx_base_")
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(folder, filter="data")
    os.rename(os.path.join(folder, "modfx"), os.path.join(folder, "modfx_base"))
    sys.path.insert(0, folder)
    import modfx_base

    return modfx_base


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="the commit to compare against (any git revision)")
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--no-predictor", action="store_true")
    args = ap.parse_args()
    base = import_base(args.base)
    torch.manual_seed(0)
    cfg = lambda n: llama.LlamaConfig(n_layers=n, d_model=512, n_heads=8, vocab_size=256, max_seq_len=2048)  # noqa: E731
    dense1, dense2 = llama.Llama(cfg(1)), llama.Llama(cfg(2))
    ids = torch.randint(0, 256, (4, 1024))
    kw = {"capacity": 0.125, "every": 2, "predictor": not args.no_predictor}
    models = {"dense1": dense1, "dense2": dense2, "mod_base": base.transform(dense2, (ids,), **kw),
              "mod_head": modfx.transform(dense2, (ids,), **kw)}
    steps = {}
    for name, m in models.items():
        cli.log(f"compiling {name}")
        m.train(args.backward)
        steps[name] = cli.make_step(torch.compile(m, fullgraph=True), ((ids,), {}), args.backward)
        steps[name]()
    times = cli.round_robin(steps, "cpu", 2, args.rounds)
    med = {n: statistics.median(t) for n, t in times.items()}
    kind = "fwd+bwd" if args.backward else "forward"
    print(f"{kind}, {torch.get_num_threads()} threads, median of {args.rounds} rounds; base = {args.base}")
    rows = [(n, f"{med[n]:.2f}", f"{med[n] - med['dense1']:.2f}" if n.startswith("mod") else "") for n in models]
    print(tabulate(rows, headers=["model", "median ms", "routed block ms (- dense1)"], disable_numparse=True))
    paired = statistics.median(h - b for h, b in zip(times["mod_head"], times["mod_base"]))
    print(f"head - base: {med['mod_head'] - med['mod_base']:+.2f} ms (difference of medians), {paired:+.2f} ms (median of per-round differences)")


if __name__ == "__main__":
    sys.exit(main())
