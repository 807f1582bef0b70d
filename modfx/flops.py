"""`modfx.flops(module, example_inputs)`: a FLOP report for a dense or a transformed model.

    report = modfx.flops(mod, (ids,))
    report.total                  # forward, symbolic: 2*B*S*(...) + 256*B*S**2 + ... + 8192*B*k + ...
    report.total_at, report.train_at   # forward and forward + backward at the example shapes
    report.blocks, report.kinds   # rows: per block (name, routed, expression), per op kind
    print(report)                 # the same as tables (tabulate)

B is the batch, S the sequence, k the tokens a routed block processes (k_i when blocks differ).
What counts as a FLOP (matmul-class only, attention not halved for causal, routing data ops one per
element, backward like FlopCounterMode) is stated once in modfx/passes/flops.py.
`torch_count` runs torch's FlopCounterMode on the same module, with the kernels torch counts as 0 mapped,
for cross-checking.
"""

from __future__ import annotations

import dataclasses

import sympy
import torch
from tabulate import tabulate
from torch import nn
from torch.fx import _pytree as fx_pytree
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from .api import _normalise_inputs
from .capture import capture
from .errors import ModfxError
from .passes.discover import find_blocks
from .passes.flops import ROUTING, Cost, Names, count, torch_mapping
from .passes.graph_utils import expr


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    routed: bool | None  # None for rows that are not blocks
    expr: sympy.Expr  # forward FLOPs in B, S, k
    fwd: int  # forward at the example shapes
    train: int  # forward + backward at the example shapes


@dataclasses.dataclass(frozen=True)
class FlopReport:
    model: str
    at: dict  # symbol name -> example value, e.g. {"B": 2, "S": 128, "k": 16}
    total: sympy.Expr  # forward
    train: sympy.Expr  # forward + backward
    total_at: int
    train_at: int
    blocks: tuple[Row, ...]  # then one row for everything outside the blocks
    kinds: tuple[Row, ...]  # matmul, attention, then the routing ops (router, sort, ...)
    overhead: Row  # all routing ops together
    costs: tuple[Cost, ...]  # per node, raw symbols

    def __str__(self):
        at = ", ".join(f"{k}={v}" for k, v in self.at.items())
        head = tabulate(
            [("forward", self.total, _si(self.total_at)), ("forward + backward", self.train, _si(self.train_at))],
            headers=["", "FLOPs", f"at {at}"],
        )
        cols = ["FLOPs (forward)", "forward", "%", "fwd + bwd"]
        pct = lambda r: f"{100 * r.fwd / max(self.total_at, 1):.1f}"  # noqa: E731
        blocks = tabulate(
            [(r.name, {True: "yes", False: "-", None: ""}[r.routed], r.expr, _si(r.fwd), pct(r), _si(r.train))
             for r in self.blocks],
            headers=["block", "routed", *cols],
        )
        kinds = tabulate([(r.name, r.expr, _si(r.fwd), pct(r), _si(r.train)) for r in (*self.kinds, self.overhead)],
                         headers=["op kind", *cols])
        return f"modfx flops: {self.model}\n{head}\n\n{blocks}\n\n{kinds}"


def _si(v: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3f} {unit}"
    return str(v)


def flops(module: nn.Module, example_inputs=None, *, example_kwargs=None) -> FlopReport:
    """FLOPs of `module` (a `modfx.transform` result, or any model torch.export can capture), symbolic
    in B, S, k and evaluated at the example inputs' shapes (for a transformed module they are optional:
    the shapes it was captured with are used)."""
    graph, spec, blocks, kind, seq = _graph_of(module, example_inputs, example_kwargs)
    names = Names.of(graph, [b for b, _ in blocks], seq)
    costs = count(graph, [b for b, _ in blocks], root=module)
    given = {}
    if example_inputs is not None or example_kwargs:
        given = _bind(graph, spec, *_normalise_inputs(example_inputs, example_kwargs))
    env = names.values(given)

    def row(name, routed, sel) -> Row:
        e = sympy.Add(*(c.fwd for c in sel))
        t = sympy.Add(*(c.bwd for c in sel))
        fwd = int(e.xreplace(env))
        return Row(name, routed, names.pretty(e), fwd, fwd + int(t.xreplace(env)))

    total = row("total", None, costs)
    block_rows = [row(b, r, [c for c in costs if c.block == b]) for b, r in blocks]
    block_rows.append(row("(outside blocks)", None, [c for c in costs if c.block is None]))
    present = {c.kind for c in costs}
    kinds = [k for k in ("matmul", "attention") if k in present] + [k for k in ROUTING if k in present]
    kind_rows = [row(k, None, [c for c in costs if c.kind == k]) for k in kinds]
    overhead = row("routing overhead", None, [c for c in costs if c.kind in ROUTING])
    at = {str(p): env[p] for p in names.table.values() if p in env}
    return FlopReport(f"{type(module).__name__} ({kind})", at, total.expr,
                      names.pretty(sympy.Add(*(c.fwd + c.bwd for c in costs))), total.fwd, total.train,
                      tuple(block_rows), tuple(kind_rows), overhead, tuple(costs))


def _graph_of(module, example_inputs, example_kwargs):
    """(graph, input spec, [(block, routed)], description, token-axis length(s)) of a transformed or a dense
    module."""
    graphs = getattr(module, "modfx_graphs", None)
    if graphs:
        graph = graphs[(module._routing, module.training)]
        blocks = [(b.name, b.routed) for b in module.modfx_plan.blocks]
        n = sum(r for _, r in blocks)
        return graph, module._in_spec, blocks, f"MoD, {n}/{len(blocks)} blocks routed", module.modfx_capture.seq_exprs
    if not isinstance(module, nn.Module):
        raise ModfxError(f"modfx.flops expects an nn.Module, got {type(module).__name__}")
    args, kwargs = _normalise_inputs(example_inputs, example_kwargs)
    cap = capture(module, args, kwargs)
    graph = cap.graphs[module.training]
    try:
        blocks = [(b.name, False) for b in find_blocks(graph, cap.seq_expr)]
    except ModfxError:
        blocks = []
    return graph, cap.in_spec, blocks, "dense", cap.seq_expr


def _bind(graph, spec, args, kwargs) -> dict:
    """Raw size symbol -> value, read off the example inputs' shapes."""
    try:
        flat = fx_pytree.tree_flatten_spec((list(args), kwargs), spec)
    except Exception as e:  # noqa: BLE001
        raise ModfxError(f"example inputs do not match the structure the module was captured with ({spec})") from e
    env = {}
    for ph, t in zip(graph.find_nodes(op="placeholder"), flat):
        v = ph.meta.get("val")
        if isinstance(v, torch.Tensor) and isinstance(t, torch.Tensor):
            for s, n in zip(v.shape, t.shape):
                if isinstance(s, torch.SymInt) and expr(s).is_Symbol:
                    env[expr(s)] = int(n)
    return env


def torch_count(module: nn.Module, example_inputs, *, example_kwargs=None, backward: bool = False) -> dict[str, int]:
    """FLOPs per aten op as torch's FlopCounterMode counts one call of `module` (and, with
    `backward=True`, the backward of the sum of its outputs w.r.t. every trainable parameter), with
    the CPU flash-attention kernels mapped. Parameters' .grad are left untouched."""
    args, kwargs = _normalise_inputs(example_inputs, example_kwargs)
    with FlopCounterMode(display=False, custom_mapping=torch_mapping()) as fc:
        out = module(*args, **kwargs)
        if backward:
            outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
            params = [p for p in module.parameters() if p.requires_grad]
            torch.autograd.grad(sum(t.sum() for t in outs), params, allow_unused=True)
    return {str(op): int(v) for op, v in fc.get_flop_counts().get("Global", {}).items()}
