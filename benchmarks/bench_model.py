"""The performance target of issue 5, through the `modfx bench` CLI: reference llama, 12 layers, d=512,
S=1024, B=4, fp32, capacity 0.125 on every other block; forward, then forward + backward.

    python benchmarks/bench_model.py [--repeat 3] [--warmup 1] [--only forward|backward]

Writes benchmarks/results/target_forward.json and target_backward.json (and prints both tables).
"""

import argparse
import os
import sys

from modfx import cli

TARGET = ["--model", "llama", "--layers", "12", "--d-model", "512", "--heads", "8", "--vocab", "256",
          "--seq", "1024", "--batch", "4", "--dtype", "float32", "--capacity", "0.125", "--every", "2"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", default="3")
    ap.add_argument("--warmup", default="1")
    ap.add_argument("--only", choices=("forward", "backward"))
    args = ap.parse_args()
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out, exist_ok=True)
    for kind in ("forward", "backward"):
        if args.only and args.only != kind:
            continue
        argv = ["bench", *TARGET, "--repeat", args.repeat, "--warmup", args.warmup,
                "--json", os.path.join(out, f"target_{kind}.json")]
        if kind == "backward":
            argv.append("--backward")
        print("$ modfx " + " ".join(argv), flush=True)
        cli.main(argv)
        print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
