"""Top-k routing: run a block on the k highest-scoring tokens of each sequence, pass the rest through.

    before:                                   after:
        r = linear(x, w_router)  # [B, S, 1]      r     = linear(x, w_router)                # [B, S, 1]
        y = block(x, cos, mask)  # [B, S, D]      k     = (S * num + den - 1) // den          # ceil(c * S)
        use(y)                                    order = sort(r[..., 0], desc, stable)[1]     # ties -> earlier token
                                                  idx   = sort(order[:, :k])[0]                # [B, k] causal order
                                                  xg    = gather(x, 1, idx)                    # [B, k, D]
                                                  cosg  = gather(cos, 1, idx)                  # token axes of side inputs,
                                                  maskg = gather(gather(mask, 2, idx), 3, idx) #   original positions kept
                                                  yg    = block(xg, cosg, maskg)               # the region, on k tokens
                                                  f     = sum(residual terms) or yg - xg       # contribution only
                                                  wg    = weighting(gather(r, 1, idx))         # [B, k, 1]
                                                  y'    = scatter(x, 1, idx, xg + wg * f)      # others untouched
                                                  use(y')

The merge is a plain scatter of unique indices (deterministic, no atomics); the residual is added once.
Symbolic sizes the region read from the full sequence (S in view/reshape arguments) are re-derived with
S -> k. The ordering sort is stable, so ties in the router score go to the earlier token.

Contract: requires a discovered `Block` and its router node; ensures the block region runs on k tokens
and returns `Routed` (the indices, k, gathered router scores) for the predictor pass.
"""

from __future__ import annotations

import dataclasses
import operator
from fractions import Fraction

import sympy
import torch
from torch.fx import Graph, Node

from .discover import Block, SideInput
from .graph_utils import aten, call, emit_sym_expr, fake_mode_of, propagate, symint_node


@dataclasses.dataclass
class Routed:
    idx: Node  # [B, k] int64, sorted: the tokens that run the block
    k: Node | int
    scores: Node  # [B, S] router logits
    out: Node  # the merged output [B, S, D]


def seq_len(graph: Graph, block: Block) -> Node | int:
    length = block.x.meta["val"].shape[block.seq_axis]
    if isinstance(length, torch.SymInt):
        return call(graph, aten.sym_size.int, (block.x, block.seq_axis), stack=block.stack)
    return int(length)


def capacity_k(graph: Graph, S: Node | int, capacity: Fraction, stack) -> Node | int:
    """k = ceil(capacity * S) in integer arithmetic (floats on S break export's guards)."""
    num, den = capacity.numerator, capacity.denominator
    if not isinstance(S, Node):
        return max(1, -(-S * num // den))
    if num == den:
        return S
    t = call(graph, operator.mul, (S, num), stack=stack) if num != 1 else S
    t = call(graph, operator.add, (t, den - 1), stack=stack)
    return call(graph, operator.floordiv, (t, den), stack=stack)


def size(graph: Graph, node: Node, axis: int, stack) -> Node | int:
    s = node.meta["val"].shape[axis]
    return call(graph, aten.sym_size.int, (node, axis), stack=stack) if isinstance(s, torch.SymInt) else int(s)


def token_index(graph: Graph, idx: Node, like: Node, seq_axis: int, batch_axis: int, stack) -> Node:
    """Reshape idx [B, k] so it indexes `like` along seq_axis: [.., B, .., k, ..] expanded to like's
    shape with the token axis of length k."""
    t = idx if batch_axis < seq_axis else call(graph, aten.permute.default, (idx, [1, 0]), stack=stack)
    rank = like.meta["val"].dim()
    for ax in range(rank):
        if ax not in (seq_axis, batch_axis):
            t = call(graph, aten.unsqueeze.default, (t, ax), stack=stack)
    sizes = [-1 if ax in (seq_axis, batch_axis) else size(graph, like, ax, stack) for ax in range(rank)]
    return call(graph, aten.expand.default, (t, sizes), stack=stack)


def gather_tokens(graph: Graph, t: Node, idx: Node, seq_axes, batch_axis: int, stack) -> Node:
    """t with each token axis reduced to the k tokens in idx (per sequence), original values kept."""
    for ax in seq_axes:
        index = token_index(graph, idx, t, ax, batch_axis, stack)
        t = call(graph, aten.gather.default, (t, ax, index), stack=stack, tag="gather")
    return t


def broadcast_batch(graph: Graph, s: SideInput, B, stack) -> Node:
    if not s.broadcast_batch:
        return s.node
    sizes = [-1] * s.node.meta["val"].dim()
    sizes[s.batch_axis] = B
    return call(graph, aten.expand.default, (s.node, sizes), stack=stack)


def select_topk(graph: Graph, block: Block, r: Node, capacity: Fraction):
    """Nodes for S, k, the router logits [B, S] and the sorted top-k indices [B, k]."""
    st = block.stack
    S = seq_len(graph, block)
    k = capacity_k(graph, S, capacity, st)
    logits = call(graph, aten.squeeze.dim, (r, -1), stack=st)  # [B, S] or [S, B]
    if block.batch_axis == 1:
        logits = call(graph, aten.permute.default, (logits, [1, 0]), stack=st)  # [B, S]
    ranked = call(graph, aten.sort.stable, (logits,), {"stable": True, "dim": 1, "descending": True}, stack=st, tag="sort")
    order = call(graph, operator.getitem, (ranked, 1), stack=st)
    top = call(graph, aten.slice.Tensor, (order, 1, 0, k), stack=st, tag="topk")  # [B, k]
    in_order = call(graph, aten.sort.default, (top, 1), stack=st, tag="sort")
    idx = call(graph, operator.getitem, (in_order, 0), stack=st)  # [B, k] ascending positions
    return S, k, logits, idx


def route_topk(graph: Graph, block: Block, r: Node, capacity: Fraction, weighting: str) -> Routed:
    st = block.stack
    fake_mode = fake_mode_of(graph)
    x = block.x
    with graph.inserting_before(block.first):
        S, k, logits, idx = select_topk(graph, block, r, capacity)
        B = size(graph, x, block.batch_axis, st)
        xg = gather_tokens(graph, x, idx, (block.seq_axis,), block.batch_axis, st)  # [B, k, D]
        replace = {x: xg}
        for s in block.side_inputs:
            src = broadcast_batch(graph, s, B, st)
            replace[s.node] = gather_tokens(graph, src, idx, s.seq_axes, s.batch_axis, st)
        for sym in block.sym_inputs:
            replace[sym] = _sym_on_k(graph, sym, block, k)

    region = set(block.nodes)
    for n in block.nodes:
        n.args = _substitute(n.args, replace)
        n.kwargs = _substitute(n.kwargs, replace)
    propagate(block.nodes, fake_mode)

    yg = block.out
    outside_users = [u for u in yg.users if u not in region]
    with graph.inserting_before(yg.next):
        if block.residual_terms is not None:
            terms = block.residual_terms
            f = terms[0]
            for t in terms[1:]:
                f = call(graph, aten.add.Tensor, (f, t), stack=st)
        else:
            f = call(graph, aten.sub.Tensor, (yg, xg), stack=st)  # post-norm block: f = block(x) - x
        r_index = token_index(graph, idx, r, block.seq_axis, block.batch_axis, st)
        rg = call(graph, aten.gather.default, (r, block.seq_axis, r_index), stack=st, tag="gather")  # [B, k, 1]
        upd = call(graph, aten.add.Tensor, (xg, _weighted(graph, f, rg, weighting, st)), stack=st)  # [B, k, D]
        index = token_index(graph, idx, x, block.seq_axis, block.batch_axis, st)
        merged = call(graph, aten.scatter.src, (x, block.seq_axis, index, upd), stack=st, tag="scatter")
    for user in outside_users:
        user.replace_input_with(yg, merged)
    return Routed(idx, k, logits, merged)


def _weighted(graph: Graph, f: Node, rg: Node, weighting: str, st) -> Node:
    if weighting == "none":
        return f
    if weighting == "raw":
        w = rg
    elif weighting == "sigmoid":
        w = call(graph, aten.sigmoid.default, (rg,), stack=st)
    elif weighting == "ste":  # 1 + r - stopgrad(r): exactly 1 forward, d/dr = 1 backward
        det = call(graph, aten.detach.default, (rg,), stack=st)
        w = call(graph, aten.add.Tensor, (call(graph, aten.sub.Tensor, (rg, det), stack=st), 1), stack=st)
    else:
        raise AssertionError(weighting)
    return call(graph, aten.mul.Tensor, (f, w), stack=st)


def _sym_on_k(graph: Graph, sym: Node, block: Block, k) -> Node | int:
    """A symbolic size the region read off the full sequence, recomputed for k tokens: solve
    seq_expr(s) = k for the sequence symbol s (the token axis may be S + 1 with a CLS token)."""
    e = sym.meta["val"].node.expr
    (s,) = block.seq_expr.free_symbols
    K = sympy.Symbol("modfx_k", integer=True, positive=True)
    solutions = sympy.solve(sympy.Eq(block.seq_expr, K), s)
    if len(solutions) != 1:
        raise NotImplementedError(f"cannot invert token axis length {block.seq_expr}")
    e = sympy.expand(e.subs(s, solutions[0]))
    leaves = {K: k}
    for f in e.free_symbols - {K}:
        leaves[f] = symint_node(graph, f)
        if leaves[f] is None:
            raise NotImplementedError(f"no node defines symbol {f}")
    return emit_sym_expr(graph, e, leaves, stack=block.stack)


def _substitute(arg, replace: dict):
    from torch.fx.node import map_arg

    return map_arg(arg, lambda n: replace.get(n, n))
