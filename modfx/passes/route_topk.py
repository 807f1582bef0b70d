"""Top-k routing: run a block on the k highest-scoring tokens of each sequence, pass the rest through.

    before:                                   after:
        r = linear(x, w_router)  # [B, S, 1]      r      = linear(x, w_router)                # [B, S, 1]
        y = block(x, cos, mask)  # [B, S, D]      k      = (S * num + den - 1) // den          # ceil(c * S)
        use(y)                                    key    = bits(r[..., 0]) * 2**32 + S-1-pos   # int64; ties -> earlier token
                                                  idx    = sort(topk(key, k)[1])[0]             # [B, k] causal order
                                                  b      = arange(B)[:, None]                   # [B, 1]
                                                  xp, xg = split_tokens(x, b, idx)              # x, x[b, idx] [B, k, D]
                                                  cosg   = gather(cos, 1, idx)                  # token axes of side inputs,
                                                  maskg  = gather(gather(mask, 2, idx), 3, idx) #   original positions kept
                                                  yg     = block(xg, cosg, maskg)               # the region, on k tokens
                                                  f      = sum(residual terms) or yg - xg       # contribution only
                                                  wg     = weighting(gather(r, 1, idx))         # [B, k, 1]
                                                  y'     = index_put(xp, (b, idx), wg * f, accumulate=True)
                                                  use(y')                                       # x + wg * f at the k
                                                                                                #   rows, others untouched
Under autocast the block's terms may come out in bfloat16 while x stays float32: f sums the terms and
the merge adds wg * f in x's dtype (`type_as`, resolved at run time), as the model's own `x + t0 + t1`
promotes them.
The merge adds at unique indices (every element written at most once, so deterministic), and the
residual is added once. Its forward is an `index_put`, which Inductor re-inplaces into x's buffer once x
has no later reader (a `scatter_add` would copy all of x first). `split_tokens` is x and its chosen rows
with one backward for both: x's gradient is y's gradient with the chosen rows' gradient added in place
(`index_put(g, (b, idx), g_xg, accumulate=True)`), where autograd would sum y's gradient with a
full-size scatter of g_xg into zeros. Forward values and gradients are those of
`scatter(x, 1, idx, xg + wg * f)` with `xg = gather(x, 1, idx)`.
Symbolic sizes the region read from the full sequence (S in view/reshape arguments) are re-derived with
S -> k; when S is static (e.g. a patch count), literal S in the region's size arguments becomes k, after
a check that S is no other size in the block (`_static_token_count`). The top-k runs over one int64 key
per token, the score's order-preserving bits above its reversed position, so ties in the router score go
to the earlier token and the chosen set is that of a stable descending sort, whatever the top-k kernel
(float64 scores leave no room for the position: they take the stable sort). With `MoDConfig.padding_mask`,
a padded token's key gets score bits below every real token's, so padding takes a slot only when a
sequence has fewer than k real tokens.

Contract: requires a discovered `Block` and its router node; ensures the block region runs on k tokens
and returns `Routed` (the indices and the merged output) for the predictor pass.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from fractions import Fraction

import sympy
import torch
from torch.fx import Graph, Node
from torch.fx.node import map_arg
from torch.utils import _pytree as pytree

from ..errors import ModfxError
from .discover import Block, SideInput
from .graph_utils import aten, call, emit_sym_expr, expr, fake_mode_of, propagate, symint_node


@dataclasses.dataclass
class Routed:
    idx: Node  # [B, k] int64, sorted: the tokens that run the block
    out: Node  # the merged output [B, S, D]
    x_chosen: Node  # xg [B, k, D]: the block input of the chosen tokens
    r_chosen: Node  # rg [B, k, 1]: their router scores (the weighting reads it)


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


class _SplitTokens(torch.autograd.Function):
    """(x, x[rows]): one backward for both uses of x, adding the chosen rows' gradient into y's in place.
    Not used under torch.func transforms (see split_tokens)."""

    @staticmethod
    def forward(x, *rows):
        return x.view_as(x), x[rows]

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    def backward(ctx, grad_x, grad_chosen):
        rows = ctx.saved_tensors
        return (torch.index_put(grad_x, rows, grad_chosen, accumulate=True), *(None for _ in rows))


def split_tokens(x: torch.Tensor, *rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x and its chosen rows x[rows]; with autograd on, x's gradient adds the rows' gradient in place.
    Under torch.func transforms, plain indexing (the same gradient): torch.compile cannot vmap a custom
    autograd.Function, whatever its vmap rule."""
    if torch.is_grad_enabled() and x.requires_grad and not torch._C._are_functorch_transforms_active():
        return _SplitTokens.apply(x, *rows)
    return x, x[rows]


def token_rows(graph: Graph, idx: Node, B, block: Block, stack) -> tuple[Node, Node]:
    """Index tensors selecting the chosen tokens of x: (arange(B)[:, None], idx) for [B, S, D], or
    (idx^T, arange(B)[None]) for a sequence-first [S, B, D]; x[rows] is [B, k, D] (or [k, B, D])."""
    b = call(graph, aten.arange.default, (B,), {"dtype": torch.int64, "device": idx.meta["val"].device}, stack=stack)
    if block.batch_axis == 0:
        return call(graph, aten.unsqueeze.default, (b, 1), stack=stack), idx
    return call(graph, aten.permute.default, (idx, [1, 0]), stack=stack), call(graph, aten.unsqueeze.default, (b, 0), stack=stack)


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


def chosen_count(n: Node):
    """The k argument (an int or a SymInt node) of the node that picks a routed block's k tokens (the top-k,
    or the slice of a stable sort for float64 scores); None for any other node."""
    at = {aten.topk.default: 1, aten.slice.Tensor: 3}.get(n.target) if n.meta.get("modfx_role") == "topk" else None
    return n.args[at] if at is not None and len(n.args) > at else None


def select_topk(graph: Graph, block: Block, r: Node, capacity: Fraction, real: Node | None = None):
    """Nodes for S, k, the router logits [B, S] and the sorted top-k indices [B, k]; `real` ([B, S], 0 for
    padding) ranks padded tokens last."""
    st = block.stack
    S = seq_len(graph, block)
    k = capacity_k(graph, S, capacity, st)
    logits = call(graph, aten.squeeze.dim, (r, -1), stack=st)  # [B, S] or [S, B]
    if block.batch_axis == 1:
        logits = call(graph, aten.permute.default, (logits, [1, 0]), stack=st)  # [B, S]
    if real is not None:
        real = real_tokens(graph, real, logits, block)
    if logits.meta["val"].dtype == torch.float64:  # no room for the position next to 64-bit score bits
        if real is not None:  # padding last (after real tokens scored -inf, too: the stable sort's order)
            logits = call(graph, aten.where.ScalarOther, (real, logits, float("-inf")), stack=st, tag="topk")
        ranked = call(graph, aten.sort.stable, (logits,), {"stable": True, "dim": 1, "descending": True}, stack=st, tag="sort")
        order = call(graph, operator.getitem, (ranked, 1), stack=st)
        top = call(graph, aten.slice.Tensor, (order, 1, 0, k), stack=st, tag="topk")  # [B, k]
    else:
        top = _topk_earliest(graph, logits, S, k, st, real)
    in_order = call(graph, aten.sort.default, (top, 1), stack=st, tag="sort")
    idx = call(graph, operator.getitem, (in_order, 0), stack=st)  # [B, k] ascending positions
    return S, k, logits, idx


def real_tokens(graph: Graph, mask: Node, logits: Node, block: Block, tag: str = "topk") -> Node:
    """The padding-mask input as a bool [B, S] (True = real token), checked against the block's tokens."""
    want = [str(expr(d)) for d in logits.meta["val"].shape]
    v = mask.meta.get("val")
    got = [str(expr(d)) for d in v.shape] if isinstance(v, torch.Tensor) else None
    if got is None or len(got) != 2 or got[1] != want[1]:  # (each input's batch axis has its own symbol)
        raise ModfxError(
            f"block {block.name}: padding_mask input {mask.name} has shape {got}, but the block's tokens are "
            f"[batch, tokens] = {want}: give a mask with one entry per token of the blocks' hidden states"
        )
    return call(graph, aten.ne.Scalar, (mask, 0), stack=block.stack, tag=tag)


def _topk_earliest(graph: Graph, logits: Node, S, k, st, real: Node | None = None) -> Node:
    """Positions of the k largest logits per row [B, k] (any order), ties to the earlier token: a top-k
    over one int64 key per token, the score's order-preserving bits above its reversed position. The keys
    are unique, so the set is the stable sort's and does not depend on the top-k kernel; a top-k costs a
    fraction of a full sort of the row. Padded tokens (`real` False) get bits below every score's."""
    def op(target, *args, **kwargs):
        return call(graph, target, args, kwargs, stack=st, tag="topk")

    f = op(aten._to_copy.default, logits, dtype=torch.float32)  # always: under autocast the dtype is known at run time
    bits = op(aten.view.dtype, f, torch.int32)
    bits = op(aten.masked_fill.Scalar, bits, op(aten.eq.Scalar, f, 0), 0)  # -0.0 ties with +0.0
    flipped = op(aten.bitwise_xor.Scalar, bits, 0x7FFFFFFF)  # negative floats: int order reversed
    ordered = op(aten.where.self, op(aten.lt.Scalar, bits, 0), flipped, bits)  # int order == float order
    ordered = op(aten._to_copy.default, ordered, dtype=torch.int64)
    if real is not None:
        ordered = op(aten.where.ScalarOther, real, ordered, -(2**31))  # below every non-NaN score: padding last
    last = call(graph, operator.sub, (S, 1), stack=st) if isinstance(S, Node) else S - 1
    device = logits.meta["val"].device
    later = op(aten.arange.start_step, last, -1, -1, dtype=torch.int64, device=device)  # [S]: S-1 .. 0
    key = op(aten.add.Tensor, op(aten.mul.Tensor, ordered, 2**32), later)  # [B, S], unique per row
    top = op(aten.topk.default, key, k, 1, True, False)
    return call(graph, operator.getitem, (top, 1), stack=st)  # [B, k]


def route_topk(graph: Graph, block: Block, r: Node, capacity: Fraction, weighting: str,
               real: Node | None = None) -> Routed:
    st = block.stack
    fake_mode = fake_mode_of(graph)
    x = block.x
    with graph.inserting_before(block.first):
        S, k, logits, idx = select_topk(graph, block, r, capacity, real)
        if not isinstance(S, Node) and k != S:
            _static_token_count(block, S, k)
        B = size(graph, x, block.batch_axis, st)
        at = token_rows(graph, idx, B, block, st)  # index tuple of the chosen rows of x
        both = call(graph, split_tokens, (x, *at), stack=st)
        xp = call(graph, operator.getitem, (both, 0), stack=st)  # x, with the merged backward
        xg = call(graph, operator.getitem, (both, 1), stack=st, tag="gather")  # [B, k, D]
        replace = {x: xg}
        for s in block.side_inputs:
            src = broadcast_batch(graph, s, B, st)
            replace[s.node] = gather_tokens(graph, src, idx, s.seq_axes, s.batch_axis, st)
        for sym in block.sym_inputs:
            try:
                replace[sym] = _sym_on_k(graph, sym, block, k)
            except NotImplementedError as e:
                raise ModfxError(
                    f"block {block.name}: the size {sym.name} = {sym.meta['val']} that the block reads off the "
                    f"sequence cannot be recomputed for k tokens ({e}); modfx cannot route this block"
                ) from e

    region = set(block.nodes)
    for n in block.nodes:
        n.args = _substitute(n.args, replace)
        n.kwargs = _substitute(n.kwargs, replace)
    for n in block.nodes:
        try:
            propagate([n], fake_mode)
        except Exception as e:  # noqa: BLE001 - re-raised with the block and node named
            broadcast = [f"{s.node.name} {list(s.node.meta['val'].shape)}" for s in block.side_inputs if s.broadcast_batch]
            hint = (
                f" The block reads {', '.join(broadcast)} with a size-1 batch axis (e.g. position ids [1, S]); routed, "
                "it becomes [B, k, ...], since every sequence picks its own tokens. If the block's code treats that "
                "axis as a literal 1 (repeat by it, squeeze it), pass the input with a full batch axis instead (e.g. "
                "position_ids of shape [B, S])." if broadcast else ""
            )
            raise ModfxError(
                f"block {block.name}: node {n.name} ({n.target}) cannot run on the k routed tokens: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Its shapes depend on the "
                "token count in a way modfx cannot rewrite." + hint
            ) from e

    yg = block.out
    outside_users = [u for u in yg.users if u not in region]
    with graph.inserting_before(yg.next):
        f = contribution(graph, block, xg, replace)
        r_index = token_index(graph, idx, r, block.seq_axis, block.batch_axis, st)
        rg = call(graph, aten.gather.default, (r, block.seq_axis, r_index), stack=st, tag="gather")  # [B, k, 1]
        delta = _weighted(graph, f, rg, weighting, st)  # [B, k, D]
        # in x's dtype at run time, as `x + delta` promotes it (under autocast f may be bf16, x float32)
        delta = call(graph, aten.type_as.default, (delta, xp), stack=st)
        merged = call(graph, aten.index_put.default, (xp, list(at), delta, True), stack=st, tag="scatter")
    for user in outside_users:
        user.replace_input_with(yg, merged)
    return Routed(idx, merged, xg, rg)


def contribution(graph: Graph, block: Block, x: Node, replace: dict | None = None) -> Node:
    """f, the block's contribution to the residual stream, inserted at the insertion point: the sum of
    the terms of the graph's residual add chain when it shows one (no cancellation), else out - x. A term
    from outside the block (`x + f(x) + x0`) is read as `replace` has it (x0's gathered rows)."""
    st = block.stack
    if block.residual_terms is None:
        return call(graph, aten.sub.Tensor, (block.out, x), stack=st)  # e.g. a post-norm block
    terms = [(replace or {}).get(t, t) for t in block.residual_terms]
    if len(terms) > 1:  # summed in x's dtype, as the chain x + t0 + t1 adds them (autocast: bf16 terms)
        terms = [call(graph, aten.type_as.default, (t, x), stack=st) for t in terms]
    f = terms[0]
    for t in terms[1:]:
        f = call(graph, aten.add.Tensor, (f, t), stack=st)
    return f


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
    return map_arg(arg, lambda n: replace.get(n, n))


# Arguments typed `SymInt[]` in an op's schema: sizes (view, reshape, expand, full, new_zeros, ...).
_SIZE_LIST = re.compile(r"SymInt\[\d*\]\??\s+(\w+)")


def _with_token_count(n: Node, S: int, t: int) -> tuple[tuple, dict]:
    """n's args and kwargs with every literal S in a size-list argument replaced by t."""
    schema = getattr(n.target, "_schema", None)
    args, kwargs = list(n.args), dict(n.kwargs)
    if schema is None:
        return tuple(args), kwargs
    names = set(_SIZE_LIST.findall(str(schema)))
    for i, a in enumerate(schema.arguments):
        if a.name not in names:
            continue
        if i < len(args):
            holder, key = args, i
        elif a.name in kwargs:
            holder, key = kwargs, a.name
        else:
            continue
        v = holder[key]
        if isinstance(v, (list, tuple)):
            holder[key] = type(v)(t if type(e) is int and e == S else e for e in v)
    return tuple(args), kwargs


def _static_token_count(block: Block, S: int, k: int) -> None:
    """Rule for a static token count S (not an input dimension, e.g. a ViT patch count): export bakes S
    into the block's size arguments as a literal (view(q, [B, 17, H, hd])), so every literal S in a
    `SymInt[]` argument of a region node becomes k. That is right only where S is never another size
    of the block, which is checked first: the rewritten region runs on fake inputs at two probe token
    counts (primes above every size in the graph); every size of every value must then either follow
    the token count (c * t**m) or not change, no unchanged size may equal S (a collision, or a
    fixed-length computation over the tokens such as arange(S)), and the block must map [B, t, D] to
    [B, t, D]. Otherwise a ModfxError names the node."""
    region = set(block.nodes)
    external = list(dict.fromkeys(a for n in block.nodes for a in n.all_input_nodes if a not in region))
    ints = {S, k}
    for n in [*external, *block.nodes]:
        for leaf in pytree.tree_leaves(n.meta.get("val")):
            if isinstance(leaf, torch.Tensor):
                ints.update(int(d) for d in leaf.shape if not isinstance(d, torch.SymInt))
    symbols = set()
    for n in external:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            for d in v.shape:
                symbols |= sympy.sympify(expr(d)).free_symbols
        elif isinstance(v, torch.SymInt):
            symbols |= v.node.expr.free_symbols
    primes = _primes_above(4 * max(ints) + 100, 2 + len(symbols))
    p1, p2, sizes = primes[0], primes[1], dict(zip(sorted(symbols, key=str), primes[2:]))
    env1 = _probe(block, external, S, p1, sizes)
    env2 = _probe(block, external, S, p2, sizes)
    for n in [*external, *block.nodes]:
        for d1, d2, where in _sizes_of(env1[n], env2[n]):
            if d1 == d2 and d1 == S:
                raise ModfxError(
                    f"block {block.name}: node {n.name} has {where} of size {S}, the static sequence length, that "
                    "does not follow the token count; S collides with another size of the block (or the block "
                    "computes a fixed-length value over the tokens, e.g. arange(S)), so modfx cannot tell which "
                    f"sizes to shrink to k. Use a sequence length ({S} now) that differs from every other dimension, "
                    "or capture with a dynamic sequence length."
                )
            if d1 != d2 and not any(d1 * p2**m == d2 * p1**m for m in (1, 2)):
                raise ModfxError(
                    f"block {block.name}: node {n.name} has {where} whose size does not scale with the token count "
                    f"({d1} and {d2} at {p1} and {p2} tokens), so the block cannot run on k of the {S} tokens."
                )
    want = list(env1[block.x].shape)
    if list(env1[block.out].shape) != want:
        raise ModfxError(
            f"block {block.name}: on {p1} tokens its output {block.out.name} has shape {list(env1[block.out].shape)}, "
            f"not {want}: with the sequence length static ({S}), its sizes cannot be rewritten for k tokens."
        )
    for n in block.nodes:
        n.args, n.kwargs = _with_token_count(n, S, k)


def _probe(block: Block, external: list[Node], S: int, t: int, sizes: dict) -> dict:
    """Run the region (literal S -> t) on fake tensors with t tokens; symbols fixed to `sizes`."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    seq = {block.x: (block.seq_axis,), **{s.node: s.seq_axes for s in block.side_inputs}}
    env = {}
    with FakeTensorMode():
        for a in external:
            v = a.meta.get("val")
            if isinstance(v, torch.Tensor):
                shape = [t if i in seq.get(a, ()) else int(expr(d).subs(sizes)) for i, d in enumerate(v.shape)]
                env[a] = torch.empty(shape, dtype=v.dtype, device=v.device)
            elif isinstance(v, torch.SymInt):
                env[a] = int(v.node.expr.subs(sizes))
            else:
                env[a] = v
        for n in block.nodes:
            args, kwargs = _with_token_count(n, S, t)
            args, kwargs = map_arg((args, kwargs), env.__getitem__)
            try:
                env[n] = n.target(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - re-raised with the block and node named
                raise ModfxError(
                    f"block {block.name}: node {n.name} ({n.target}) fails when the block runs on another number "
                    f"of tokens than the static sequence length {S}: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}. With a static sequence length modfx rewrites every "
                    f"literal {S} in the block's sizes to k; that fails when {S} is also another size of the block "
                    "(e.g. the head dimension): then use an input size whose token count differs from every other "
                    "dimension, or capture with a dynamic sequence length. It also fails when the block works on a "
                    "fixed number of tokens (positions or relative-position tables built inside it, windows over a "
                    "grid, a scan, a token-mixing layer of S inputs as in MLP-Mixer): such a block cannot be routed."
                ) from e
    return env


def _sizes_of(v1, v2):
    """(size at probe 1, size at probe 2, description) for every tensor axis and int in two values."""
    for a, b in zip(pytree.tree_leaves(v1), pytree.tree_leaves(v2)):
        if isinstance(a, torch.Tensor):
            for ax, (d1, d2) in enumerate(zip(a.shape, b.shape)):
                yield int(d1), int(d2), f"axis {ax} (shape {list(a.shape)})"
        elif type(a) is int:
            yield a, b, "an integer value"


def _primes_above(n: int, count: int) -> list[int]:
    out = []
    while len(out) < count:
        n += 1
        if all(n % d for d in range(2, int(n**0.5) + 1)):
            out.append(n)
    return out
