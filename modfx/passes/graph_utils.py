"""Small helpers the passes share: creating nodes that carry `meta['val']` and `nn_module_stack`,
re-propagating fake values after a rewrite, and reading symbolic sizes."""

from __future__ import annotations

import operator
import weakref
from typing import Any, Callable, Iterable

import sympy
import torch
from torch.utils._sympy import functions as _sympy_fns
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch.fx import Graph, Node
from torch.fx.node import map_aggregate

from ..errors import ModfxError

aten = torch.ops.aten


_fake_modes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Graph -> the fake mode of its values


def fake_mode_of(graph: Graph):
    """The fake mode of the graph's meta['val'] tensors, looked up once per graph: passes ask for it at every
    node they insert, and scanning the graph each time cost ~8% of a transform's passes."""
    mode = _fake_modes.get(graph)
    if mode is None:
        vals = [n.meta["val"] for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
        mode = detect_fake_mode(vals)
        if mode is None:
            raise RuntimeError("graph carries no fake tensor values (meta['val']); capture it with torch.export")
        _fake_modes[graph] = mode
    return mode


def val_of(arg: Any) -> Any:
    """Replace every Node in `arg` by its meta['val']."""
    return map_aggregate(arg, lambda a: a.meta["val"] if isinstance(a, Node) else a)


def run_fake(target: Callable, args: tuple, kwargs: dict, fake_mode) -> Any:
    # The Python dispatcher (as in export's own tracing) runs composite ops such as linear through their
    # SymInt-aware decompositions; without it torch 2.11 reads sizes as ints and specializes B and S.
    with fake_mode, enable_python_dispatcher():
        return target(*val_of(args), **val_of(kwargs))


def call(graph: Graph, target: Callable, args: tuple, kwargs: dict | None = None, *, stack=None,
         tag: str | None = None) -> Node:
    """Insert `target(*args, **kwargs)` at the graph's insertion point with meta['val'] filled in.

    `stack` is the nn_module_stack the node is attributed to (that of the block it belongs to), and
    `tag` names the role of the node for later passes (router, topk, gather, scatter, predictor, ...).
    """
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    node.meta["val"] = run_fake(target, args, kwargs, fake_mode_of(graph))
    if stack is not None:
        node.meta["nn_module_stack"] = dict(stack)
    if tag is not None:
        node.meta["modfx_role"] = tag
    return node


def get_attr(graph: Graph, target: str, value: torch.Tensor, *, stack=None) -> Node:
    node = graph.get_attr(target)
    fake_mode = fake_mode_of(graph)
    node.meta["val"] = fake_mode.from_tensor(value, static_shapes=True)
    if stack is not None:
        node.meta["nn_module_stack"] = dict(stack)
    return node


def propagate(nodes: Iterable[Node], fake_mode) -> None:
    """Recompute meta['val'] of call_function nodes, in order (after their inputs changed shape)."""
    for node in nodes:
        if node.op == "call_function":
            node.meta["val"] = run_fake(node.target, node.args, node.kwargs, fake_mode)


def op_arg(target, args, kwargs: dict, name: str, default=None) -> Any:
    """Argument `name` of a call to the ATen op `target`, passed by position or by keyword (read off a node's
    args, or off the values an Interpreter fetched for them)."""
    for i, a in enumerate(target._schema.arguments):
        if a.name == name:
            return args[i] if i < len(args) else kwargs.get(name, default)
    return default


def expr(size: Any) -> sympy.Expr:
    """A size (int or SymInt) as a sympy expression."""
    if isinstance(size, torch.SymInt):
        return size.node.expr
    return sympy.Integer(int(size))


def erase_unused(node: Node) -> None:
    """Erase `node` if nothing uses it, then every input of it left without users (e.g. the index
    arithmetic of a gather a rewrite replaced)."""
    todo = [node]
    while todo:
        n = todo.pop()
        if not isinstance(n, Node) or n.users or n.op != "call_function" or n.is_impure():
            continue
        inputs = n.all_input_nodes
        n.graph.erase_node(n)
        todo.extend(inputs)


def ancestors_within(n: Node, among: set[Node]) -> set[Node]:
    """The nodes of `among` that `n` reads, directly or through others of them."""
    found, todo = set(), [a for a in n.all_input_nodes if a in among]
    while todo:
        a = todo.pop()
        if a not in found:
            found.add(a)
            todo += [b for b in a.all_input_nodes if b in among]
    return found


def shape_exprs(node: Node) -> tuple[sympy.Expr, ...] | None:
    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor):
        return None
    return tuple(expr(s) for s in v.shape)


def symint_node(graph: Graph, sym: sympy.Symbol) -> Node | None:
    """A node whose value is exactly the symbol `sym` (e.g. a sym_size of an input)."""
    for n in graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.SymInt) and v.node.expr == sym:
            return n
    return None


_SYMPY_OPS = {sympy.Add: operator.add, sympy.Mul: operator.mul, sympy.Max: torch.sym_max, sympy.Min: torch.sym_min,
              _sympy_fns.Max: torch.sym_max, _sympy_fns.Min: torch.sym_min}  # torch's own Max / Min too


def emit_sym_expr(graph: Graph, e: sympy.Expr, leaves: dict[sympy.Symbol, Any], *, stack=None) -> Any:
    """Emit FX nodes computing the integer expression `e`, with symbols bound to `leaves`
    (nodes or ints). Supports + * Max Min FloorDiv and Mod, which is what shape arithmetic in export uses
    (Max and Min come from slices with negative bounds)."""
    from torch.utils._sympy.functions import FloorDiv, Mod, PythonMod

    if isinstance(e, sympy.Integer):
        return int(e)
    if isinstance(e, sympy.Symbol):
        return leaves[e]

    def binop(fn, a, b):
        if not isinstance(a, Node) and not isinstance(b, Node):
            return fn(a, b)
        return call(graph, fn, (a, b), stack=stack)

    if type(e) in _SYMPY_OPS:
        fn = _SYMPY_OPS[type(e)]
        terms = [emit_sym_expr(graph, a, leaves, stack=stack) for a in e.args]
        out = terms[0]
        for t in terms[1:]:
            out = binop(fn, out, t)
        return out
    if isinstance(e, FloorDiv):
        a, b = (emit_sym_expr(graph, x, leaves, stack=stack) for x in e.args)
        return binop(operator.floordiv, a, b)
    if isinstance(e, (Mod, PythonMod)):
        a, b = (emit_sym_expr(graph, x, leaves, stack=stack) for x in e.args)
        return binop(operator.mod, a, b)
    raise NotImplementedError(f"cannot emit symbolic size expression {e}")


def module_paths(node: Node) -> list[str]:
    """The qualified module names on the node's nn_module_stack, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values() if isinstance(path, str)]


def token_axis_length(graph: Graph, name: str | None = None) -> sympy.Expr | None:
    """The length of the inputs' token axis: axis 1 of the first 2-D+ input with a symbolic axis 1
    ([B, S, ...]), unless the attention ops run over the symbol of an input's axis 0 instead (a
    sequence-first model, [S, B, ...]): the token axis is the one that attention mixes. With `name`
    (MoDConfig.token_input), the token axis of that input, told apart the same way."""
    if name is not None:
        return _named_token_axis(graph, name)
    axis0, axis1 = [], []
    for ph in graph.find_nodes(op="placeholder"):
        v = ph.meta.get("val")
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and expr(v.shape[1]).free_symbols:  # not fixed by the model
            axis0.append(expr(v.shape[0]))
            axis1.append(expr(v.shape[1]))
    if not axis1:
        return None
    attended = _attended(graph)
    if attended and not axis1[0].free_symbols & attended:
        seq_first = [e for e in axis0 if e.is_Symbol and e in attended]
        if seq_first:
            return seq_first[0]
    return axis1[0]


def _attended(graph: Graph) -> set:
    """The symbols in the query lengths of the graph's attention ops (S, or k = f(S) in a routed block)."""
    attended = set()
    for n in graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default):
        q = n.args[0].meta.get("val")
        if isinstance(q, torch.Tensor) and q.dim() >= 2:
            attended |= expr(q.shape[-2]).free_symbols
    return attended


def input_named(graph: Graph, name: str, option: str) -> Node:
    """The captured model's input `name`, as the MoDConfig field `option` names it."""
    inputs = {n.name: n for n in graph.find_nodes(op="placeholder")}
    if name not in inputs:
        raise ModfxError(f"{option}={name!r}: the captured model has no input of that name; its inputs are "
                         f"{', '.join(inputs)}")
    return inputs[name]


def input_over(graph: Graph, seq) -> Node | None:
    """The first input with `seq` (a token-axis length) among its first two axes, e.g. input_ids [B, S]."""
    for ph in graph.find_nodes(op="placeholder"):
        v = ph.meta.get("val")
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and seq in (expr(v.shape[0]), expr(v.shape[1])):
            return ph
    return None


def _named_token_axis(graph: Graph, name: str) -> sympy.Expr:
    v = input_named(graph, name, "token_input").meta.get("val")
    if isinstance(v, torch.Tensor) and v.dim() >= 2:
        axis0, axis1, attended = expr(v.shape[0]), expr(v.shape[1]), _attended(graph)
        if axis0.is_Symbol and axis0 in attended and not axis1.free_symbols & attended:
            return axis0  # sequence-first: [tokens, batch, ...]
        if axis1.free_symbols:
            return axis1
    shape = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
    raise ModfxError(f"token_input={name!r}: that input ({shape}) has no dynamic token axis; name an input "
                     "shaped [batch, tokens, ...] such as input_ids or decoder_input_ids")
