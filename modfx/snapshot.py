"""A readable, normalised rendering of a (transformed) FX graph, for snapshot tests and review.

    render(mod.modfx_graphs[("topk", False)]) ->
        input_ids = input(input_ids)  # [B, S] i64
        embedding_0 = embedding(model.embed_tokens.weight, input_ids)  # [B, S, 64] f32
        ...
        linear_7 = linear(add_3, model.layers.1.mod_router.weight)  # [B, S, 1] f32  router
        sort_0 = sort.stable(squeeze_0, stable=True, dim=1, descending=True)  # ([B, S] f32, [B, S] i64)  sort
        ...
        return (add_aux_loss_0, stack_0)

One line per node in graph order: `name = op(args)  # shape dtype  role`. Names are renumbered per op
(`linear_0`, `linear_1`, ... in graph order), so they do not depend on how the capture named nodes;
parameters and buffers (get_attr) appear by their qualified names; symbolic sizes are renamed B and S
(the batch and token axes of the inputs; further ones B2, S2, ..., others s0, s1, ...) and the routed
token count k; devices print as `dev`. No file paths, stack traces or hashes. The `role` is the pass
that made the node (`node.meta["modfx_role"]`: router, sort, topk, gather, scatter, predictor).
"""

from __future__ import annotations

import sympy
import torch
from torch.fx import Graph, Node

from .passes.route_topk import chosen_count

__all__ = ["render"]

_DTYPES = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "b8",
}


def render(graph: Graph, seq=None) -> str:
    """The graph as text: one line per placeholder and call_function node, then its output. `seq` (the
    routed blocks' token-axis length, Capture.seq_expr) is named S when given."""
    names = _names(graph)
    syms = _symbol_names(graph, seq)
    lines = []
    for n in graph.nodes:
        if n.op == "placeholder":
            lines.append(f"{names[n]} = input({n.target})  # {_val(n.meta.get('val'), syms)}")
        elif n.op in ("call_function", "call_module", "call_method"):
            args = ", ".join([_arg(a, names, syms) for a in n.args] + [f"{k}={_arg(v, names, syms)}" for k, v in n.kwargs.items()])
            comment = _val(n.meta.get("val"), syms)
            role = n.meta.get("modfx_role")
            if role:
                comment += f"  {role}"
            lines.append(f"{names[n]} = {_op(n)}({args})  # {comment}".rstrip())
        elif n.op == "output":
            lines.append(f"return {_arg(n.args[0], names, syms)}")
    return "\n".join(lines) + "\n"


def _op(n: Node) -> str:
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        packet, overload = t._opname, t._overloadname
        return packet if overload == "default" else f"{packet}.{overload}"
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", str(t))


def _names(graph: Graph) -> dict[Node, str]:
    names: dict[Node, str] = {}
    counts: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "get_attr":
            names[n] = str(n.target)
        elif n.op == "placeholder":
            names[n] = str(n.target)
        elif n.op != "output":
            base = _op(n).split(".")[0].strip("_") or "op"
            i = counts.get(base, 0)
            counts[base] = i + 1
            names[n] = f"{base}_{i}"
    return names


def _symbol_names(graph: Graph, seq=None) -> dict:
    """sympy symbol -> display name, plus "__k__": the routed token counts (k expressions) in order."""
    out: dict = {seq: "S"} if isinstance(seq, sympy.Symbol) else {}
    seen: dict[str, int] = {"S": 1} if out else {}
    for n in graph.find_nodes(op="placeholder"):
        v = n.meta.get("val")
        if not isinstance(v, torch.Tensor):
            continue
        for ax, d in enumerate(v.shape):
            if isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol) and d.node.expr not in out:
                base = {0: "B", 1: "S"}.get(ax, "s")
                i = seen[base] = seen.get(base, 0) + 1
                out[d.node.expr] = f"s{i - 1}" if base == "s" else base if i == 1 else f"{base}{i}"
    k_exprs = []
    for n in graph.nodes:
        k = chosen_count(n)
        v = k.meta.get("val") if isinstance(k, Node) else None
        if isinstance(v, torch.SymInt) and not isinstance(v.node.expr, sympy.Symbol) and v.node.expr not in k_exprs:
            k_exprs.append(v.node.expr)
    out["__k__"] = k_exprs
    return out


def _size(e, syms: dict) -> str:
    if not isinstance(e, (torch.SymInt, torch.SymBool, torch.SymFloat)):
        return str(e)
    e = e.node.expr
    k_exprs = syms.get("__k__", [])
    for i, ke in enumerate(k_exprs):
        e = e.subs(ke, sympy.Symbol("k" if i == 0 else f"k{i}"))
    return str(e.xreplace({s: sympy.Symbol(syms[s]) for s in e.free_symbols if s in syms}))


def _val(v, syms: dict) -> str:
    if isinstance(v, torch.Tensor):
        return f"[{', '.join(_size(d, syms) for d in v.shape)}] {_DTYPES.get(v.dtype, str(v.dtype).removeprefix('torch.'))}"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(_val(x, syms) for x in v) + ")"
    if isinstance(v, (torch.SymInt, torch.SymBool, torch.SymFloat)):
        return _size(v, syms)
    if v is None:
        return "-"
    return repr(v)


def _arg(a, names: dict, syms: dict) -> str:
    if isinstance(a, Node):
        return names.get(a, a.name)
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg(x, names, syms) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k}: {_arg(v, names, syms)}" for k, v in a.items()) + "}"
    if isinstance(a, torch.dtype):
        return _DTYPES.get(a, str(a).removeprefix("torch."))
    if isinstance(a, torch.device):
        return "dev"
    if isinstance(a, float):
        return repr(a)
    if isinstance(a, (torch.memory_format, torch.layout)):
        return str(a).removeprefix("torch.")
    return repr(a)
