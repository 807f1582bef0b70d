"""Fuse the router over S and the predictor's first layer into one GEMM that reads x once.

After re-scoring, the router score over all S tokens only ranks (no gradient), and the predictor's first
layer reads the same tokens through a stop-gradient. Two narrow GEMMs over [B, S, D] become one:

    before:                                        after (before the block):
        r    = linear(x, w_r)           # [B, S, 1]    w    = cat([detach(w_r), W1])      # [1 + h, D]
        ...                                            o    = linear(detach(x), w)        # [B, S, 1 + h]
        hpre = linear(detach(x), W1, b1)  # [B, S, h]  r    = o[..., :1]                  # ranks only
                                                       hpre = o[..., 1:] + b1             # the predictor goes on

Values are the same up to rounding; gradients are unchanged: x gets none from either (stop-gradient
input), w_r gets its gradient from the re-scored chosen tokens only, W1 and b1 from the predictor loss.
On a CPU with 16-lane vectors a [D, 16] GEMM costs what [D, 15] alone costs, so the router's pass over x
goes (benchmarks/bench_routing.py --ops, B=4, S=1024, D=512, 1 thread, forward: 0.77 ms for the fused
predictor op against 0.40 + 0.77 ms apart), while a 17th column costs ~0.25 ms: hence the default
predictor width one less than a multiple of 16 (`config.predictor_width`).

Contract: requires a top-k routed block whose router score r = linear(x, w_r) feeds only `detach` (the
re-score pass ran) and a predictor whose first layer is linear(detach(x), W1, b1); ensures both come
from one linear over detach(x), placed before the block. The fused GEMM carries the role "predictor".
"""

from __future__ import annotations

from torch import nn
from torch.fx import Graph, Node

from .discover import Block
from .graph_utils import aten, call, erase_unused, get_attr


def fuse_router_predictor(graph: Graph, root: nn.Module, block: Block, r: Node) -> None:
    first = _predictor_first_layer(block)
    if first is None or any(u.target is not aten.detach.default for u in r.users):
        return
    st = block.stack
    w_r, w1, b1 = r.args[1], first.args[1], first.args[2] if len(first.args) > 2 else None
    with graph.inserting_before(r):  # w_r is read before r; the predictor's weights after the block
        w1_here = get_attr(graph, w1.target, root.get_parameter(w1.target), stack=st)
        w_r_ranks = call(graph, aten.detach.default, (w_r,), stack=st)  # w_r's gradient: re-scored tokens only
        w = call(graph, aten.cat.default, ([w_r_ranks, w1_here],), stack=st, tag="predictor")  # [1 + h, D]
        xd = call(graph, aten.detach.default, (block.x,), stack=st, tag="predictor")
        o = call(graph, aten.linear.default, (xd, w), stack=st, tag="predictor")  # [B, S, 1 + h]
        score = call(graph, aten.slice.Tensor, (o, -1, 0, 1), stack=st, tag="router")  # [B, S, 1]
        hpre = call(graph, aten.slice.Tensor, (o, -1, 1), stack=st, tag="predictor")  # [B, S, h]
        if b1 is not None:
            bias = get_attr(graph, b1.target, root.get_parameter(b1.target), stack=st)
            hpre = call(graph, aten.add.Tensor, (hpre, bias), stack=st, tag="predictor")
    r.replace_all_uses_with(score)
    first.replace_all_uses_with(hpre)
    for old in (r, first):
        erase_unused(old)
    for p in (w1, b1):
        if p is not None and not p.users:
            graph.erase_node(p)


def _predictor_first_layer(block: Block) -> Node | None:
    """linear(detach(x), W1, b1) tagged "predictor", reading the block input x."""
    for d in block.x.users:
        if d.target is aten.detach.default and d.meta.get("modfx_role") == "predictor":
            for lin in d.users:
                if lin.target is aten.linear.default and lin.args[0] is d:
                    return lin
    return None
