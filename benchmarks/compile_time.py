"""Cold compile seconds of the first training step (forward + backward), dense vs MoD without and with
the predictor, each compiled afresh (`torch._dynamo.reset()`, Inductor caches off), in interleaved rounds.

    python benchmarks/compile_time.py [--layers 4] [--rounds 3] [--forward] [--cpp-wrapper] [--dynamic] [--kernels]

Prints the seconds per round and each variant's best round over dense's best round, then Inductor's
aggregated phase times (`torch._dynamo.utils.compile_times`) for the whole run. --cpp-wrapper compiles
with Inductor's C++ wrapper; --dynamic with dynamic shapes (`torch.compile(dynamic=True)`: sizes become kernel
arguments, not constants; see RESULTS.md for whether routed and dense blocks then share kernels). --kernels
then builds each variant's distinct C++ kernels one at a time (each source made new, so no build is a cache
hit) and prints their count and build seconds.
"""

import argparse
import ast
import re
import statistics
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
    ap.add_argument("--cpp-wrapper", action="store_true", help="compile with Inductor's C++ wrapper")
    ap.add_argument("--dynamic", action="store_true", help="compile with dynamic shapes")
    ap.add_argument("--kernels", action="store_true", help="also build each distinct C++ kernel alone, timed")
    args = ap.parse_args(argv)
    if args.kernels and args.cpp_wrapper:
        ap.error("--kernels times the kernels Inductor builds one by one; with --cpp-wrapper it builds them together")
    inductor_config.force_disable_caches = True
    inductor_config.cpp_wrapper = args.cpp_wrapper
    torch.manual_seed(0)
    model = llama.Llama(llama.LlamaConfig(n_layers=args.layers, d_model=args.d_model, n_heads=8, vocab_size=256))
    ids = torch.randint(0, 256, (args.batch, args.seq))
    variants = {"dense": model, "MoD, no predictor": modfx.transform(model, (ids,), predictor=False),
                "MoD": modfx.transform(model, (ids,))}
    seconds = {v: [] for v in variants}
    for _ in range(args.rounds):
        for name, m in variants.items():
            torch._dynamo.reset()
            step = _first_step(torch.compile(m, dynamic=args.dynamic or None), ids, args.forward)
            t = time.perf_counter()
            step()
            m.zero_grad(set_to_none=True)
            seconds[name].append(time.perf_counter() - t)
    for name, s in seconds.items():
        rounds = " ".join(f"{v:5.1f}" for v in s)
        print(f"{name:18s} {rounds} s   best / dense best {min(s) / min(seconds['dense']):.2f}")
    print(compile_times(repr="str", aggregate=True))
    if args.kernels:
        for name, m in variants.items():
            kernels = _kernel_build_seconds(m, ids, args.forward, args.dynamic)
            print(f"{name:18s} {len(kernels)} distinct C++ kernels, built one at a time: {sum(kernels):.1f} s in all, "
                  f"median {statistics.median(kernels):.2f} s, min {min(kernels):.2f} s, max {max(kernels):.2f} s")


def _first_step(compiled, ids, forward: bool):
    def step():
        if forward:
            with torch.no_grad():
                compiled(ids)
        else:
            compiled(ids).logits.float().mean().backward()
    return step


def _kernel_build_seconds(m, ids, forward: bool, dynamic: bool) -> list[float]:
    """Seconds to build each distinct C++ kernel of one compiled step, one at a time, uncached."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    _, codes = run_and_get_code(_first_step(torch.compile(m, dynamic=dynamic or None), ids, forward))
    m.zero_grad(set_to_none=True)
    kernels = {}  # source with the kernel's name normalised -> (argument types, source)
    for code in codes:
        for argtypes, src in re.findall(r"= async_compile\.cpp_pybinding\((\[.*?\]), r'''(.*?)'''\)", code, re.S):
            kernels[re.sub(r"cpp_fused_\w+", "kernel", src)] = (ast.literal_eval(argtypes), src)
    seconds = []
    for argtypes, src in kernels.values():
        fresh = f"{src}\n// modfx compile_time.py {time.time_ns()}\n"  # a new source hash: no cache hit
        t = time.perf_counter()
        CppPythonBindingsCodeCache.load_pybinding(argtypes, fresh)
        seconds.append(time.perf_counter() - t)
    return seconds


if __name__ == "__main__":
    main()
