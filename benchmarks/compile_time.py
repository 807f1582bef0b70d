"""Cold compile seconds of the first training step (forward + backward), dense vs MoD without and with
the predictor, each compiled afresh (`torch._dynamo.reset()`, Inductor caches off), in interleaved rounds.

    python benchmarks/compile_time.py [--layers 4] [--rounds 3] [--forward]

Prints the seconds per round and each variant's best round over dense's best round, then Inductor's
aggregated phase times (`torch._dynamo.utils.compile_times`) for the whole run.
"""

import argparse
import time

import torch
import torch._dynamo
import torch._inductor.config as inductor_config
from torch._dynamo.utils import compile_times

import modfx
from modfx.models import llama


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--forward", action="store_true", help="time the forward only (eval, no_grad)")
    args = ap.parse_args(argv)
    inductor_config.force_disable_caches = True
    torch.manual_seed(0)
    model = llama.Llama(llama.LlamaConfig(n_layers=args.layers, d_model=args.d_model, n_heads=8, vocab_size=256))
    ids = torch.randint(0, 256, (args.batch, args.seq))
    variants = {"dense": model, "MoD, no predictor": modfx.transform(model, (ids,), predictor=False),
                "MoD": modfx.transform(model, (ids,))}
    seconds = {v: [] for v in variants}
    for _ in range(args.rounds):
        for name, m in variants.items():
            torch._dynamo.reset()
            compiled = torch.compile(m)
            t = time.perf_counter()
            if args.forward:
                with torch.no_grad():
                    compiled(ids)
            else:
                compiled(ids).logits.float().mean().backward()
                m.zero_grad(set_to_none=True)
            seconds[name].append(time.perf_counter() - t)
    for name, s in seconds.items():
        rounds = " ".join(f"{v:5.1f}" for v in s)
        print(f"{name:18s} {rounds} s   best / dense best {min(s) / min(seconds['dense']):.2f}")
    print(compile_times(repr="str", aggregate=True))


if __name__ == "__main__":
    main()
