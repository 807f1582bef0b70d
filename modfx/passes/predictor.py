"""Predictor branch: a causal stand-in for top-k, trained from the top-k decisions of the same forward.

Top-k over the sequence looks at later tokens; the predictor decides per token from that token's
own (stop-gradient) block input, so it can route while sampling.

In the top-k graph (training), after the routed block's merge:

    before:                                  after:
        y = scatter(x, 1, idx, upd)              y     = scatter(x, 1, idx, upd)
        use(y)                                   p     = sum(gelu(linear(detach(x))) * w2, -1) + b2  # [B, S]
                                                 t     = scatter(zeros, 1, idx, 1)                # top-k membership
                                                 aux   = bce_with_logits(p, t)
                                                 y'    = add_aux_loss(y, weight * aux)    # identity forward,
                                                 use(y')                                  # d aux = weight backward
                                                 stats += [aux, accuracy, precision, recall, mean(p > 0)]

Optionally (config.router_aux_weight > 0, the paper's other causal option), the router's own score gets
the same kind of loss, `add_aux_loss(y', router_weight * bce_with_logits(r[..., 0], t))`, so that r > 0
itself tends to mark the top-k tokens.

In the predictor graph (sampling / causal evaluation), instead of top-k:

    sel   = p > 0                                              # [B, S] bool, causal by construction
    yall  = block(x) with every attention's keys limited to selected tokens (and the query itself)
    y'    = where(sel, x + w(r) * f, x)                        # exact: every selected token processed

where an attention is sdpa(q, k, v, mask) (mask &= keep) or softmax(scores [B, H, S, S]) written out
(scores = where(keep, scores, min)); cross-attention to another sequence keeps all its keys.

Contract: requires a routed block and its router node; the predictor MLP is registered at
`<block>.mod_predictor` (Linear(D, h) -> GELU -> Linear(h, 1)), shared by every graph variant.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import Graph, Node

from ..config import predictor_width
from ..errors import ModfxError
from .discover import Block
from .graph_utils import aten, call, fake_mode_of, get_attr, op_arg, propagate, shape_exprs
from .route_topk import Routed, _weighted, contribution, real_tokens, size
from .router import get_or_add_module

N_STATS = 5  # aux loss, accuracy, precision, recall, fraction predicted "selected"

_ATTENTION = aten.scaled_dot_product_attention.default
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}


class _AddAuxLoss(torch.autograd.Function):
    """Returns `out` unchanged; in backward, gives `aux` the gradient 1 (so `aux` is minimised as if it
    had been added to the loss) without touching the gradient that flows to `out`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(out, aux):
        return out.view_as(out)

    @staticmethod
    def setup_context(ctx, inputs, output):  # forward without ctx: torch.func transforms accept it
        ctx.aux_dtype = inputs[1].dtype

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_ones((), dtype=ctx.aux_dtype)


def add_aux_loss(out: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return out
    return _AddAuxLoss.apply(out, aux)


def predictor_logits(graph: Graph, root: nn.Module, block: Block, hidden: int | None) -> Node:
    """p [B, S]: the predictor's logit of "this token is in the top-k", from stopgrad(x)."""
    x = block.x.meta["val"]
    d = x.shape[-1]
    h = hidden or predictor_width(d)
    path = f"{block.name}.mod_predictor"
    mlp = get_or_add_module(root, path, lambda: _new_predictor(d, h, x))
    st = block.stack
    params = {n: get_attr(graph, f"{path}.{n}", p, stack=st) for n, p in mlp.named_parameters()}
    xd = call(graph, aten.detach.default, (block.x,), stack=st, tag="predictor")
    hid = call(graph, aten.linear.default, (xd, params["0.weight"], params["0.bias"]), stack=st, tag="predictor")
    hid = call(graph, aten.gelu.default, (hid,), stack=st, tag="predictor")
    # the second layer (h -> 1) as a weighted sum, not a [.., h] x [h, 1] GEMM: Inductor fuses it into the
    # GELU's kernel, where a GEMM would be a library call of its own (and two more in backward)
    p = call(graph, aten.mul.Tensor, (hid, params["2.weight"]), stack=st, tag="predictor")  # [B, S, h]
    p = call(graph, aten.sum.dim_IntList, (p, [-1], True), stack=st, tag="predictor")  # [B, S, 1]
    p = call(graph, aten.add.Tensor, (p, params["2.bias"]), stack=st, tag="predictor")
    return per_token(graph, p, block)  # [B, S]


def per_token(graph: Graph, score: Node, block: Block) -> Node:
    """A per-token score [B, S, 1] (or [S, B, 1] for a sequence-first block) as [B, S]."""
    t = call(graph, aten.squeeze.dim, (score, -1), stack=block.stack)
    if block.batch_axis == 1:
        t = call(graph, aten.permute.default, (t, [1, 0]), stack=block.stack)
    return t


def _new_predictor(d: int, h: int, like: torch.Tensor) -> nn.Sequential:
    dtype = like.dtype if like.dtype.is_floating_point else torch.float32
    return nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, 1)).to(device=like.device, dtype=dtype)


def add_predictor_loss(graph: Graph, root: nn.Module, block: Block, routed: Routed, hidden: int | None,
                       weight: float, terms: list | None = None) -> tuple[Node, Node]:
    """Top-k graph: predictor + BCE aux loss injected into backward (or, given `terms`, weight * aux
    appended to them). Returns the new block output and the stats node [N_STATS]."""
    st = block.stack
    with graph.inserting_before(routed.out.next):
        p = predictor_logits(graph, root, block, hidden)
        target = topk_target(graph, p, routed.idx, st, "predictor")
        aux = call(graph, aten.binary_cross_entropy_with_logits.default, (p, target), stack=st, tag="predictor")
        stats = _stats(graph, p, target, aux, st)
    return _ride_along(graph, routed.out, aux, weight, st, terms), stats


def add_router_loss(graph: Graph, block: Block, routed: Routed, r: Node, out: Node, weight: float,
                    terms: list | None = None) -> Node:
    """Top-k graph: BCE of the router score r itself against top-k membership, injected into backward

        aux = bce_with_logits(r[..., 0], scatter(zeros, 1, idx, 1))      # [B, S] logits vs membership
        y'  = add_aux_loss(y, weight * aux)                              # y: the block's current output

    Returns the new block output."""
    st = block.stack
    with graph.inserting_before(out.next):
        logits = per_token(graph, r, block)  # [B, S]
        target = topk_target(graph, logits, routed.idx, st, "router")
        aux = call(graph, aten.binary_cross_entropy_with_logits.default, (logits, target), stack=st, tag="router")
    return _ride_along(graph, out, aux, weight, st, terms)


def topk_target(graph: Graph, like: Node, idx: Node, st, tag: str) -> Node:
    """[B, S] 1.0 at the top-k tokens, 0.0 elsewhere."""
    zeros = call(graph, aten.zeros_like.default, (like,), stack=st)
    return call(graph, aten.scatter.value, (zeros, 1, idx, 1.0), stack=st, tag=tag)


def _ride_along(graph: Graph, out: Node, aux: Node, weight: float, st, terms: list | None) -> Node:
    """out' = add_aux_loss(out, weight * aux), inserted after `aux`; every user of `out` reads out'.
    Given `terms` (aux_in_backward=False), weight * aux is appended to them instead, and `out` returned."""
    users = list(out.users)  # the nodes after the block; none of the new nodes reads `out`
    with graph.inserting_after(aux):
        scaled = call(graph, aten.mul.Tensor, (aux, weight), stack=st)
    if terms is not None:
        terms.append(scaled)
        return out
    with graph.inserting_after(scaled):
        new = call(graph, add_aux_loss, (out, scaled), stack=st, tag=aux.meta["modfx_role"])
    for u in users:
        u.replace_input_with(out, new)
    return new


def _stats(graph: Graph, p: Node, target: Node, aux: Node, st) -> Node:
    def c(op, *args):
        return call(graph, op, args, stack=st)

    pred = call(graph, aten._to_copy.default, (c(aten.gt.Scalar, p, 0.0),), {"dtype": torch.float32}, stack=st)
    t = call(graph, aten._to_copy.default, (target,), {"dtype": torch.float32}, stack=st)
    tp = c(aten.sum.default, c(aten.mul.Tensor, pred, t))
    hit = call(graph, aten._to_copy.default, (c(aten.eq.Tensor, pred, t),), {"dtype": torch.float32}, stack=st)
    acc = c(aten.mean.default, hit)
    precision = c(aten.div.Tensor, tp, c(aten.clamp_min.default, c(aten.sum.default, pred), 1.0))
    recall = c(aten.div.Tensor, tp, c(aten.clamp_min.default, c(aten.sum.default, t), 1.0))
    frac = c(aten.mean.default, pred)
    aux32 = call(graph, aten._to_copy.default, (aux,), {"dtype": torch.float32}, stack=st)
    stats = c(aten.stack.default, [aux32, acc, precision, recall, frac])
    return c(aten.detach.default, stats)


def route_predictor(graph: Graph, root: nn.Module, block: Block, r: Node, hidden: int | None,
                    weighting: str, real: Node | None = None) -> tuple[Node, Node]:
    """Predictor graph: the block runs on all tokens with attention restricted to selected keys; selected
    tokens get x + w(r) * f, the others pass through; padded tokens (`real` 0) are never selected.
    Returns the merged output and the stats node."""
    attn = [n for n in block.nodes if n.target is _ATTENTION]
    self_attn = [a for a in attn if _key_length(a) == block.seq_expr]  # not cross-attention to another sequence
    for a in attn:
        if a not in self_attn and _key_length(a).free_symbols & block.seq_expr.free_symbols:
            raise ModfxError(
                f"block {block.name}: attention {a.name} has {_key_length(a)} keys, a length that follows the block's "
                f"{block.seq_expr} tokens without being it (extra memory or prefix keys?), so predictor routing cannot "
                "limit its keys to the selected tokens; top-k routing handles it"
            )
    self_scores = token_softmaxes(block)  # attention written out: softmax(q @ k^T ...) over [B, H, S, S]
    st = block.stack
    x = block.x
    region = set(block.nodes)
    with graph.inserting_before(block.first):
        p = predictor_logits(graph, root, block, hidden)
        sel = call(graph, aten.gt.Scalar, (p, 0.0), stack=st, tag="predictor")  # [B, S]
        if real is not None:
            sel = call(graph, aten.logical_and.default, (sel, real_tokens(graph, real, p, block, "predictor")),
                       stack=st, tag="predictor")
        if self_attn or self_scores:
            keep = _key_mask(graph, block, sel)  # [B, 1, S, S]
    for a in self_attn:
        _restrict_attention(graph, a, keep, st)
    for sm in self_scores:
        _restrict_scores(graph, sm, keep, st)
    propagate(block.nodes, fake_mode_of(graph))

    y = block.out
    outside = [u for u in y.users if u not in region]
    with graph.inserting_before(y.next):
        f = contribution(graph, block, x)
        upd = call(graph, aten.add.Tensor, (x, _weighted(graph, f, r, weighting, st)), stack=st)
        m = call(graph, aten.unsqueeze.default, (sel, -1), stack=st)
        if block.batch_axis == 1:
            m = call(graph, aten.permute.default, (m, [1, 0, 2]), stack=st)
        merged = call(graph, aten.where.self, (m, upd, x), stack=st, tag="scatter")
        frac = call(graph, aten.mean.default, (call(graph, aten._to_copy.default, (sel,), {"dtype": torch.float32}, stack=st),), stack=st)
        nan = call(graph, aten.full.default, ([4], float("nan")), {"dtype": torch.float32, "device": x.meta["val"].device}, stack=st)
        stats = call(graph, aten.cat.default, ([nan, call(graph, aten.unsqueeze.default, (frac, 0), stack=st)],), stack=st)
    for u in outside:
        u.replace_input_with(y, merged)
    merged.meta["modfx_sel"] = sel  # which tokens entered the block, for the KV-cache prefill
    return merged, stats


def token_softmaxes(block: Block) -> list[Node]:
    """The block's softmaxes over its own tokens as keys: attention computed as softmax(scores) [B, H, S, S]
    (eager attention). Raises ModfxError for a softmax over keys that follow S without being S, or over
    scores laid out otherwise (e.g. [B * H, S, S]), which predictor routing cannot limit to selected keys."""
    out = []
    seq = block.seq_expr
    for n in block.nodes:
        shape = shape_exprs(n.args[0]) if n.target in _SOFTMAX else None
        if not shape or op_arg(n.target, n.args, n.kwargs, "dim", -1) not in (-1, len(shape) - 1):
            continue
        if shape[-1] != seq and not shape[-1].free_symbols & seq.free_symbols:
            continue  # not over the block's tokens: a router's softmax over experts, cross-attention's keys
        if shape[-2:] == (seq, seq) and len(shape) == 4 and block.batch_axis == 0:
            out.append(n)
        else:
            raise ModfxError(
                f"block {block.name}: softmax {n.name} over scores {list(shape)} runs over its tokens in a layout "
                "predictor routing cannot limit to the selected keys (it handles scaled_dot_product_attention and "
                "softmax over [batch, heads, tokens, tokens]); top-k routing handles it"
            )
    return out


def _restrict_scores(graph: Graph, sm: Node, keep: Node, st) -> None:
    """softmax(scores) -> softmax(where(keep, scores, min)): keys a query may not see get the dtype's lowest value."""
    scores = sm.args[0]
    low = torch.finfo(scores.meta["val"].dtype).min
    with graph.inserting_before(sm):
        masked = call(graph, aten.where.ScalarOther, (keep, scores, low), stack=st)
    sm.args = (masked, *sm.args[1:])


def _key_length(a: Node):
    """The length of an attention's key axis, as a sympy expression."""
    return shape_exprs(a.args[1])[-2]


def _key_mask(graph: Graph, block: Block, sel: Node) -> Node:
    """keep[b, 0, i, j] = sel[b, j] or i == j: queries see selected keys, and always themselves."""
    st = block.stack
    S = size(graph, sel, 1, st)
    dev = sel.meta["val"].device
    pos = call(graph, aten.arange.default, (S,), {"device": dev}, stack=st)
    eye = call(graph, aten.eq.Tensor, (call(graph, aten.unsqueeze.default, (pos, 1), stack=st),
                                       call(graph, aten.unsqueeze.default, (pos, 0), stack=st)), stack=st)  # [S, S]
    keys = call(graph, aten.unsqueeze.default, (call(graph, aten.unsqueeze.default, (sel, 1), stack=st), 1), stack=st)
    return call(graph, aten.logical_or.default, (keys, eye), stack=st)  # [B, 1, S, S]


def _restrict_attention(graph: Graph, a: Node, keep: Node, st) -> None:
    mask, dropout_p, causal = (op_arg(a.target, a.args, a.kwargs, name, default)
                               for name, default in (("attn_mask", None), ("dropout_p", 0.0), ("is_causal", False)))
    with graph.inserting_before(a):
        allowed = keep
        if causal:
            ones = call(graph, aten.ones_like.default, (keep,), {"dtype": torch.bool}, stack=st)
            allowed = call(graph, aten.logical_and.default, (allowed, call(graph, aten.tril.default, (ones,), stack=st)), stack=st)
        if mask is not None and mask.meta["val"].dtype == torch.bool:
            allowed = call(graph, aten.logical_and.default, (allowed, mask), stack=st)
        elif mask is not None:
            neg = torch.finfo(mask.meta["val"].dtype).min
            bias = call(graph, aten.where.Scalar, (allowed, 0.0, neg), stack=st)
            allowed = call(graph, aten.add.Tensor, (mask, call(graph, aten._to_copy.default, (bias,), {"dtype": mask.meta["val"].dtype}, stack=st)), stack=st)
    a.args = (*a.args[:3], allowed, dropout_p, False)
    a.kwargs = {k: v for k, v in a.kwargs.items() if k not in ("attn_mask", "dropout_p", "is_causal")}
