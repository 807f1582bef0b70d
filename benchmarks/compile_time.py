"""Cold compile seconds of the first training step (forward + backward), dense vs MoD without and with
the predictor, each compiled afresh (`torch._dynamo.reset()`, Inductor caches off), in interleaved rounds.

    python benchmarks/compile_time.py [--layers 4] [--rounds 3] [--forward] [--cpp-wrapper] [--dynamic] [--kernels] [--list]

Prints the seconds per round and each variant's best round over dense's best round, then Inductor's
aggregated phase times (`torch._dynamo.utils.compile_times`) for the whole run. --cpp-wrapper compiles
with Inductor's C++ wrapper; --dynamic with dynamic shapes (`torch.compile(dynamic=True)`: sizes become kernel
arguments, not constants; see RESULTS.md for whether routed and dense blocks then share kernels). --kernels
then builds each variant's distinct C++ kernels one at a time (each source made new, so no build is a cache
hit) and prints their count and build seconds. --list prints each variant's C++ kernels in the order its compiled
forward and backward call them, each marked with whether dense builds the same source.
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
    ap.add_argument("--list", action="store_true", help="also list each variant's kernels, marking dense's own")
    args = ap.parse_args(argv)
    if (args.kernels or args.list) and args.cpp_wrapper:
        ap.error("--kernels and --list read the kernels Inductor builds one by one; with --cpp-wrapper it builds them together")
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
    if args.list:
        dense_sources = {src for *_, src in _kernels(model, ids, args.forward, args.dynamic)}
        for name, m in variants.items():
            print(f"{name}: C++ kernels in call order (graph 0 is the forward); * = dense builds the same source")
            for graph, kernel, _, src in _kernels(m, ids, args.forward, args.dynamic):
                print(f"  {graph} {'*' if src in dense_sources else ' '} {kernel}")
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


def _kernels(m, ids, forward: bool, dynamic: bool) -> list[tuple[int, str, list, str]]:
    """(graph, name, argument types, source) of each C++ kernel one compiled step calls, in call order; the
    source has the kernel's name normalised, so equal sources are one build."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    _, codes = run_and_get_code(_first_step(torch.compile(m, dynamic=dynamic or None), ids, forward))
    m.zero_grad(set_to_none=True)
    kernels = []
    for graph, code in enumerate(codes):
        defined = {name: (ast.literal_eval(argtypes), re.sub(r"cpp_fused_\w+", "kernel", src)) for name, argtypes, src in
                   re.findall(r"^(cpp_fused_\w+) = async_compile\.cpp_pybinding\((\[.*?\]), r'''(.*?)'''\)",
                              code, re.S | re.M)}
        kernels += [(graph, name, *defined[name]) for name in re.findall(r"^\s+(cpp_fused_\w+)\(", code, re.M)]
    return kernels


def _kernel_build_seconds(m, ids, forward: bool, dynamic: bool) -> list[float]:
    """Seconds to build each distinct C++ kernel of one compiled step, one at a time, uncached."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    kernels = {src: argtypes for _, _, argtypes, src in _kernels(m, ids, forward, dynamic)}
    seconds = []
    for src, argtypes in kernels.items():
        fresh = f"{src}\n// modfx compile_time.py {time.time_ns()}\n"  # a new source hash: no cache hit
        t = time.perf_counter()
        CppPythonBindingsCodeCache.load_pybinding(argtypes, fresh)
        seconds.append(time.perf_counter() - t)
    return seconds


if __name__ == "__main__":
    main()
