"""Re-score the chosen tokens: the router's gradient touches k tokens, not S.

Only the k chosen tokens' scores reach the loss (through the weighting), so the gradient of
r = linear(x, w) over all S tokens is zero except at those k; autograd would still build it densely: an
outer product [B, S, 1] x [1, D] into x's gradient and a pass over all of x for w's. After this pass the
full-sequence score only ranks (no gradient), and the chosen tokens' scores are recomputed from their
gathered inputs, which the block reads anyway:

    before:                                      after:
        r   = linear(x, w)        # [B, S, 1]        r   = linear(x, w)         # [B, S, 1]
        idx = topk(r)                                idx = topk(detach(r))      # ranking only
        xg  = x[b, idx]           # [B, k, D]        xg  = x[b, idx]            # [B, k, D]
        rg  = gather(r, 1, idx)   # [B, k, 1]        rg  = linear(xg, w)        # [B, k, 1], same values
        y   = index_put(x, (b, idx), w(rg) * f, accumulate=True)    (unchanged)

Gradients are unchanged: d rg / d xg = w flows to x at the chosen tokens through xg's backward,
and d loss / d w = sum over chosen tokens of g_rg * xg, as before. The forward recomputes B*k*D
multiply-adds (1/S of the router per chosen token).

Contract: requires a top-k routed block whose full-sequence score r has no consumer that needs its
gradient other than the gather of rg (so not with the router aux loss); ensures r feeds the ranking only
through detach(r) and rg is a linear of xg.
"""

from __future__ import annotations

from torch.fx import Graph, Node

from .discover import Block
from .graph_utils import aten, call, erase_unused
from .route_topk import Routed


def rescore_chosen(graph: Graph, block: Block, r: Node, routed: Routed) -> None:
    st = block.stack
    old = routed.r_chosen
    with graph.inserting_after(r):
        ranked = call(graph, aten.detach.default, (r,), stack=st, tag="router")
    for user in list(r.users):
        if user is not ranked and user is not old:
            user.replace_input_with(r, ranked)
    weight = r.args[1]
    with graph.inserting_before(old):
        rg = call(graph, aten.linear.default, (routed.x_chosen, weight), stack=st, tag="router")  # [B, k, 1]
    old.replace_all_uses_with(rg)
    erase_unused(old)
    routed.r_chosen = rg

