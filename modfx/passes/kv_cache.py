"""KV caches for sampling: attention ops found in the graph read per-block caches that hold only the
tokens routed through the block, and a routed block skips all of its work for a token the predictor
does not select (torch.cond).

Prefill (the predictor-routing graph of the whole prompt) gains outputs:

    outputs += (k, v) of every attention op      # [B, Hk, S, hd], RoPE already applied at true positions
    outputs += sel of every routed block         # [B, S] bool: which tokens enter its cache

Decode (a capture of one new token with its absolute position), for every attention op:

    before:                                     after:
        y = sdpa(q, k, v, mask, causal)             K = cat(Kc, k, 2); V = cat(Vc, v, 2)     # [B, Hk, L+S, hd]
                                                    valid = cat(arange(L) < len[:, None],     # [B, 1, S, L+S]
                                                                tril(ones(S, S)))  # S new tokens
                                                    y = sdpa(q, K, V, valid)
                                                    outputs += (k, v)   # the caller appends them

and for every routed block:

    before:                                     after:
        y = block(x, ...)                           sel = predictor(x)[:, 0] > 0            # [B]
                                                    f, k.., v.. = cond(any(sel), block_f, zeros, operands)
                                                    y = where(sel, x + w(r) * f, x)
                                                    outputs += (sel,)

Caches are graph inputs (Kc, Vc per attention op, len per block); `modfx.generate` owns them and writes
each step's k, v at slot len[b], advancing len only for the rows whose token entered the block.

Grouped-query attention: when the attention's k and v are their Hk-head sources repeated per query group
(`repeat_interleave(k, r, 1)`, or `expand(k[:, :, None], [B, Hk, r, S, hd]).reshape(B, Hk*r, S, hd)`),
the caches hold the Hk heads and the decode attention reads them with `enable_gqa=True`:

    before:  y = sdpa(q, repeat(k), repeat(v), ...)      after:  K = cat(Kc, k, 2)      # [B, Hk, L+S, hd]
                                                                 y = sdpa(q, K, V, valid, enable_gqa=True)

Contract: requires blocks whose attention is `aten.scaled_dot_product_attention` with one query token at
decode; ensures the decode graph's extra inputs and outputs are listed in `DecodeSignature`.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from ..errors import ModfxError
from .discover import Block
from .graph_utils import (aten, call, emit_sym_expr, erase_unused, fake_mode_of, module_paths, op_arg, run_fake,
                          shape_exprs)
from .predictor import _ATTENTION, predictor_logits, token_softmaxes
from .route_topk import _weighted, contribution, size
from .router import insert_router

_DUMMY_LEN = 4  # cache length of the fake values used while rewriting; the code works for any length


@dataclasses.dataclass
class DecodeSignature:
    attention: list[int]  # per attention op, in output order: the index of its block
    routed: list[int]  # routed block indices, in output order


def attention_ops(block: Block) -> list[Node]:
    return [n for n in block.nodes if n.target is _ATTENTION]


def _qkv(a: Node):
    return a.args[0], a.args[1], a.args[2]


def _cached_kv(a: Node) -> tuple[Node, Node, bool]:
    """The k and v a cache holds for attention `a`: their Hk-head sources when both are repeated per
    query group (then True: the decode attention uses enable_gqa), else the attention's own inputs."""
    _, k, v = _qkv(a)
    ks, vs = _group_source(k), _group_source(v)
    if ks and vs and ks[1] == vs[1]:
        return ks[0], vs[0], True
    return k, v, False


def _group_source(t: Node) -> tuple[Node, int] | None:
    """(src, r) if t [B, Hk*r, S, hd] is src [B, Hk, S, hd] with each head repeated r times in place
    (each query group reads its own kv head): repeat_interleave(src, r, 1), or unsqueeze(src, 2) expanded
    to [B, Hk, r, S, hd] and reshaped (clones and full slices allowed between); else None."""
    shape = shape_exprs(t)  # sympy expressions: compared without adding guards to the shape environment
    if shape is None or len(shape) != 4:
        return None
    if t.target is aten.repeat_interleave.self_int:
        src, r = t.args[0], t.args[1]
        dim = t.args[2] if len(t.args) > 2 else t.kwargs.get("dim")
        if isinstance(r, int) and r > 1 and dim in (1, -3):
            return src, r
        return None
    if t.target not in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        return None
    e = _skip(t.args[0], clones=True)
    if e.target is not aten.expand.default:
        return None
    big, one = shape_exprs(e), shape_exprs(e.args[0])
    u = _skip(e.args[0])
    if u.target is not aten.unsqueeze.default or u.args[1] not in (2, -3) or big is None or len(big) != 5:
        return None
    src = _skip(u.args[0])
    small = shape_exprs(src)
    r = big[2]
    if small is None or len(small) != 4 or one is None or one[2] != 1 or not (r.is_Integer and r > 1):
        return None
    if (big[0], big[1], big[3], big[4]) != small or shape != (small[0], small[1] * r, small[2], small[3]):
        return None
    return src, int(r)


def _skip(n: Node, clones: bool = False) -> Node:
    """n without the full slices (and, with clones=True, copies) that lead to it."""
    while isinstance(n, Node):
        full_slice = n.target is aten.slice.Tensor and _full_slice(n)
        if not (full_slice or (clones and n.target in (aten.clone.default, aten.contiguous.default))):
            return n
        n = n.args[0]
    return n


def _full_slice(n: Node) -> bool:
    _, start, end, step = (list(n.args[1:]) + [0, None, None, 1][len(n.args) - 1:])[:4]  # dim, start, end, step
    return start in (None, 0) and step == 1 and (end is None or (isinstance(end, int) and end >= 2**62))


def expose_prefill(graph: Graph, blocks: list[Block], sel_of: dict[int, Node]) -> None:
    """Append to the predictor-routing graph's outputs: k, v of each attention op, then sel per routed block."""
    extra = []
    for b in blocks:
        for a in attention_ops(b):
            k, v, _ = _cached_kv(a)
            extra += [k, v]
    out = graph.output_node()
    out.args = (tuple(out.args[0]) + tuple(extra) + tuple(sel_of[i] for i in sorted(sel_of)),)


def rewrite_decode(graph: Graph, root: nn.Module, blocks: list[Block], routed: tuple[int, ...], config,
                   owner_prefix: str = "modfx_decode") -> DecodeSignature:
    """Rewrite a capture of new tokens into the cached decode step; appends its extra outputs
    (k, v per attention op, then sel per routed block) to the graph's output."""
    for b in blocks:
        written_out = token_softmaxes(b) if not attention_ops(b) else []
        if written_out:
            raise ModfxError(
                f"generate: block {b.name} computes attention as softmax(q @ k^T) ({written_out[0].name}), not with "
                "scaled_dot_product_attention, whose keys and values the KV caches hold. Build the model with SDPA "
                "attention (Hugging Face: attn_implementation='sdpa'), or sample by running the full sequence in "
                "predictor routing (modfx.set_routing(mod, 'predictor'))."
            )
    inside = {n for b in blocks for n in b.nodes}
    outside = [n for n in graph.nodes if n.target is _ATTENTION and n not in inside]
    if outside:
        stack = module_paths(outside[0])
        raise ModfxError(
            f"generate: attention {outside[0].name} ({stack[-1] if stack else 'the model'}) lies outside the blocks "
            f"found ({', '.join(b.name for b in blocks)}), so no KV cache would hold its keys and values. A layer "
            "that is no block (see modfx.plan and the warnings of modfx.transform) cannot be decoded with caches; "
            "sample by running the full sequence in predictor routing (modfx.set_routing(mod, 'predictor'))."
        )
    fake_mode = fake_mode_of(graph)
    last_ph = graph.find_nodes(op="placeholder")[-1]
    out = graph.output_node()
    sig_attn = []
    for b in blocks:
        attn = attention_ops(b)
        if not attn:
            continue
        B = b.x.meta["val"].shape[b.batch_axis]
        with graph.inserting_after(last_ph):
            with fake_mode:
                lens_val = torch.empty((B,), dtype=torch.int64, device=b.x.meta["val"].device)
            lens = last_ph = _placeholder(graph, f"cache_len_{b.index}", lens_val)
        for j, a in enumerate(attn):
            k, v, _ = _cached_kv(a)
            with fake_mode:
                shape = list(k.meta["val"].shape)
                shape[-2] = _DUMMY_LEN
                val = torch.empty(shape, dtype=k.meta["val"].dtype, device=k.meta["val"].device)
            with graph.inserting_after(last_ph):
                kc = _placeholder(graph, f"k_cache_{b.index}_{j}", val)
            with graph.inserting_after(kc):
                vc = last_ph = _placeholder(graph, f"v_cache_{b.index}_{j}", val)
            _attend_over_cache(graph, b, a, kc, vc, lens)
            out.args = (tuple(out.args[0]) + (k, v),)
            sig_attn.append(b.index)
    rerouted = {}
    for b in blocks:
        b.x = rerouted.get(b.x, b.x)
        if b.index in routed:
            old = b.out
            sel, merged = _skip_unselected(graph, root, b, config, f"{owner_prefix}_{b.index}")
            rerouted[old] = merged
            out.args = (tuple(out.args[0]) + (sel,),)
    graph.lint()
    return DecodeSignature(sig_attn, [b.index for b in blocks if b.index in routed])


def _unsqueeze(graph: Graph, n: Node, dims, st) -> Node:
    for d in dims:
        n = call(graph, aten.unsqueeze.default, (n, d), stack=st)
    return n


def _placeholder(graph: Graph, name: str, val: torch.Tensor) -> Node:
    n = graph.placeholder(name)
    n.meta["val"] = val
    return n


def _attend_over_cache(graph: Graph, b: Block, a: Node, kc: Node, vc: Node, lens: Node) -> None:
    st = b.stack
    q, k_in, v_in = _qkv(a)
    k, v, gqa = _cached_kv(a)
    with graph.inserting_before(a):
        K = call(graph, aten.cat.default, ([kc, k], -2), stack=st)
        V = call(graph, aten.cat.default, ([vc, v], -2), stack=st)
        L = call(graph, aten.sym_size.int, (kc, kc.meta["val"].dim() - 2), stack=st)  # read at run time
        S = size(graph, q, q.meta["val"].dim() - 2, st)
        B = size(graph, lens, 0, st)
        dev = lens.meta["val"].device
        pos = call(graph, aten.arange.default, (L,), {"device": dev}, stack=st)
        old = call(graph, aten.lt.Tensor, (call(graph, aten.unsqueeze.default, (pos, 0), stack=st),
                                           call(graph, aten.unsqueeze.default, (lens, 1), stack=st)), stack=st)  # [B, L]
        old = call(graph, aten.expand.default, (_unsqueeze(graph, old, (1, 1), st), [B, 1, S, L]), stack=st)
        ones = call(graph, aten.ones.default, ([S, S],), {"dtype": torch.bool, "device": dev}, stack=st)
        new = call(graph, aten.tril.default, (ones,), stack=st)  # new tokens: causal among themselves
        new = call(graph, aten.expand.default, (_unsqueeze(graph, new, (0, 0), st), [B, 1, S, S]), stack=st)
        mask = call(graph, aten.cat.default, ([old, new], -1), stack=st)  # [B, 1, S, L+S]
    dropout = op_arg(a.target, a.args, a.kwargs, "dropout_p", 0.0)
    a.meta["modfx_new_kv"] = (k, v)  # this step's keys and values, before the cache was prepended
    a.args = (q, K, V, mask, dropout, False)
    a.kwargs = {kk: vv for kk, vv in a.kwargs.items() if kk not in ("attn_mask", "dropout_p", "is_causal")}
    if gqa:
        a.kwargs = {**a.kwargs, "enable_gqa": True}
        erase_unused(k_in)
        erase_unused(v_in)
    a.meta["val"] = run_fake(a.target, a.args, a.kwargs, fake_mode_of(graph))


def _skip_unselected(graph: Graph, root: nn.Module, b: Block, config, name: str) -> tuple[Node, Node]:
    """Replace the routed block by cond(any(sel), block, zeros) and merge with where(sel).
    Returns sel [B] and the merged block output."""
    st = b.stack
    x = b.x
    r = insert_router(graph, root, b)  # [B, 1, 1]
    with graph.inserting_before(b.first):
        p = predictor_logits(graph, root, b, config.predictor_hidden)  # [B, 1]
        sel2 = call(graph, aten.gt.Scalar, (p, 0.0), stack=st)
        sel = call(graph, aten.select.int, (sel2, 1, 0), stack=st)  # [B]
        run = call(graph, aten.any.default, (sel,), stack=st)
    # f inside the region, so that the cond returns the block's contribution
    y = b.out
    outside = [u for u in y.users]
    with graph.inserting_before(y.next):
        f = contribution(graph, b, x)
    region = _range(b.first, f)
    kv = []
    for a in [n for n in region if n.target is _ATTENTION]:
        kv += list(a.meta["modfx_new_kv"])
    outs = [f] + kv
    try:
        operands, true_gm, false_gm = _extract(graph, region, outs)
    except ModfxError as e:
        raise ModfxError(f"block {b.name}: {e}") from e
    root.add_module(f"{name}_run", true_gm)
    root.add_module(f"{name}_skip", false_gm)
    with graph.inserting_before(f.next):
        t_attr = graph.get_attr(f"{name}_run")
        f_attr = graph.get_attr(f"{name}_skip")
        cond = graph.call_function(torch.ops.higher_order.cond, (run, t_attr, f_attr, tuple(operands)))
        cond.meta["val"] = tuple(o.meta["val"] for o in outs)
        cond.meta["nn_module_stack"] = dict(st)
        got = [call(graph, operator.getitem, (cond, i), stack=st) for i in range(len(outs))]
        wf = _weighted(graph, got[0], r, config.weighting, st)
        upd = call(graph, aten.add.Tensor, (x, wf), stack=st)
        m = call(graph, aten.unsqueeze.default, (call(graph, aten.unsqueeze.default, (sel, 1), stack=st), 2), stack=st)
        merged = call(graph, aten.where.self, (m, upd, x), stack=st, tag="scatter")
    # the rest of the graph reads the cond's results instead of the region's
    for old, new in zip(outs, got):
        for u in list(old.users):
            if u not in region and u is not cond:
                u.replace_input_with(old, new)
    for u in outside:
        if u not in region:
            u.replace_input_with(y, merged)
    for n in reversed(region):
        if not n.users:
            graph.erase_node(n)
        else:
            raise ModfxError(f"block {b.name}: node {n.name} is still used after moving the block into torch.cond")
    return sel, merged


def _range(first: Node, last: Node) -> list[Node]:
    out, n = [], first
    while True:
        out.append(n)
        if n is last:
            return out
        n = n.next


def _extract(graph: Graph, region: list[Node], outs: list[Node]):
    """The region as a GraphModule taking its external inputs (weights included) as operands, and a
    twin returning zeros of the same shapes."""
    inside = set(region)
    external: list[Node] = []
    for n in region:
        for a in n.all_input_nodes:
            if a not in inside and a not in external:
                external.append(a)
    tensors = [e for e in external if isinstance(e.meta.get("val"), torch.Tensor)]
    syms = [e for e in external if e not in tensors]
    sub, env = Graph(), {}
    for e in tensors:
        env[e] = sub.placeholder(e.name)
        env[e].meta = dict(e.meta)
    for s in syms:  # sizes are re-read from a tensor operand that carries them
        env[s] = _size_from(sub, s, tensors, env)
    for n in region:
        env[n] = sub.node_copy(n, lambda a: env[a])
    # contiguous outputs, so both branches agree on strides (cond requires it)
    sub.output(tuple(sub.call_function(aten.clone.default, (env[o],), {"memory_format": torch.contiguous_format})
                     for o in outs))
    true_gm = GraphModule(nn.Module(), sub)

    zero, zenv = Graph(), {}
    for e in tensors:
        zenv[e] = zero.placeholder(e.name)
        zenv[e].meta = dict(e.meta)
    zeros = []
    for o in outs:
        v = o.meta["val"]
        shape = [_size_in(zero, s, tensors, zenv) for s in v.shape]
        zeros.append(zero.call_function(aten.zeros.default, (shape,), {"dtype": v.dtype, "device": v.device}))
    zero.output(tuple(zeros))
    false_gm = GraphModule(nn.Module(), zero)
    return tensors, true_gm, false_gm


def _size_from(sub: Graph, s: Node, tensors: list[Node], env) -> Node:
    v = s.meta.get("val")
    if not isinstance(v, torch.SymInt):
        raise ModfxError(f"cannot move non-tensor value {s.name} into a torch.cond branch")
    return _size_in(sub, v, tensors, env)


def _size_in(sub: Graph, size_val, tensors: list[Node], env):
    """size_val read off the operands inside a branch: the axis that carries it, or, for a product of
    sizes such as B * S * top_k in a mixture-of-experts layer, the expression over axes that carry its
    symbols."""
    if not isinstance(size_val, torch.SymInt):
        return int(size_val)
    e = size_val.node.expr
    axis_of = {}
    for t in tensors:
        for ax, d in enumerate(t.meta["val"].shape):
            if isinstance(d, torch.SymInt):
                axis_of.setdefault(d.node.expr, (t, ax, d))

    def read(t, ax, d):
        n = sub.call_function(aten.sym_size.int, (env[t], ax))
        n.meta["val"] = d
        return n

    if e in axis_of:
        return read(*axis_of[e])
    missing = [str(s) for s in e.free_symbols if s not in axis_of]
    if missing:
        raise ModfxError(
            f"generate cannot skip this routed block at decode: its graph uses the size {e}, and no input of the "
            f"block carries {', '.join(missing)} as an axis, so the block cannot move into a torch.cond branch. "
            "Sample with dense=True, or with full-sequence causal routing (modfx.set_routing(mod, 'predictor'))."
        )
    return emit_sym_expr(sub, e, {s: read(*axis_of[s]) for s in e.free_symbols})
