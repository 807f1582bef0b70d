"""Capture: `torch.export` (non-strict) of a copy of the user's model, with the batch and token axes of
its inputs dynamic, in the training modes whose graphs differ (dropout fixes its mode at capture)."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import operator
import re
import types
import warnings

import sympy
import torch
from torch import nn
from torch.export import Dim
from torch.fx import Graph, GraphModule
from torch.utils import _pytree as pytree

from .errors import ModfxError
from .passes.graph_utils import token_axis_length


@dataclasses.dataclass
class Capture:
    graphs: dict[bool, Graph]  # by `training`; one graph for both when the mode changes nothing
    modules: dict[bool, GraphModule]  # the unlifted modules the graphs came from (own the weights)
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    seq_exprs: tuple  # length of each routed stack's token axis (a symbol when dynamic), one per token_input
    example_inputs: tuple[tuple, dict]
    twin: nn.Module  # the private copy that was exported; shares its parameters with the graphs
    specialised: frozenset = frozenset()  # (input, axis): dynamic in the export spec, a number in the graph

    @property
    def seq_expr(self) -> sympy.Expr | None:
        """The first routed stack's token-axis length (the only one unless token_input names several)."""
        return self.seq_exprs[0]


def specialised_axes(graph: Graph) -> frozenset:
    """(placeholder name, axis) of every input axis whose size is a SymInt that resolves to a number: the
    model fixed it (e.g. Whisper's mel bins, read by a convolution), so it is static after all."""
    return frozenset((n.name, i) for n in graph.find_nodes(op="placeholder") if isinstance(n.meta.get("val"), torch.Tensor)
                     for i, d in enumerate(n.meta["val"].shape) if isinstance(d, torch.SymInt) and d.node.expr.is_number)


def dynamic_shapes_for(args: tuple, kwargs: dict):
    """Batch and token axes dynamic: ids/masks [B, S, ...] and hidden-like floats [B, S, F] get both (in
    either order: a sequence-first [S, B, F] is told apart later by its attention, `token_axis_length`);
    images and other inputs keep static token axes (their sequence is derived inside the model)."""

    def spec(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        if has_token_axis(t):
            return {0: Dim.AUTO, 1: Dim.AUTO}
        return {0: Dim.AUTO}

    return pytree.tree_map(spec, args), pytree.tree_map(spec, kwargs)


def has_token_axis(t: torch.Tensor) -> bool:
    """An input whose axes 0 and 1 are captured dynamic: ids and masks [B, S, ...], hidden states [B, S, F]."""
    return t.dim() == 2 or (t.dim() == 3 and t.is_floating_point()) or (t.dim() >= 2 and not t.is_floating_point())


def _mode_dependent(graph: Graph) -> bool:
    """True if the graph holds an op whose result depends on the training flag it was captured in
    (an argument named train/training set, or a dropout probability > 0)."""
    for n in graph.nodes:
        schema = getattr(n.target, "_schema", None)
        if n.op != "call_function" or schema is None:
            continue
        for i, a in enumerate(schema.arguments):
            v = n.args[i] if i < len(n.args) else n.kwargs.get(a.name, a.default_value)
            if a.name in ("train", "training") and (v is True or "batch_norm" in str(n.target)):
                return True  # (a batch norm captured in eval normalises by running statistics)
            if a.name in ("p", "dropout_p") and isinstance(v, float) and v > 0 and "dropout" in str(n.target) + a.name:
                return True
    return False


def _export(model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    dyn_args, dyn_kwargs = dynamic_shapes_for(args, kwargs)
    if kwargs and _through_var_parameters(model, len(args), kwargs):
        # torch.export checks a dynamic_shapes dict against the inputs with those of **kwargs moved to the top
        # level, so no spec passes; non-strict export also reads dynamic-axis marks on the inputs themselves
        args, kwargs, dynamic = _marked(args, dyn_args), _marked(kwargs, dyn_kwargs), None
    else:
        dynamic = (*dyn_args, *dyn_kwargs.values()) if not kwargs else {**_arg_names(model, dyn_args), **dyn_kwargs}
    try:
        # Captured under no_grad: grad-mode regions (e.g. RoPE tables built under torch.no_grad in a
        # model) then stay plain ops instead of set_grad_enabled subgraphs, which recompile badly. The
        # graph still records every op, so it differentiates when run with grad enabled.
        with torch.no_grad():
            return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as e:  # noqa: BLE001 - re-raised with advice, cause kept
        first = str(e).splitlines()[0] if str(e) else ""
        advice = ("modfx needs a model torch.export can trace: no data-dependent Python control flow (branches on "
                  "tensor values, .item()), no unsupported Python side effects. Rewrite such branches with "
                  "torch.where / torch.cond, or check `torch.export.export(model, example_inputs, strict=False)` alone.")
        if re.search(r"Cache'?>? in output", first):
            advice = ("The model returns its KV cache (a Hugging Face model built with use_cache=True): build it with "
                      "use_cache=False (e.g. model.config.use_cache = False); modfx.generate keeps caches of its own.")
        raise ModfxError(f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: {first}\n{advice}") from e


def copy_of(model: nn.Module) -> nn.Module:
    """`copy.deepcopy(model)`, with the functions its modules keep as attributes re-pointed at the copy.
    deepcopy shares a function object, so a closure over a submodule (minGPT's `self.mlpf = lambda x:
    m.c_proj(m.act(m.c_fc(x)))`) or a bound method of one would still run the original's weights."""
    memo: dict = {}
    twin = copy.deepcopy(model, memo)
    for m in twin.modules():
        for name, value in list(vars(m).items()):
            moved = _rebound(value, memo)
            if moved is not value:
                setattr(m, name, moved)
    return twin


def _rebound(fn, memo: dict):
    """`fn` calling the copies (by deepcopy's `memo`) of the objects its closure cells or `__self__` hold."""
    if isinstance(fn, types.MethodType) and id(fn.__self__) in memo:
        return types.MethodType(fn.__func__, memo[id(fn.__self__)])
    if isinstance(fn, types.FunctionType) and fn.__closure__ and any(id(c.cell_contents) in memo for c in fn.__closure__):
        cells = tuple(types.CellType(memo.get(id(c.cell_contents), c.cell_contents)) for c in fn.__closure__)
        new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, cells)
        new.__kwdefaults__, new.__dict__ = fn.__kwdefaults__, dict(fn.__dict__)
        return new
    return fn


def _check_owns_its_weights(ep: torch.export.ExportedProgram, model: nn.Module, twin: nn.Module) -> None:
    """The exported copy must compute with its own parameters as parameters: a tensor that export lifted
    as a constant would be frozen, and, if it is the user's model's, shared with it."""
    weights = {t.data_ptr(): name for m in (model, twin) for name, t in m.named_parameters() if t.numel()}
    theirs = {t.data_ptr(): name for name, t in model.named_buffers() if t.numel()} if twin is not model else {}
    mine = {**theirs, **weights}
    shared = [mine[t.data_ptr()] for t in ep.constants.values() if isinstance(t, torch.Tensor) and t.numel()
              and t.data_ptr() in mine]
    if shared:
        raise ModfxError(
            f"the model reaches {', '.join(dict.fromkeys(shared[:4]))}{' ...' if len(shared) > 4 else ''} other than "
            "as a module's attribute (e.g. a closure over a parameter, a function kept in a list, a global "
            "reference to the model), so export holds it as a constant: the transformed model would never train "
            "it (and would share it with your model). Read parameters through their modules (self.fc.weight, or "
            "call self.fc) in forward, or in a lambda stored as a module attribute that calls the submodules."
        )


def _mark_causal_tables(gm: GraphModule) -> None:
    """Tag the constant tables [..., N, N] whose entries say only whether a column is at or before the row
    (minGPT's float `tril(ones)` buffer, a `triu(-inf, 1)` mask): `meta['modfx_causal_table']`. Such a
    table, sliced [:T, :T], is as right on the k chosen tokens as on all of them (they keep their order);
    other tables sliced by the length read positions (discover.py refuses those)."""
    for n in gm.graph.find_nodes(op="get_attr"):
        try:
            t = operator.attrgetter(n.target)(gm)
        except AttributeError:
            continue
        learnable = isinstance(t, nn.Parameter) or getattr(t, "requires_grad", False)  # may stop being causal
        if isinstance(t, torch.Tensor) and not learnable and _is_causal_table(t):
            n.meta["modfx_causal_table"] = True


def _is_causal_table(t: torch.Tensor) -> bool:
    if t.dim() < 2 or t.shape[-1] != t.shape[-2] or t.shape[-1] < 2 or t.numel() > 1 << 26 or t.is_complex():
        return False
    lower = torch.ones(t.shape[-2:], dtype=torch.bool, device=t.device).tril()
    at, after = t[..., lower], t[..., ~lower]  # [..., N(N+1)/2], [..., N(N-1)/2]
    a, b = at.flatten()[0], after.flatten()[0]
    return bool((at == a).all() and (after == b).all() and a != b)


def _warn_about_hooks(model: nn.Module) -> None:
    kinds = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
    hooked = [name or type(model).__name__ for name, m in model.named_modules() if any(getattr(m, k, None) for k in kinds)]
    if hooked:
        shown = ", ".join(hooked[:5]) + (f" and {len(hooked) - 5} more" if len(hooked) > 5 else "")
        warnings.warn(
            f"modules with hooks: {shown}. modfx captures the model once with torch.export: the hooks run "
            "during that capture only (on fake tensors), what they compute becomes part of the graph, and "
            "they do not run when the transformed module is called. Remove them before modfx.transform if "
            "that is not what you want.", stacklevel=4)


def _through_var_parameters(model: nn.Module, n_args: int, kwargs: dict) -> bool:
    """Does forward take some of these inputs through `*args` or `**kwargs`?"""
    params = list(inspect.signature(model.forward).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return n_args > len(positional) or any(k not in named for k in kwargs)


def _marked(inputs, specs):
    """The inputs as new tensor objects (the caller's are left unmarked) with their dynamic axes marked."""

    def mark(t, spec):
        if not isinstance(t, torch.Tensor):
            return t
        t = t.detach().requires_grad_(t.requires_grad)
        for axis in spec or {}:
            torch._dynamo.maybe_mark_dynamic(t, axis)
        return t

    return pytree.tree_map(mark, inputs, specs, is_leaf=lambda x: x is None)


def _arg_names(model: nn.Module, dyn_args: tuple) -> dict:
    names = [p for p in inspect.signature(model.forward).parameters]
    return dict(zip(names, dyn_args))


def _drop_dtype_asserts(graph: Graph) -> None:
    """Export asserts the dtype a `.to()` saw at capture (`_assert_tensor_metadata`). Under autocast the
    same value may be bf16 at run time, which the model itself accepts, so the asserts go."""
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target is torch.ops.aten._assert_tensor_metadata.default and not n.users:
            graph.erase_node(n)


def capture(model: nn.Module, args: tuple, kwargs: dict, *, copy_model: bool = True,
            token_input: str | tuple[str, ...] | None = None) -> Capture:
    """Export a deep copy of `model` (the user's model is never touched); copy_model=False exports
    `model` itself (a twin made by an earlier capture, after `.to()`). `token_input` names the input
    whose token axis the routed blocks run over (default: the first input's), or a tuple of names, one per
    routed stack."""
    if copy_model:
        _warn_about_hooks(model)
    # a view such as data[:, :-1] would be captured with its strides, and export's guards would then
    # refuse every contiguous input: the example's layout is not the model's business
    args, kwargs = pytree.tree_map(lambda t: t.contiguous() if isinstance(t, torch.Tensor) else t, (args, kwargs))
    twin = copy_of(model) if copy_model else model
    ep = _export(twin, args, kwargs)
    _check_owns_its_weights(ep, model, twin)
    first = twin.training
    modules = {first: ep.module()}
    if _mode_dependent(modules[first].graph):
        twin.train(not first)
        modules[not first] = _export(twin, args, kwargs).module()
    else:
        modules[not first] = modules[first]
    graphs = {mode: gm.graph for mode, gm in modules.items()}
    for graph in dict.fromkeys(graphs.values()):
        _drop_dtype_asserts(graph)
    for gm in dict.fromkeys(modules.values()):
        _mark_causal_tables(gm)

    names = token_input if isinstance(token_input, tuple) else (token_input,)
    seqs = tuple(token_axis_length(modules[first].graph, name) for name in names)
    if len(set(seqs)) != len(seqs):
        raise ModfxError(f"token_input={token_input!r}: these inputs share one token axis ({seqs[0]}): export "
                         "found their lengths equal in the model, so they are one sequence; name one of them")
    return Capture(
        graphs,
        modules,
        modules[first]._in_spec,
        modules[first]._out_spec,
        seqs,
        (args, kwargs),
        twin,
        specialised_axes(modules[first].graph),
    )
