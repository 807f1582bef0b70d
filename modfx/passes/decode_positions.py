"""Token positions for the decode step of a model that numbers its tokens itself (nanoGPT, minGPT:
`pos = arange(T)` next to the token embedding, no positions parameter).

A decode step sees only its new tokens, so such a model would number them 0..S-1 again. The decode
graph gets a positions input after the token ids, and every arange over the tokens reads the first row
of it (the rows of one decode step share their positions; `modfx.generate` checks that they do):

    before:                                     after:
        ids: [B, S]                                 ids: [B, S]; pos: [B, S] int64 (a new input)
        p = arange(S)           # [S]               p = select(pos, 0, 0)    # [S] the true positions
        e = embedding(wpe, p)   # [S, D]            e = embedding(wpe, p)    # [S, D]

Contract: requires a captured graph with meta['val'] whose first placeholder is the token ids over
`seq_expr`; ensures the graph's second placeholder is `pos` and no arange over the tokens is left.
Returns how many aranges it rewrote (0: the graph is left as it was).
"""

from __future__ import annotations

import sympy
import torch
from torch.fx import Graph

from .graph_utils import aten, call, fake_mode_of, shape_exprs

_ARANGES = (aten.arange.default, aten.arange.start, aten.arange.start_step)


def _counts_tokens(n, seq_expr: sympy.Expr) -> bool:
    """n is arange(S), arange(0, S) or arange(0, S, 1): position i at index i, for the S tokens."""
    if n.target not in _ARANGES:
        return False
    start = n.args[0] if n.target is not aten.arange.default else 0
    step = n.args[2] if n.target is aten.arange.start_step else 1
    return start == 0 and step == 1 and shape_exprs(n) == (seq_expr,)


def positions_from_input(graph: Graph, seq_expr: sympy.Expr) -> int:
    aranges = [n for n in graph.nodes if n.op == "call_function" and _counts_tokens(n, seq_expr)]
    if not aranges:
        return 0
    ids = graph.find_nodes(op="placeholder")[0]
    with graph.inserting_after(ids):
        pos = graph.placeholder("pos")
    with fake_mode_of(graph):
        pos.meta["val"] = torch.empty_like(ids.meta["val"], dtype=torch.int64)  # [B, S], S symbolic like ids'
    for n in aranges:
        with graph.inserting_before(n):
            row = call(graph, aten.select.int, (pos, 0, 0), stack=n.meta.get("nn_module_stack"))  # [S]
            want = n.meta["val"].dtype
            if want != torch.int64:
                row = call(graph, aten._to_copy.default, (row,), {"dtype": want},
                           stack=n.meta.get("nn_module_stack"))
        n.replace_all_uses_with(row)
        graph.erase_node(n)
    graph.lint()
    return len(aranges)
