"""Block discovery: find the repeated residual blocks of a captured transformer.

    before: a flat aten graph whose nodes carry nn_module_stack, e.g.
        h0 = embedding(ids)                          # []
        a  = linear(layer_norm(h0), ...)             # [model.layers.0, ...]
        h1 = add(h0, a) ...                          # [model.layers.0]
        h2 = ...                                     # [model.layers.1]
    after:  the same graph, plus a list of `Block`s: for each block its region of nodes, its residual
        input x [B, S, D], its output [B, S, D], its per-token side inputs (with the axes that run over
        tokens), the symbolic sizes it reads, and how its residual contribution f(x) can be read off.

A block is a module path ending in an integer (an element of a ModuleList/Sequential: `layers.3`)
whose nodes form one region that maps a hidden state [B, S, D] to a hidden state of the same shape and
contains a residual add of that input. Among the groups of such sibling paths (`<prefix>.0..N`), the
group whose valid members cover the most nodes wins (ties: the shallowest), so whole layers win over the
sublayers of one of them (T5's decoder: blocks 1 and 2 over the 3 sublayers of block 1). Nothing here
knows model or class names.

A layer written inline in its caller's loop (`for attn, ff in self.layers: x = x + attn(x); x = x + ff(x)`)
is never called itself, so its residual adds carry only the caller's module path. `adopt_loop_bodies`
attributes them to the layer (`layers.0`) first, so the layer is a block like any other:

    before: a = sdpa(...)    [layers.0.0]      x1 = add(x, a)   []
            m = linear(x1)   [layers.0.1]      x2 = add(x1, m)  []
    after:  the same nodes, with `layers.0` on the stacks of all four

Contract: requires meta['val'] and nn_module_stack on call_function nodes (torch.export guarantees both);
ensures each block's region is contiguous in graph order (independent interleaved nodes are moved ahead).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections import defaultdict

import sympy
import torch
from torch.fx import Graph, Node

from ..errors import ModfxError
from .graph_utils import ancestors_within, aten, module_paths, shape_exprs

_INDEXED = re.compile(r"^(?:(.*)\.)?(\d+)$")  # `layers.3`, or `3` of a model that is an nn.Sequential

# Ops that pass the residual stream through unchanged when they keep dtype and shape.
_IDENTITY_OPS = {
    aten.clone.default,
    aten.alias.default,
    aten.contiguous.default,
    aten._to_copy.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten.to.device,
}
_ADDS = {aten.add.Tensor, aten.add_.Tensor}


@dataclasses.dataclass
class SideInput:
    node: Node  # the value defined outside the block
    seq_axes: tuple[int, ...]  # axes that run over the tokens
    batch_axis: int  # axis over the batch (size B, or 1 and broadcast)
    broadcast_batch: bool  # the batch axis has size 1


@dataclasses.dataclass
class Block:
    name: str  # qualified module name, e.g. "model.layers.3"
    index: int  # position among the blocks found
    nodes: list[Node]  # the region, in graph order
    x: Node  # residual input   [B, S, D] (or [S, B, D])
    out: Node  # block output   same shape as x
    seq_axis: int  # of x
    batch_axis: int  # of x
    seq_expr: sympy.Expr  # the length of the token axis (symbolic when the capture is dynamic)
    side_inputs: list[SideInput]
    sym_inputs: list[Node]  # SymInt values defined outside the region and read inside it
    residual_terms: list[Node] | None  # out = x + sum(terms) when the graph shows it; else None (f = out - x)
    stack: dict  # nn_module_stack up to and including the block, for new nodes

    @property
    def first(self) -> Node:
        return self.nodes[0]


class _Invalid(Exception):
    pass


class _OtherSequence(_Invalid):
    """The module's hidden state runs over another sequence than the model input's tokens (e.g. the
    decoder of an encoder-decoder model)."""


def find_blocks(graph: Graph, seq_expr: sympy.Expr | tuple | None) -> list[Block]:
    """All blocks on the residual stream, in order. `seq_expr` is the symbolic (or static) length of
    the model input's token axis; a hidden state's token axis is the axis whose size involves it. A tuple
    of lengths (MoDConfig.token_input a tuple) finds one stack of blocks per length, all in graph order."""
    adopt_loop_bodies(graph)
    stacks = [_find_stack(graph, s) for s in (seq_expr if isinstance(seq_expr, tuple) else (seq_expr,))]
    prefixes = [prefix for prefix, _, _ in stacks]
    for prefix, _, notes in stacks:
        for other, note in notes:  # a stack over another sequence that is not routed: once, outermost
            if not any(_within(other, p) or _within(p, other) for p in prefixes):
                warnings.warn(note, stacklevel=2)
    order = {n: i for i, n in enumerate(graph.nodes)}
    blocks = sorted((b for _, found, _ in stacks for b in found), key=lambda b: order[b.first])
    for i, b in enumerate(blocks):
        b.index = i
    return blocks


def _find_stack(graph: Graph, seq_expr: sympy.Expr | None) -> tuple[str, list[Block], list[tuple[str, str]]]:
    """(prefix, blocks, notes) of the group of blocks over `seq_expr`'s tokens; notes: (other prefix,
    warning) for each stack over another sequence, for `find_blocks` to give unless that stack is routed."""
    groups: dict[str, dict[int, str]] = defaultdict(dict)
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        for path in module_paths(n):
            m = _INDEXED.match(path)
            if m:
                groups[m.group(1) or ""][int(m.group(2))] = path

    found: list[tuple[int, int, str, list[Block], list[str]]] = []  # ..., members that are no block
    rejected: dict[str, tuple[int, str]] = {}
    other_sequence: dict[str, tuple[int, str]] = {}  # groups of blocks over another sequence (a decoder)
    for prefix, members in groups.items():
        blocks, bad, other = [], [], []
        for i in sorted(members):
            try:
                blocks.append(_analyse(graph, members[i], i, seq_expr))
            except _OtherSequence as e:
                other.append(str(e))
            except _Invalid as e:
                bad.append(str(e))
        if len(other) >= 2 and 2 * len(other) >= len(members):
            other_sequence[prefix] = (len(members), other[0])
        bad += other
        if bad and (len(blocks) < 2 or 2 * len(bad) >= len(members)):
            rejected[prefix] = (len(members), bad[0])
            continue
        covered = sum(len(b.nodes) for b in blocks)
        found.append((-covered, prefix.count("."), prefix, blocks, bad))  # bad: e.g. T5's block 0
    if not found:
        detail = "".join(f"\n  - {p}.*: {why}" for p, (_, why) in list(rejected.items())[:8])
        detail = detail or "\n  - no module path ends in an index"
        raise ModfxError(
            "no transformer blocks found. modfx looks for repeated sibling modules (e.g. `layers.0`, "
            "`layers.1`, ... in an nn.ModuleList) whose nodes map a hidden state [B, S, D] to a hidden "
            "state of the same shape with a residual add of their input. A layer written inline in a loop "
            "counts when its modules sit under one indexed path (`for attn, ff in self.layers`, "
            "`self.layers[i]['attn']`); modules kept in parallel lists (`self.attn[i]`, `self.ff[i]`) are not "
            "grouped into layers: put each layer's modules in one element of a ModuleList. Candidates "
            "rejected:" + detail
        )
    found.sort(key=lambda t: t[:3])
    prefix, blocks, skipped = found[0][2:]
    if skipped:
        warnings.warn(
            f"modfx uses {len(blocks)} of the {len(blocks) + len(skipped)} modules {prefix}.* as blocks; "
            f"the others stay as they are and are never routed: {'; '.join(skipped)}",
            stacklevel=3,
        )
    for outer, (count, why) in rejected.items():  # e.g. T5: encoder.block.* pass a position bias along
        if outer and _within(prefix, outer) and prefix != outer:
            warnings.warn(
                f"modfx routes the {len(blocks)} blocks {prefix}.*, which lie inside one member of the group "
                f"{outer}.* ({count} members) that it cannot use as blocks: {why}. Only these "
                f"{len(blocks)} sublayers can be routed; make each {outer}.N map the hidden state alone to route "
                "the model's real blocks.",
                stacklevel=3,
            )
    notes = []
    for other, (count, why) in other_sequence.items():  # e.g. the decoder of T5, BART, Whisper
        if not any(_within(other, o) for o in other_sequence if o != other):
            notes.append((other, (
                f"modfx routes the blocks {prefix}.*; the {count} modules {other}.* are not routed: {why}. "
                "modfx routes the stacks of blocks over the token axes of MoDConfig.token_input (by default "
                "the first input with one). Name another input there to route another stack, e.g. "
                "token_input='decoder_input_ids' for the decoder of an encoder-decoder model, or "
                "token_input=('input_ids', 'decoder_input_ids') for both stacks.")))
    return prefix, blocks, notes


def adopt_loop_bodies(graph: Graph) -> None:
    """Rule: an indexed module path that is never called itself but whose descendants are (`layers.0` of a
    `ModuleList` of `ModuleList`s, or of `ModuleDict`s, iterated by the caller) is a layer written inline.
    Its region is its descendants' nodes, plus the caller's nodes between the first and the last of them
    that read them, plus the residual chain right after them: adds and identity ops of the caller that read
    only the region and the values the region reads (its input x), not a value of their own (a head's bias,
    the next iteration's `x + pos`). A module of the caller that every iteration shares (`x + self.drop(ff(x))`:
    a module called more than once, outside any indexed list) counts as the caller's where it reads the
    region, and in the chain where an adopted add reads it. These nodes get the layer's path on their
    nn_module_stack (a shared module's entry below it), so discovery, the FLOP pass and new nodes treat the
    layer as a module. Not adopted: a path all of whose children run more than once (one layer applied
    repeatedly: export numbers the later calls `@1`, ...)."""
    calls = [n for n in graph.nodes if n.op == "call_function"]
    called = {p for n in calls for p in module_paths(n)}
    keys: dict[str, set] = defaultdict(set)  # module path -> the stack keys of its calls
    for n in calls:
        for key, (p, _) in n.meta["nn_module_stack"].items():
            keys[p].add(key)
    bodies: dict[str, list[Node]] = defaultdict(list)
    for n in calls:
        for v in dict.fromkeys(a for p in module_paths(n) for a in _indexed_ancestors(p) if a not in called):
            bodies[v].append(n)
    nodes = list(graph.nodes)  # (adoption changes only stacks, never the graph)
    order = {n: i for i, n in enumerate(nodes)}
    for v, under in bodies.items():
        runs = {p: k for p, k in keys.items() if p.startswith(v + ".") and "." not in p[len(v) + 1:]}
        if runs and min(map(len, runs.values())) > 1:
            continue  # every child runs repeatedly: the iterations would merge into one region

        def caller(p):  # the root, the module that runs the loop
            return _within(v, p) and p != v

        def shared(p):  # a module of the caller's called in every iteration
            return caller(p) or (len(keys[p]) > 1 and not _INDEXED.match(p) and not any(_indexed_ancestors(p)))

        def in_caller(n, of=caller):
            return n.op == "call_function" and all(of(p) for p in module_paths(n))

        region = set(under)
        lo, hi = order[under[0]], order[under[-1]]
        for n in nodes[lo:hi]:  # the caller's nodes inside the span that read the layer
            if in_caller(n, shared) and any(a in region for a in n.all_input_nodes):
                region.add(n)
        read = {a for r in region for a in r.all_input_nodes}  # the layer's input x among them
        pending: set[Node] = set()  # nodes of a shared module after the span, kept if an adopted add reads them
        for n in nodes[hi + 1:]:  # the residual chain after it, up to the next module call
            if n.op != "call_function":
                continue
            inputs = n.all_input_nodes
            if not in_caller(n):
                if in_caller(n, shared) and inputs and all(a in region or a in pending for a in inputs):
                    pending.add(n)
                    continue
                break
            borrowed = all(a in region or a in read or a in pending for a in inputs)  # no value of its own
            if n.target in _ADDS | _IDENTITY_OPS and any(a in region or a in pending for a in inputs) and borrowed:
                region.add(n)
                region |= ancestors_within(n, pending)
        for n in region:
            stack = n.meta.get("nn_module_stack") or {}
            outer = {k: e for k, e in stack.items() if caller(e[0])}
            inner = {k: e for k, e in stack.items() if not caller(e[0])}
            n.meta["nn_module_stack"] = {**outer, f"modfx_loop_body:{v}": (v, "modfx.loop_body"), **inner}


def _indexed_ancestors(path: str):
    """The proper ancestors of `path` that end in an index: `layers.0` of `layers.0.attn`."""
    parts = path.split(".")
    for i in range(1, len(parts)):
        if parts[i - 1].isdigit():
            yield ".".join(parts[:i])


def _within(path: str, outer: str) -> bool:
    """Module path `path` is `outer` or lies inside it (every path lies inside the root, "")."""
    return outer == "" or (path + ".").startswith(outer + ".")


def _analyse(graph: Graph, path: str, index: int, seq_expr: sympy.Expr | None) -> Block:
    nodes = [n for n in graph.nodes if n.op == "call_function" and path in module_paths(n)]
    nodes = _without_outside_size_arithmetic(nodes)
    if not nodes:
        raise _Invalid(f"{path} has no nodes")
    calls = {key for n in nodes for key, (p, _) in n.meta["nn_module_stack"].items() if p == path}
    if len(calls) > 1:  # export numbers a module's later calls: `<key>@1`, `<key>@2`, ...
        raise _Invalid(f"{path} runs {len(calls)} times (one module called repeatedly, its weights shared across "
                       "depth, as in ALBERT); modfx routes modules, so it cannot route these calls one by one")
    nodes = _make_contiguous(graph, nodes, path)
    region = set(nodes)

    outputs = [n for n in nodes if any(u not in region for u in n.users)]
    if len(outputs) != 1:
        raise _Invalid(f"{path} has {len(outputs)} values used outside it (a block has exactly one output)")
    out = outputs[0]
    out_shape = shape_exprs(out)
    if out_shape is None or len(out_shape) != 3:
        raise _Invalid(f"{path}'s output is not a 3-D hidden state")

    external: list[Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in region and a not in external:
                external.append(a)

    candidates = [
        a for a in external
        if a.op != "get_attr" and shape_exprs(a) == out_shape and a.meta["val"].dtype == out.meta["val"].dtype
    ]
    x, terms = None, None
    for c in candidates:
        t = residual_terms(out, c, region)
        if t is not None:
            x, terms = c, t
            break
    if x is None:  # post-norm: x is added to something computed from it, x + f(x), then normalised
        added = [c for c in candidates if any(u.target in _ADDS and u in region for u in c.users)]
        post_norm = [c for c in added if any(u.target in _ADDS and u in region and
                                             any(_reaches(a, c, region) for a in u.all_input_nodes if a is not c)
                                             for u in c.users)]
        if len(post_norm) != 1:  # (a positional input added to x, as DETR's `x + pos`, is not x + f(x))
            post_norm = added
        if len(post_norm) != 1:
            raise _Invalid(f"{path} has no residual add of a [B, S, D] input")
        x = post_norm[0]

    seq_axis, batch_axis, s_expr = _token_axes(out_shape, seq_expr, path)
    stack = _stack_upto(out, path)
    side = []
    for a in external:
        v = a.meta.get("val")
        if a is not x and a.op != "get_attr" and isinstance(v, torch.Tensor):
            s = _side_input(a, s_expr, out_shape[batch_axis], path, region, x)
            if s is not None:
                side.append(s)
    hoisted = [n for n in nodes if n not in region]  # batch-less side inputs' broadcast chains
    if hoisted:
        for n in hoisted:
            nodes[0].prepend(n)  # they read only values defined before the block
        nodes = [n for n in nodes if n in region]
        external = [a for a in dict.fromkeys(a for n in nodes for a in n.all_input_nodes) if a not in region]
    syms = [
        a for a in external
        if isinstance(a.meta.get("val"), torch.SymInt) and s_expr.free_symbols & a.meta["val"].node.expr.free_symbols
    ]
    for n in nodes:
        if n.target in (aten.arange.default, aten.arange.start, aten.arange.start_step):
            # positions: a length that follows S alone (an arange over B * S * ..., e.g. an inverse
            # permutation of routed expert slots, numbers no token positions)
            lengths = [sympy.sympify(e).free_symbols for e in shape_exprs(n) or ()]
            if any(f & s_expr.free_symbols and f <= s_expr.free_symbols for f in lengths):
                raise ModfxError(
                    f"block {path}: node {n.name} computes positions inside the block (arange over the token "
                    "axis). After routing the block sees only k tokens, so these positions would be compacted "
                    "and wrong. Compute positions (or RoPE tables) outside the blocks and pass them in."
                )
        if _reads_table_by_length(n, s_expr):
            raise ModfxError(
                f"block {path}: node {n.name} slices a position table ({n.args[0].name}, shape "
                f"{list(n.args[0].meta['val'].shape)}) by the sequence length inside the block (e.g. ALiBi biases, "
                "a RoPE cache, relative-position ids, a sliding-window mask). After routing the block sees only k "
                "tokens, so it would read the entries of positions 0..k-1 (compacted), not of the chosen tokens. "
                "Slice or gather the table outside the blocks and pass it in."
            )
    return Block(path, index, nodes, x, out, seq_axis, batch_axis, s_expr, side, syms, terms, stack)


def _reads_table_by_length(n: Node, s_expr: sympy.Expr) -> bool:
    """A tensor sliced, along an axis whose length does not follow S, with bounds that do: table[..., S_max -
    S:] reads positions (ALiBi biases, a RoPE cache, relative-position ids, a sliding-window mask). Causal
    tables, bool or float, stay right on compacted tokens (the chosen tokens keep their order): capture.py
    tags them, and they pass."""
    if n.target is not aten.slice.Tensor or not isinstance(n.args[0], Node):
        return False
    src, dim = n.args[0].meta.get("val"), (n.args[1] if len(n.args) > 1 else 0)
    if not isinstance(src, torch.Tensor):
        return False
    seq = s_expr.free_symbols

    def follows_s(v):
        return isinstance(v, torch.SymInt) and bool(seq & v.node.expr.free_symbols)

    bounds = [a.meta.get("val") for a in n.args[2:4] if isinstance(a, Node)]
    return not follows_s(src.shape[dim]) and any(follows_s(b) for b in bounds) and not _prefix_of_causal_table(n)


def _prefix_of_causal_table(n: Node) -> bool:
    """`n` slices, through slices from 0 only, a table capture.py tagged causal: mask[:T, :T] of tril(ones)."""
    while n.op == "call_function" and n.target is aten.slice.Tensor:
        start = n.args[2] if len(n.args) > 2 else 0
        if start not in (0, None) or not isinstance(n.args[0], Node):
            return False
        n = n.args[0]
    return bool(n.meta.get("modfx_causal_table"))


def residual_terms(node: Node, x: Node, region: set[Node]) -> list[Node] | None:
    """If `node` is x plus a chain of adds, the added terms (so f(x) = sum(terms)); else None."""
    if node is x:
        return []
    if node not in region:
        return None
    if node.target in _ADDS and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1:
        a, b = node.args
        for base, term in ((a, b), (b, a)):
            if isinstance(base, Node) and isinstance(term, Node) and shape_exprs(base) == shape_exprs(node):
                t = residual_terms(base, x, region)
                if t is not None:
                    return t + [term]
    if node.target in _IDENTITY_OPS and isinstance(node.args[0], Node):
        src = node.args[0]
        if shape_exprs(src) == shape_exprs(node) and src.meta["val"].dtype == node.meta["val"].dtype:
            return residual_terms(src, x, region)
    return None


def _reaches(node: Node, target: Node, region: set) -> bool:
    """Is `node` computed from `target`, through nodes of the region?"""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n is target:
            return True
        if n in region and n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return False


def _make_contiguous(graph: Graph, nodes: list[Node], path: str) -> list[Node]:
    region = set(nodes)
    order = {n: i for i, n in enumerate(graph.nodes)}
    lo, hi = order[nodes[0]], order[nodes[-1]]
    between = [n for n in graph.nodes if lo < order[n] < hi and n not in region]
    if not between:
        return nodes
    tainted = set(region)
    for n in graph.nodes:
        if lo <= order[n] <= hi and any(a in tainted for a in n.all_input_nodes):
            tainted.add(n)
    stuck = [n for n in between if n in tainted]
    if stuck:
        raise _Invalid(f"{path}'s nodes are interleaved with {stuck[0].name}, which depends on them")
    for n in between:
        nodes[0].prepend(n)
    return nodes


def _token_axes(shape, seq_expr, path):
    """(seq_axis, batch_axis, length expr) of a 3-D hidden state [B, S, D] or [S, B, D]."""
    if seq_expr is not None and seq_expr.free_symbols:
        axes = [i for i in (0, 1) if seq_expr.free_symbols & sympy.sympify(shape[i]).free_symbols]
        if not axes and seq_expr.free_symbols & sympy.sympify(shape[2]).free_symbols:
            raise _Invalid(f"{path}: its hidden state {tuple(shape)} has the tokens on its last axis (channels "
                           "first, [B, D, S]); modfx routes hidden states laid out [B, S, D] or [S, B, D]")
        if not axes and any(sympy.sympify(d).free_symbols for d in shape[:2]):
            raise _OtherSequence(f"{path}: its hidden state {tuple(shape)} runs over another sequence than the "
                                 f"routed tokens ({seq_expr})")
        if len(axes) != 1:
            raise _Invalid(f"{path}: cannot tell the token axis of its hidden state {tuple(shape)}")
        return axes[0], 1 - axes[0], shape[axes[0]]
    return 1, 0, shape[1]  # static capture: the conventional [B, S, D] layout


def _side_input(node: Node, s_expr, b_expr, path, region: set[Node], x: Node) -> SideInput | None:
    """The per-token side input `node` (a tensor defined outside the block) with its token axes, or
    None when it has none. A batch-less one is replaced by the end of its broadcast chain (see
    `_batch_broadcast_chain`), whose nodes are then taken out of `region`."""
    shape = shape_exprs(node)
    seq_axes = tuple(i for i, e in enumerate(shape) if e == s_expr)
    if not seq_axes:
        return None  # not per-token: passed through unchanged
    if len(shape) >= 2 and 0 not in seq_axes and shape[0] in (b_expr, 1):
        return SideInput(node, seq_axes, 0, shape[0] == 1 and b_expr != 1)
    chain, why = _batch_broadcast_chain(node, s_expr, b_expr, region, x)
    if chain:
        end = chain[-1]
        region.difference_update(chain)
        end_shape = shape_exprs(end)
        return SideInput(end, tuple(i for i, e in enumerate(end_shape) if e == s_expr), 0, b_expr != 1)
    raise ModfxError(
        f"block {path}: side input {node.name} of shape {tuple(shape)} runs over the tokens (axes {seq_axes}) "
        f"but has no leading batch axis, so its token axis cannot be gathered per sequence: {why}. Give it "
        "a leading batch (or size-1 broadcast) dimension, e.g. a mask [B, 1, S, S] or RoPE tables [1, S, hd]."
    )


# Ops that only re-lay out or convert a value (with `_same_up_to_unit_axes`: size-1 axes in or out).
_LAYOUT_OPS = _IDENTITY_OPS | {
    aten.unsqueeze.default,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.expand.default,
    aten.detach.default,
}


def _batch_broadcast_chain(node: Node, s_expr, b_expr, region: set[Node], x: Node) -> tuple[list[Node], str]:
    """Rule for a side input with token axes but no batch axis (e.g. a [S, S] mask): if inside the
    block it only passes through a chain of layout ops (unsqueeze, size-1 view/expand, dtype casts)
    to a value N whose leading axis has size 1, and every op reading N has an output of N's rank
    whose leading axis is the batch (so N's axis 0 provably broadcasts against the batch), then N is
    the side input: the chain does not read x, so it can run on the full sequence before the block,
    and N gathers per sequence like any [1, ...] side input. Returns (chain, "") or ([], why not)."""
    chain: list[Node] = []
    cur = node
    while True:
        users = [u for u in cur.users if u in region]
        shape = shape_exprs(cur)
        if chain and shape and shape[0] == 1 and s_expr != 1 and b_expr != 1:
            outs = [shape_exprs(u) for u in users]
            if users and all(o is not None and len(o) == len(shape) and o[0] == b_expr for o in outs):
                return chain, ""
        if len(users) != 1 or (chain and len(cur.users) != 1):
            return [], f"{cur.name} is read by {len(cur.users)} ops in the block before it broadcasts against the batch"
        (u,) = users
        if u.target not in _LAYOUT_OPS or u.args[0] is not cur:
            return [], f"{u.name} ({u.target}) uses it before it broadcasts against the batch axis"
        if any(a in region and a is not cur for a in u.all_input_nodes) or x in u.all_input_nodes:
            return [], f"{u.name} combines it with values computed in the block"
        new = shape_exprs(u)
        if new is None or not _same_up_to_unit_axes(shape, new):
            return [], f"{u.name} reshapes its token axes"
        chain.append(u)
        cur = u


def _same_up_to_unit_axes(a, b) -> bool:
    """b is a with size-1 axes inserted or removed (the other axes unchanged, in order)."""
    return [e for e in a if e != 1] == [e for e in b if e != 1]


def _without_outside_size_arithmetic(nodes: list[Node]) -> list[Node]:
    """Rule: a node that computes a size (SymInt, int, bool; not a tensor) only from values defined
    outside the block is shape bookkeeping, not block computation. Export shares such nodes between
    layers (e.g. B * H computed in layers.0 and reused by layers.1), so inside the block they would
    read as extra outputs; they are left outside the region (and moved ahead of it)."""
    region = set(nodes)
    outside = set()
    for n in nodes:
        size = isinstance(n.meta.get("val"), (torch.SymInt, torch.SymBool, torch.SymFloat, int, float, bool))
        if size and all(a in outside or a not in region for a in n.all_input_nodes):
            outside.add(n)
    return [n for n in nodes if n not in outside]


def _stack_upto(node: Node, path: str) -> dict:
    stack = {}
    for key, (p, cls) in (node.meta.get("nn_module_stack") or {}).items():
        stack[key] = (p, cls)
        if p == path:
            break
    return stack
