"""modfx command line: bench, inspect, flops.

    modfx bench   --model llama --layers 8 --d-model 256 --seq 512 --batch 2 [--backward] [--json out.json]
    modfx inspect --hf gpt2 --layers 2 --d-model 64
    modfx flops   --model gpt --layers 4
    modfx bench   --hf-config path/to/config.json --layers 4
    modfx bench   --factory my_models.py:make_model

Every subcommand builds the same model from the same flags: a reference model (`--model`), a small
Hugging Face model with random weights (`--hf`, no download), any Hugging Face architecture from a
local config file (`--hf-config`, random weights) or the user's own model (`--factory`), then
`modfx.transform`s it.
`bench` compiles dense and MoD with Inductor (`torch.compile(m, fullgraph=True)`) and times all four.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import time
import warnings

import torch
from torch.utils import _pytree as pytree
from tabulate import tabulate

import modfx
from modfx.errors import ModfxError

HF_MODELS = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox", "bert")


def log(msg: str) -> None:
    print(f"[modfx] {msg}", file=sys.stderr, flush=True)


# --- model -------------------------------------------------------------------------------------------

def build_model(args) -> torch.nn.Module:
    """The dense model the flags describe, random weights, on args.device in args.dtype."""
    torch.manual_seed(args.seed)
    L, d, h, V = args.layers, args.d_model, args.heads, args.vocab
    max_len = max(2048, args.seq + 1)
    if args.factory:
        model = _factory_model(args)
    elif args.hf_config:
        model = _hf_config_model(args)
    elif args.hf:
        model = _hf_model(args.hf, L, d, h, V, max_len)
    else:
        from modfx.models import encoder, gpt, llama, moe

        cls, cfg = {
            "gpt": (gpt.GPT, gpt.GPTConfig), "llama": (llama.Llama, llama.LlamaConfig),
            "encoder": (encoder.Encoder, encoder.EncoderConfig), "moe": (moe.MoE, moe.MoEConfig),
        }[args.model]
        model = cls(cfg(n_layers=L, d_model=d, n_heads=h, vocab_size=V, max_seq_len=max_len))
    return model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()


def _hf_model(name: str, L: int, d: int, h: int, V: int, max_len: int) -> torch.nn.Module:
    import transformers as T
    from modfx.models.common import swiglu_hidden

    if name in ("llama", "mistral", "qwen2"):
        cfg = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}[name](
            vocab_size=V, hidden_size=d, intermediate_size=swiglu_hidden(d), num_hidden_layers=L,
            num_attention_heads=h, num_key_value_heads=h, max_position_embeddings=max_len, use_cache=False)
    elif name == "gpt2":
        cfg = T.GPT2Config(vocab_size=V, n_embd=d, n_layer=L, n_head=h, n_positions=max_len, use_cache=False,
                           bos_token_id=0, eos_token_id=0)
    elif name == "gpt_neox":
        cfg = T.GPTNeoXConfig(vocab_size=V, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=L,
                              num_attention_heads=h, max_position_embeddings=max_len, use_cache=False,
                              bos_token_id=0, eos_token_id=0)
    else:  # bert: an encoder, no LM head
        cfg = T.BertConfig(vocab_size=V, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=L,
                           num_attention_heads=h, max_position_embeddings=max_len)
        return T.AutoModel.from_config(cfg)
    return T.AutoModelForCausalLM.from_config(cfg)


def _hf_config_model(args) -> torch.nn.Module:
    """The architecture a local Hugging Face config describes (a config.json, or a directory holding one),
    random weights, as a causal LM (a seq2seq LM for an encoder-decoder) when transformers has one for it,
    else its base model. --layers, when given, replaces every stack's layer count; --vocab becomes the
    config's vocabulary size."""
    import transformers as T

    if not os.path.exists(args.hf_config):
        raise ModfxError(f"--hf-config {args.hf_config}: no such file or directory")
    try:
        cfg = T.AutoConfig.from_pretrained(args.hf_config, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModfxError(f"--hf-config {args.hf_config}: not a readable Hugging Face config ({e})") from None
    if not isinstance(getattr(cfg, "vocab_size", None), int):
        raise ModfxError(f"--hf-config {args.hf_config}: a {cfg.model_type} config has no vocab_size; the modfx "
                         "command builds token-id inputs only (use modfx.transform with your own inputs)")
    if args.layers_given:  # every stack's depth (an encoder-decoder has one per stack)
        keys = [k for k in ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers",
                            "num_decoder_layers") if isinstance(getattr(cfg, k, None), int)]
        if not keys:
            raise ModfxError(f"--layers: the {cfg.model_type} config has no layer-count field modfx knows; "
                             "set the depth in the config file instead")
        for key in keys:
            setattr(cfg, key, args.layers)
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False
    args.vocab = cfg.vocab_size
    for flag in ("d_model", "heads") + (() if args.layers_given else ("layers",)):  # the config's sizes, not
        setattr(args, flag, None)  # the flags' defaults, go into --json
    head = T.AutoModelForSeq2SeqLM if getattr(cfg, "is_encoder_decoder", False) else T.AutoModelForCausalLM
    try:
        return head.from_config(cfg)
    except ValueError:  # no such head for this architecture (an encoder)
        return T.AutoModel.from_config(cfg)


def _factory_model(args) -> torch.nn.Module:
    """`CALLABLE()` from `--factory MODULE:CALLABLE` (MODULE a .py file, imported with its folder on
    sys.path as when run as a script, or a module importable from the working directory): the user's own
    model, taking token ids [B, S] as its first input. The ids are drawn below --vocab, by default its first
    embedding's size; the flags that size the built-in models do not apply."""
    spec, _, attr = args.factory.rpartition(":")
    if not spec or not attr:
        raise ModfxError(f"--factory {args.factory}: give MODULE:CALLABLE, e.g. my_models.py:make_model or "
                         "mypkg.models:build")
    if spec.endswith(".py") and not os.path.isfile(spec):
        raise ModfxError(f"--factory {args.factory}: no such file {spec}")
    folder = os.path.dirname(os.path.abspath(spec)) if spec.endswith(".py") else os.getcwd()
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        if spec.endswith(".py"):  # this file, even if a module of its name was imported before
            loader = importlib.util.spec_from_file_location(os.path.basename(spec)[:-3], spec)
            module = sys.modules[loader.name] = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(spec)
    except Exception as e:  # noqa: BLE001 - the user's module: any error ends in one line
        raise ModfxError(f"--factory {args.factory}: cannot import {spec} ({type(e).__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ModfxError(f"--factory {args.factory}: {spec} has no callable {attr}")
    try:
        model = fn()
    except Exception as e:  # noqa: BLE001
        raise ModfxError(f"--factory {args.factory}: {attr}() failed ({type(e).__name__}: {e})") from None
    if not isinstance(model, torch.nn.Module):
        raise ModfxError(f"--factory {args.factory}: {attr}() returned a {type(model).__name__}, not an nn.Module")
    emb = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    if emb is None:
        raise ModfxError(f"--factory {args.factory}: the model has no nn.Embedding; the modfx command feeds token "
                         "ids [B, S] only (use modfx.transform with your own inputs)")
    if not args.vocab_given:
        args.vocab = emb.num_embeddings
    for flag in ("layers", "d_model", "heads"):  # not the model's: left out of --json
        setattr(args, flag, None)
    return model


def model_name(args) -> str:
    if args.factory:
        return f"factory:{args.factory}"
    if args.hf_config:
        return f"hf-config:{args.hf_config}" + (f" L={args.layers}" if args.layers_given else "")
    name = f"hf:{args.hf}" if args.hf else args.model
    return f"{name} L={args.layers} d={args.d_model} heads={args.heads} vocab={args.vocab}"


def example_ids(args, seed_offset: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(args.seed + seed_offset)
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)


def example_inputs(args, model) -> tuple[tuple, dict]:
    """(args, kwargs) of one call: token ids [B, S]; for an encoder-decoder model also decoder ids [B, S]."""
    ids = example_ids(args)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return (), {"input_ids": ids, "decoder_input_ids": example_ids(args, seed_offset=1)}
    return (ids,), {}


def build(args):
    """(dense model, MoD model, example (args, kwargs), transform seconds)."""
    log(f"building {model_name(args)} ({args.dtype}, {args.device})")
    model = build_model(args)
    inputs = example_inputs(args, model)
    log(f"transforming (capacity {args.capacity}, every {args.every}) at B={args.batch} S={args.seq}")
    t = time.perf_counter()
    mod = modfx.transform(model, inputs[0], example_kwargs=inputs[1], capacity=args.capacity, every=args.every,
                          predictor=not args.no_predictor, token_input=token_inputs(args.token_input)).eval()
    return model, mod, inputs, time.perf_counter() - t


def token_inputs(flag: str | None) -> str | tuple[str, ...] | None:
    """--token-input NAME, or NAME,NAME,... for one routed stack per input."""
    return tuple(flag.split(",")) if flag and "," in flag else flag


# --- timing and memory -------------------------------------------------------------------------------

def _first_tensor(out):
    """The first tensor among a model's outputs (logits, or a tuple/dict/ModelOutput that holds them first)."""
    return next(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def make_step(m, inputs, backward: bool):
    """One forward (no_grad) or one forward + backward of mean(first output); inputs = (args, kwargs)."""
    if not (isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[1], dict)):
        raise TypeError(f"make_step takes inputs as (args, kwargs), e.g. ((ids,), {{}}); got {type(inputs).__name__}")
    a, kw = inputs
    if not backward:
        def step():
            with torch.no_grad():
                m(*a, **kw)
    else:
        def step():
            _first_tensor(m(*a, **kw)).float().mean().backward()
            m.zero_grad(set_to_none=True)
    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(step, device: str, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return times


def round_robin(steps: dict, device: str, warmup: int, repeat: int) -> dict[str, list[float]]:
    """Warm every step up, then time them interleaved (so load drift hits every variant alike): ms lists."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {v: [] for v in steps}
    for _ in range(repeat):
        for v, step in steps.items():
            times[v] += time_ms(step, device, 1)
    return times


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _reset_peak_rss() -> bool:
    """Reset VmHWM (the peak RSS) to the current RSS, on Linux; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_method(device: str) -> str:
    if device == "cuda":
        return "torch.cuda.max_memory_allocated above allocated before the step"
    if _reset_peak_rss():
        return ("peak RSS (VmHWM, reset via /proc/self/clear_refs) above RSS before the step; "
                "large mallocs unpooled, heap trimmed")
    return "resource.getrusage ru_maxrss increase during the step (0 if it stayed under an earlier peak)"


def peak_mb(step, device: str) -> float:
    """Peak memory one step adds above what is held before it (MiB); see memory_method."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    _trim()  # else memory freed by earlier steps stays in glibc's heaps and hides this step's peak
    if _reset_peak_rss():
        base = _rss_kb("VmRSS")
        step()
        return (_rss_kb("VmHWM") - base) / 1024
    import resource

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def _unpool_large_mallocs() -> None:
    """glibc: serve every allocation >= 128 KiB with mmap and give it back on free (no dynamic threshold),
    so RSS follows what torch holds on CPU. Called after timing, before measuring memory."""
    try:
        ctypes.CDLL(None).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _trim() -> None:
    """glibc: return free heap memory to the OS. Not all of a step's large buffers come from mmap (memory
    freed by a compiled step was seen to stay resident until trimmed), so `peak_mb` trims first."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def graph_breaks(m, inputs, backward: bool) -> tuple[int, int]:
    """(graphs, graph breaks) dynamo sees in one forward. torch._dynamo.explain resets dynamo, so call
    this before compiling anything."""
    with torch.set_grad_enabled(backward):
        e = torch._dynamo.explain(m)(*inputs[0], **inputs[1])
    return e.graph_count, e.graph_break_count


# --- bench -------------------------------------------------------------------------------------------

def bench(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    model, mod, inputs, transform_s = build(args)
    for m in (model, mod):
        m.train(args.backward)
    kind = "fwd+bwd" if args.backward else "forward"
    flop = {}
    for name, m in (("dense", model), ("MoD", mod)):
        log(f"counting FLOPs ({name})")
        r = modfx.flops(m, inputs[0], example_kwargs=inputs[1])
        flop[name] = r.train_at if args.backward else r.total_at
    ks = {n: int(v) for n, v in r.at.items() if n == "k" or n.startswith("k_")}  # the MoD's: k, or one per stack
    breaks = {}
    for name, m in (("dense", model), ("MoD", mod)):  # before compiling: explain resets dynamo
        log(f"counting graph breaks ({name}, torch._dynamo.explain)")
        breaks[name] = graph_breaks(m, inputs, args.backward)

    rows, steps = [], {}
    for name, m in (("dense", model), ("MoD", mod)):
        for compiled in (False, True):
            variant = f"{name} {'compiled' if compiled else 'eager'}"
            row = {"variant": variant, "model": name, "compiled": compiled, "flops": flop[name]}
            rows.append(row)
            if not compiled:
                steps[variant] = make_step(m, inputs, args.backward)
                continue
            log(f"{variant}: compiling with Inductor (fullgraph=True, caches {'on' if args.cache else 'off'})")
            t = time.perf_counter()
            try:
                step = make_step(torch.compile(m, fullgraph=True), inputs, args.backward)
                with torch._inductor.config.patch(force_disable_caches=not args.cache), warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
                    step()  # compiles (cold unless --cache: honest compile seconds)
                sync(args.device)
            except Exception as e:  # noqa: BLE001 - reported in the table, the other variants still run
                log(f"{variant}: compile failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                continue
            row["first_call_s"] = time.perf_counter() - t
            row["graphs"], row["graph_breaks"] = breaks[name]
            steps[variant] = step

    log(f"{args.warmup} warmup + {args.repeat} timed {kind} steps per variant, round robin")
    times = round_robin(steps, args.device, args.warmup, args.repeat)
    log("measuring peak memory (one more step each)")
    if args.device == "cpu":
        _unpool_large_mallocs()
    for r in rows:
        if r["variant"] in steps:
            r["times_ms"] = times[r["variant"]]
            r["median_ms"] = statistics.median(r["times_ms"])
            if r["compiled"]:
                r["compile_s"] = max(r["first_call_s"] - r["median_ms"] / 1e3, 0.0)
            r["peak_mb"] = peak_mb(steps[r["variant"]], args.device)

    base = next((r["median_ms"] for r in rows if r["variant"] == "dense compiled" and "median_ms" in r), None)
    for r in rows:
        r["ideal_speedup"] = flop["dense"] / r["flops"]
        if base and "median_ms" in r:
            r["speedup"] = base / r["median_ms"]
            r["fraction_of_ideal"] = r["speedup"] / r["ideal_speedup"]
    p = modfx.plan(mod)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "command": "modfx " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
        "config": {k: v for k, v in vars(args).items() if k not in ("func", "argv")},
        "model": model_name(args), "timed": kind, "mode": "train" if args.backward else "eval + no_grad",
        "k": ks.get("k", ks or None), "routed_blocks": [b.name for b in p.routed], "n_blocks": len(p.blocks),
        "transform_s": transform_s, "memory": memory_method(args.device), "loadavg_1_5_15min_at_start": load_start,
        "rows": rows, "versions": versions(bool(args.hf or args.hf_config)), "machine": machine(),
    }


def versions(transformers: bool = False) -> dict:
    """Versions for a result file; transformers' too when the model came from it."""
    v = {"python": platform.python_version(), "torch": torch.__version__, "modfx": modfx.__version__}
    if transformers:
        import transformers

        v["transformers"] = transformers.__version__
    return v


def machine() -> dict:
    m = {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
         "torch_threads": torch.get_num_threads(), "loadavg_1_5_15min_at_end": os.getloadavg(),
         "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS") if k in os.environ}}
    try:
        with open("/proc/cpuinfo") as f:
            m["cpu"] = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        m["cpu"] = platform.processor()
    if torch.cuda.is_available():
        m["gpu"] = torch.cuda.get_device_name()
    return m


def bench_table(res: dict) -> str:
    rows = []
    for r in res["rows"]:
        if "error" in r:
            rows.append((r["variant"], _num(r["flops"] / 1e9), f"{r['ideal_speedup']:.2f}x", "failed: " + r["error"][:60]))
            continue
        t = r["times_ms"]
        rows.append((
            r["variant"], _num(r["flops"] / 1e9), f"{r['ideal_speedup']:.2f}x", _num(r["median_ms"]),
            f"{_num(min(t))}-{_num(max(t))}", _num(r["flops"] / r["median_ms"] / 1e6),
            f"{r['speedup']:.2f}x" if "speedup" in r else "-",
            f"{r['fraction_of_ideal']:.2f}" if "fraction_of_ideal" in r else "-",
            f"{r['compile_s']:.1f}" if "compile_s" in r else "-", f"{r['peak_mb']:.0f}",
            r.get("graph_breaks", "-"),
        ))
    headers = ["variant", f"GFLOPs ({res['timed']})", "ideal speedup", "median ms", "min-max ms", "GFLOP/s",
               "speedup vs dense compiled", "fraction of ideal", "compile s", "peak MiB", "graph breaks"]
    c = res["config"]
    head = (f"modfx bench: {res['model']}, B={c['batch']} S={c['seq']} {c['dtype']} {c['device']}, "
            f"{res['timed']} ({res['mode']}), capacity {c['capacity']} ({_ks(res['k'])}), "
            f"{len(res['routed_blocks'])}/{res['n_blocks']} blocks routed, transform {res['transform_s']:.1f} s")
    foot = (f"median of {c['repeat']} (variants interleaved) after {c['warmup']} warmup, {res['machine']['torch_threads']} threads\n"
            f"compile s = first call (Inductor caches {'on' if c['cache'] else 'off'}) minus one median step\n"
            f"peak MiB = {res['memory']}\ngraph breaks from torch._dynamo.explain")
    load = (f"\nload average (1 min) {res['loadavg_1_5_15min_at_start'][0]:.2f} at start, "
            f"{res['machine']['loadavg_1_5_15min_at_end'][0]:.2f} at end on {res['machine']['cpu_count']} CPUs")
    return f"{head}\n{tabulate(rows, headers=headers, disable_numparse=True)}\n{foot}{load}"


def _ks(k) -> str:
    """k=16, or k_input_ids=64, k_decoder_input_ids=64 with one routed stack per input."""
    return ", ".join(f"{n}={v}" for n, v in k.items()) if isinstance(k, dict) else f"k={k}"


def _num(x: float) -> str:
    """Readable without exponents: 12345, 123.4, 1.234, 0.001234."""
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def cmd_bench(args) -> int:
    res = bench(args)
    print(bench_table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        log(f"wrote {args.json}")
    return 0


# --- inspect, flops ----------------------------------------------------------------------------------

def cmd_inspect(args) -> int:
    _, mod, _, _ = build(args)
    if args.routing != "topk":
        modfx.set_routing(mod, args.routing)
    mod.train(args.train)
    print(modfx.plan(mod))
    graph = mod.modfx_graphs[(args.routing, mod.training)]
    print(f"\ngraph ({args.routing}, {'train' if mod.training else 'eval'}): {len(graph.nodes)} nodes")
    try:
        from modfx.snapshot import render
    except ImportError:
        render = None
    print(render(graph, mod.modfx_capture.seq_expr) if render else _listing(graph))
    return 0


def _listing(graph) -> str:
    """One line per node: name = target(args)  # shape (fallback when modfx.snapshot is missing)."""
    def arg(a):
        if isinstance(a, torch.fx.Node):
            return a.name
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(map(arg, a)) + "]"
        return repr(a)

    lines = []
    for n in graph.nodes:
        val = n.meta.get("val")
        shape = f"  # {list(val.shape)}" if isinstance(val, torch.Tensor) else ""
        target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        lines.append(f"{n.name} = {n.op}:{target}({', '.join(map(arg, n.args))}){shape}")
    return "\n".join(lines)


def cmd_flops(args) -> int:
    model, mod, (a, kw), _ = build(args)
    log("counting FLOPs")
    dense, routed = modfx.flops(model, a, example_kwargs=kw), modfx.flops(mod, a, example_kwargs=kw)
    print(routed)
    rows = [(name, _num(d / 1e9), _num(m / 1e9), f"{d / m:.2f}x")
            for name, d, m in (("forward", dense.total_at, routed.total_at),
                               ("forward + backward", dense.train_at, routed.train_at))]
    print(f"\ndense vs MoD at B={args.batch} S={args.seq}")
    print(tabulate(rows, headers=["", "dense GFLOPs", "MoD GFLOPs", "ideal speedup"], disable_numparse=True))
    return 0


# --- arguments ---------------------------------------------------------------------------------------

def positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return n


def parser() -> argparse.ArgumentParser:
    model = argparse.ArgumentParser(add_help=False)
    g = model.add_argument_group("model")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model", choices=("gpt", "llama", "encoder", "moe"), default="llama", help="reference model")
    src.add_argument("--hf", choices=HF_MODELS, help="small Hugging Face model, random weights (needs transformers)")
    src.add_argument("--hf-config", metavar="PATH", help="a local Hugging Face config.json (or its directory), random "
                     "weights, as configured: only --layers applies")
    src.add_argument("--factory", metavar="MODULE:CALLABLE", help="your own model: CALLABLE() from MODULE (importable, "
                     "or a .py file) returns it; it takes token ids [B, S] first, below its first embedding's size")
    g.add_argument("--layers", type=positive, default=None, help="blocks (default 8)")
    g.add_argument("--d-model", type=positive, default=256)
    g.add_argument("--heads", type=positive, default=8)
    g.add_argument("--vocab", type=positive, default=None, help="default 256 (--factory: its first embedding's size)")
    g.add_argument("--batch", type=positive, default=2)
    g.add_argument("--seq", type=positive, default=512)
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    g.add_argument("--seed", type=int, default=0)
    t = model.add_argument_group("transform")
    t.add_argument("--capacity", type=float, default=0.125)
    t.add_argument("--every", type=int, default=2)
    t.add_argument("--no-predictor", action="store_true", help="transform without the causal predictor branch")
    t.add_argument("--token-input", metavar="NAME", help="route the blocks over this input's tokens, e.g. "
                   "decoder_input_ids for the decoder of an encoder-decoder model (--hf-config); NAME,NAME routes "
                   "one stack per input, e.g. input_ids,decoder_input_ids both stacks")

    ap = argparse.ArgumentParser(prog="modfx", description="Mixture-of-Depths as a compiler transformation")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", parents=[model], help="compile dense and MoD with Inductor and time them")
    b.add_argument("--backward", action="store_true", help="time forward + backward (train mode)")
    b.add_argument("--repeat", type=positive, default=5, help="timed steps per variant (the median is reported)")
    b.add_argument("--warmup", type=int, default=1, help="untimed steps per variant after compiling")
    b.add_argument("--cache", action="store_true", help="let Inductor use its compile caches (compile s may be cache hits)")
    b.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    b.add_argument("--json", metavar="PATH", help="also write the numbers, versions and machine as JSON")
    b.set_defaults(func=cmd_bench)
    i = sub.add_parser("inspect", parents=[model], help="print the plan and the transformed graph")
    i.add_argument("--routing", choices=("topk", "predictor"), default="topk")
    i.add_argument("--train", action="store_true", help="show the training-mode graph")
    i.set_defaults(func=cmd_inspect)
    f = sub.add_parser("flops", parents=[model], help="FLOP report of the MoD model, and the ideal speedup")
    f.set_defaults(func=cmd_flops)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    args.argv = argv
    args.layers_given = args.layers is not None
    args.layers = args.layers or 8
    args.vocab_given = args.vocab is not None
    args.vocab = args.vocab or 256
    if args.hf or args.hf_config or args.factory:
        args.model = None
    if args.factory and args.layers_given:
        ap.error("--layers does not apply to --factory: the factory builds the model as it is")
    if args.d_model % args.heads and not (args.hf_config or args.factory):
        ap.error(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}")
    rope = args.hf in ("llama", "mistral", "qwen2", "gpt_neox") or args.model in ("llama", "moe")
    if rope and (args.d_model // args.heads) % 2:
        ap.error(f"the head dimension --d-model / --heads = {args.d_model // args.heads} must be even (RoPE)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("modfx: --device cuda but torch.cuda.is_available() is False")
    try:
        return args.func(args)
    except ModfxError as e:
        raise SystemExit(f"modfx: error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
