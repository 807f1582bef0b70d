"""The public API: transform, plan, set_routing, routing_stats, aux_loss."""

from __future__ import annotations

import copy
import inspect
import dataclasses
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .capture import capture, has_token_axis
from .config import MoDConfig
from .errors import ModfxError
from .module import ROUTING_MODES, MoDModule, program
from .passes import run_pipeline
from .passes.flops import check_budget
from .plan import Plan, make_plan


def transform(model: nn.Module, example_inputs: tuple | Any = None, config: MoDConfig | None = None, *,
              example_kwargs: dict | None = None, **overrides) -> MoDModule:
    """Turn `model` into a Mixture-of-Depths model.

    Args:
        model: any nn.Module that torch.export can capture and whose graph holds repeated residual
            blocks (e.g. `layers.0..N`). It is not modified.
        example_inputs: a tuple of positional example arguments (a single tensor is accepted too).
        config: a `MoDConfig`; keyword `overrides` (capacity=, every=, ...) replace its fields.
        example_kwargs: keyword example arguments.

    Returns:
        A new `nn.Module` with the same call signature and output structure as `model`, in which the
        routed blocks process only the top-k tokens of each sequence.

    Example:
        >>> mod = modfx.transform(model, (ids,), capacity=0.125, every=2)
    """
    if not isinstance(model, nn.Module):
        raise ModfxError(f"transform expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):  # torch.compile(model): capture the model
        model = model._orig_mod
    if isinstance(model, MoDModule):
        raise ModfxError("this module is already the result of modfx.transform; transform the original model "
                         "(with another config if needed) instead")
    config = config or MoDConfig()
    if not isinstance(config, MoDConfig):
        raise ModfxError(f"config must be a modfx.MoDConfig, got {type(config).__name__}")
    try:
        config = dataclasses.replace(config, **overrides)
    except TypeError as e:
        fields = ", ".join(f.name for f in dataclasses.fields(MoDConfig))
        raise ModfxError(f"unknown MoDConfig field in {sorted(overrides)}; fields are: {fields}") from e
    args, kwargs = _normalise_inputs(example_inputs, example_kwargs)
    if not args and not kwargs:
        args, kwargs = infer_example_inputs(model)

    args, kwargs = _long_enough(*_batch_of_two(args, kwargs), config, inspect.signature(model.forward))
    cap = capture(model, args, kwargs, token_input=config.token_input)
    mod = MoDModule(next(iter(cap.modules.values())))
    type(mod).forward.__signature__ = _signature(model)
    mod.train(model.training)
    mod._in_spec, mod._out_spec = cap.in_spec, cap.out_spec
    mod._n_outputs = cap.out_spec.num_leaves
    mod._kw_order = tuple(kwargs)
    mod._input_sizes = _input_sizes(cap)
    mod._n_args = len(args)
    mod._model_signature = inspect.signature(model.forward)
    mod.modfx_config = config
    mod.modfx_capture = cap
    result = _build(mod, "topk")
    mod.modfx_plan = make_plan(result, config, cap)
    return mod


def _build(mod: MoDModule, mode: str):
    """Rewrite a copy of each captured graph for routing `mode` and install it as a program of `mod`.
    Graph variants share the routers and predictors, which the first rewrite creates on `mod`."""
    cap, config = mod.modfx_capture, mod.modfx_config
    _check_still_symbolic(cap)
    built = {}
    for training, graph in cap.graphs.items():
        if id(graph) in built:  # the capture is the same in both modes
            mod._programs[(mode, training)], mod.modfx_graphs[(mode, training)] = built[id(graph)]
            continue
        with warnings.catch_warnings():  # deep-copying the pytree codegen warns on torch 2.13
            warnings.simplefilter("ignore", FutureWarning)
            g = copy.deepcopy(graph)
        result = run_pipeline(g, mod, config, cap.seq_exprs, mode)
        out = g.output_node()
        out.args = (tuple(out.args[0]) + tuple(result.stats) + ((result.aux,) if result.aux is not None else ()),)
        if config.check_flops:
            names = [b.name for b in result.blocks]
            check_budget(g, graph, names, [names[i] for i in result.routed], cap.seq_exprs)
        mod.adopt_attrs(cap.modules[training], g)
        built[id(graph)] = mod._programs[(mode, training)], mod.modfx_graphs[(mode, training)] = program(mod, g), g
    return result


def _recapture(mod: MoDModule, fn) -> None:
    """Capture the twin again after `fn` (a `.to()` conversion) and rebuild every graph variant."""
    from torch.utils import _pytree as pytree

    old = mod.modfx_capture
    twin = old.twin._apply(fn)
    args, kwargs = pytree.tree_map(lambda t: fn(t) if isinstance(t, torch.Tensor) else t, old.example_inputs)
    mod.modfx_capture = capture(twin, args, kwargs, copy_model=False, token_input=mod.modfx_config.token_input)
    mod.__dict__.pop("modfx_decoders", None)  # generate's programs were built from the old capture
    modes = {mode for mode, _ in mod._programs}
    mod._programs.clear()
    mod.modfx_graphs.clear()
    for mode in sorted(modes, key=ROUTING_MODES.index):
        _build(mod, mode)


def plan(mod: nn.Module) -> Plan:
    """What `transform` found and did: one row per block (name, index, routed, capacity, side inputs)."""
    p = getattr(mod, "modfx_plan", None)
    if p is None:
        raise ModfxError(f"{type(mod).__name__} is not a modfx-transformed module; call modfx.transform(model, ...) first")
    return p


def set_routing(mod: nn.Module, mode: str) -> nn.Module:
    """Route with top-k over the sequence ("topk", training) or the causal predictor ("predictor")."""
    plan(mod)
    if mode not in ROUTING_MODES:
        raise ModfxError(f"unknown routing mode {mode!r}; choose one of {', '.join(ROUTING_MODES)}")
    if mode == "predictor" and not mod.modfx_config.predictor:
        raise ModfxError("routing mode 'predictor' is not available: the transform was built with predictor=False")
    if (mode, mod.training) not in mod._programs:
        _build(mod, mode)  # raises ModfxError when a block's attention cannot be limited to selected tokens
    mod._routing = mode
    return mod


def routing_stats(mod: nn.Module) -> dict[str, dict[str, float]]:
    """Per routed block, from the last forward: the predictor's aux (BCE) loss, its accuracy, precision
    and recall against top-k membership, and the fraction of tokens it selects. In predictor routing
    only `selected` is defined (the others are nan)."""
    p = plan(mod)
    names = ("aux_loss", "accuracy", "precision", "recall", "selected")
    return {b.name: dict(zip(names, s.tolist())) for b, s in zip(p.routed, mod._stats)}


def aux_loss(mod: nn.Module) -> torch.Tensor:
    """The weighted sum of the routing aux losses of the last forward (the predictor's BCE times
    aux_loss_weight, the router's times router_aux_weight), a scalar to add to the loss you differentiate:
    `loss = task_loss + modfx.aux_loss(mod)`, scaled with it. For modules transformed with
    aux_in_backward=False; by default these losses ride along in backward() instead."""
    plan(mod)
    if mod.modfx_config.aux_in_backward:
        raise ModfxError("the aux losses of this module ride along in backward() (aux_in_backward=True, the default): "
                         "adding them to the loss would count them twice. Transform with aux_in_backward=False to "
                         "add them yourself, e.g. when the loss is scaled (GradScaler, gradient accumulation)")
    if mod._aux is None:
        raise ModfxError("modfx.aux_loss(mod) reads the last forward's aux losses: call the module first")
    return mod._aux


def routing_parameters(mod: nn.Module) -> list[nn.Parameter]:
    """The routers' and predictors' parameters, e.g. for an optimizer group with its own learning rate."""
    plan(mod)
    return [p for n, p in mod.named_parameters() if ".mod_router." in n or ".mod_predictor." in n]


def trainable_routing_parameters(mod: nn.Module) -> list[nn.Parameter]:
    """Freeze every parameter but the routers' and predictors' (to convert a trained dense model) and
    return those."""
    routing = routing_parameters(mod)
    keep = {id(p) for p in routing}
    for p in mod.parameters():
        p.requires_grad_(id(p) in keep)
    return routing


def _signature(model: nn.Module) -> inspect.Signature:
    """The transformed module's advertised signature: the model's own named parameters (tools such as the
    HF Trainer read it to pick inputs), without *args/**kwargs, since the capture fixed the inputs."""
    named = [p for p in inspect.signature(model.forward).parameters.values()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *named])


def _placeholders(cap) -> list:
    """The captured graph's inputs, one per flat example input (train and eval captures take the same)."""
    return list(next(iter(cap.graphs.values())).find_nodes(op="placeholder"))


def _check_still_symbolic(cap) -> None:
    """The graphs' fake values share one shape environment. `bool(size == 24)` on a symbolic size read off
    `mod.modfx_graphs` adds a guard there that fixes the symbol, and a graph rewritten afterwards (another
    routing mode) would see a static size; say so instead of failing in discovery."""
    fixed = {}  # a SymInt whose expression the shape environment now resolves to a number
    for n in _placeholders(cap):
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            fixed.update({f"{n.name}.shape[{i}]": int(d.node.expr) for i, d in enumerate(val.shape)
                          if isinstance(d, torch.SymInt) and d.node.expr.is_number and (n.name, i) not in cap.specialised})
    if fixed:
        raise ModfxError(
            f"the symbolic input sizes of this transformed module were fixed after the transform ({fixed}): code "
            "turned a comparison of a symbolic size from mod.modfx_graphs into a bool (e.g. "
            "`node.meta['val'].shape[1] == 24` in an if), which adds a guard to the graphs' shared shape "
            "environment. Transform the model again, and compare such sizes as strings or with "
            "torch.fx.experimental.symbolic_shapes.statically_known_true."
        )


def _input_sizes(cap) -> tuple:
    """Per flat input of the capture: (its name, its sizes with None for a symbolic axis), or None."""
    paths = [("args" if path[0].idx == 0 else "kwargs") + pytree.keystr(path[1:])
             for path, _ in pytree.tree_flatten_with_path(cap.example_inputs)[0]]
    out = []
    for name, node in zip(paths, _placeholders(cap)):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            out.append(None)
            continue
        sizes = tuple(d if isinstance(d, int) else int(d.node.expr) if d.node.expr.is_number else None for d in val.shape)
        out.append((name, sizes))
    return tuple(out)


def _batch_of_two(args: tuple, kwargs: dict):
    """Repeat a batch-1 example (every input of 2 or more axes of leading size 1) to batch 2: export
    specialises a dynamic axis of size 1 to the constant 1, and the transformed model would run at batch 1
    only. A 1-D input goes along only at length 1: a longer one is per token (positions [S]), not per sample."""
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() >= 1]
    batched = [t for t in tensors if t.dim() >= 2] or tensors
    if not batched or any(t.shape[0] != 1 for t in batched):
        return args, kwargs

    def double(t):
        return torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == 1 else t

    return pytree.tree_map(double, (args, kwargs))


def _long_enough(args: tuple, kwargs: dict, config: MoDConfig, signature: inspect.Signature):
    """Repeat the example along its token axis until k >= 2: with k = 1 at capture, shape propagation
    specialises the routed block's token count to the constant 1, and the symbolic sizes no longer match."""
    leaves = pytree.tree_leaves((args, kwargs))
    seqs = [t.shape[1] for t in leaves if isinstance(t, torch.Tensor) and t.dim() >= 2 and not t.is_floating_point()][:1]
    if config.token_input is not None:  # the routed blocks' tokens are those inputs', by position or keyword
        try:
            bound = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = {}
        named = [bound.get(name) for name in config.token_inputs]
        seqs = [t.shape[1] for t in named if isinstance(t, torch.Tensor) and has_token_axis(t)] or seqs
    if 0 in seqs:
        raise ModfxError("the example inputs have an empty token axis (length 0): give at least one token")
    reps = {S: next(m for m in range(2, 1 << 16) if config.k(S * m) >= 2) for S in seqs if config.k(S) < 2}
    if not reps:
        return args, kwargs

    batches = {t.shape[0] for t in leaves if isinstance(t, torch.Tensor) and has_token_axis(t)}

    def lengthen(t):
        if isinstance(t, torch.Tensor) and has_token_axis(t) and t.shape[1] in reps:
            return torch.cat([t] * reps[t.shape[1]], dim=1)
        if isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] in reps and t.shape[0] not in batches:
            return torch.cat([t] * reps[t.shape[0]])  # per token (positions [S]); [B] if B == S: left alone
        return t

    return pytree.tree_map(lengthen, (args, kwargs))


def _normalise_inputs(example_inputs, example_kwargs):
    import torch

    if example_inputs is None:
        args = ()
    elif isinstance(example_inputs, torch.Tensor):
        args = (example_inputs,)
    elif isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
    elif isinstance(example_inputs, dict) and example_kwargs is None:
        args, example_kwargs = (), example_inputs
    else:
        raise ModfxError(
            f"example_inputs must be a tuple of positional arguments (or one tensor), got {type(example_inputs).__name__}; "
            "e.g. modfx.transform(model, (input_ids,)) or modfx.transform(model, example_kwargs={'input_ids': ids})"
        )
    kwargs = dict(example_kwargs or {})
    return args, kwargs


def infer_example_inputs(model: nn.Module) -> tuple[tuple, dict]:
    """Example inputs for a model given none, from what its first layers take (never from its name):
    `dummy_inputs` when the model offers them (Hugging Face models), else by its first embedding, conv
    or linear layer: token ids [2, 16] below the vocabulary, an image [2, C, H, W] of the configured size,
    or features [2, 16, in_features]."""
    dummy = getattr(model, "dummy_inputs", None)
    if isinstance(dummy, dict) and dummy and all(isinstance(v, torch.Tensor) for v in dummy.values()):
        return (), {k: _lengthen(v) for k, v in dummy.items()}
    first = next((m for m in model.modules() if isinstance(m, (nn.Embedding, nn.Conv2d, nn.Linear))), None)
    g = torch.Generator().manual_seed(0)
    if isinstance(first, nn.Embedding):
        return (torch.randint(0, first.num_embeddings, (2, 16), generator=g),), {}
    if isinstance(first, nn.Conv2d):
        size = getattr(getattr(model, "config", None), "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (torch.randn(2, first.in_channels, h, w, generator=g),), {}
    if isinstance(first, nn.Linear):
        return (torch.randn(2, 16, first.in_features, generator=g),), {}
    raise ModfxError(
        f"cannot infer example inputs for {type(model).__name__} (no embedding, conv or linear input layer "
        "found); pass them: modfx.transform(model, (input_ids,)) or modfx.transform(model, "
        "example_kwargs={'input_ids': ids, 'attention_mask': mask})"
    )


def _lengthen(t: torch.Tensor) -> torch.Tensor:
    """HF dummy inputs are [3, 5]: use batch 2 and 16 tokens so the axes stay distinct and dynamic."""
    if t.dim() == 2 and not t.is_floating_point():
        return t.repeat(1, 4)[:2, :16].contiguous()
    return t
