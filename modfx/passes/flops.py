"""FLOP accounting: every node's FLOPs as a sympy expression in the graph's symbolic sizes, and the
budget check `modfx.transform` runs after routing.

    before: an aten graph with fake values          after: one `Cost` per node (symbols renamed)
        q  = linear(h, wq)        # [s95, s75, 64]      q   8192*B*S        matmul
        a  = sdpa(q, k, v)        # [s95, 4, s75, 16]   a   256*B*S**2      attention
        r  = linear(x, wr)        # [s95, s75, 1]       r   128*B*S         router
        t  = topk(key(r), k)      # [s95, k]            t   B*S*clog2(k)    topk
        xg = x[b, idx]            # [s95, k, 64]        xg  64*B*k          gather
        qg = linear(hg, wq)       # [s95, k, 64]        qg  8192*B*k        matmul
    budget: per routed block, body(S, k) has no S term, and
        total(MoD) <= total(dense) - sum_routed(block(S) - block(k)) + routing overhead

Policy (stated here once, applied everywhere):
  * FLOPs are matmul-class only, 2 per multiply-add, like torch's FlopCounterMode (whose registry formulas
    are reused): linear, matmul, mm, bmm, addmm, baddbmm, convolution and attention. Elementwise ops,
    reductions, norms, softmax and embedding lookups count 0 (so does the predictor's second layer, a
    weighted sum of h values per token).
  * Attention counts QK^T and AV in full, 4*B*H*Sq*Skv*hd: causal masking is not halved (CAUSAL = 1),
    as in torch's formulas, so the numbers agree with FlopCounterMode.
  * Routing data movement counts one op per element: sort n*ceil(log2 n) compares per row, top-k
    n*ceil(log2 k), gather and scatter one per indexed element, the top-k keys 0 (FlopCounterMode counts
    these 0).
  * Backward follows FlopCounterMode's kernels: a matmul costs its forward once per operand that needs a
    gradient (so ~2x forward), attention the registry's backward formula (2.5x: scores recomputed),
    except where torch runs `scaled_dot_product_attention` as its math kernel (two bmm's: the matmul
    rule, 2x), everything else 0.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import sympy
import torch
from torch.fx import Graph, Node
from torch.fx.node import map_aggregate
from torch.utils.flop_counter import flop_registry
from torch.utils._pytree import tree_map

from ..errors import ModfxError
from .graph_utils import (ancestors_within, aten, expr, fake_mode_of, input_over, module_paths, op_arg, shape_exprs,
                          token_axis_length)
from .route_topk import chosen_count

CAUSAL = sympy.Integer(1)  # factor on causal attention; Rational(1, 2) would halve it (torch does not)
ROUTING = ("router", "sort", "topk", "gather", "scatter", "predictor")
_DATA = ("sort", "topk", "gather", "scatter")
_MM = {  # matmul-class op -> positions of its two operands (input, weight)
    aten.linear: (0, 1), aten.matmul: (0, 1), aten.mm: (0, 1), aten.bmm: (0, 1), aten.addmm: (1, 2),
    aten.baddbmm: (1, 2), aten.convolution: (0, 1), aten.conv1d: (0, 1), aten.conv2d: (0, 1),
    aten.conv3d: (0, 1), aten.conv_transpose1d: (0, 1), aten.conv_transpose2d: (0, 1),
    aten.conv_transpose3d: (0, 1), aten.tensordot: (0, 1),
}
_ATTN = {
    aten.scaled_dot_product_attention, aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_cudnn_attention,
}
_SDPA, _SDPA_BWD = aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_efficient_attention_backward


class clog2(sympy.Function):
    """ceil(log2(n)), exact on integers."""

    @classmethod
    def eval(cls, n):
        if n.is_Integer:
            return sympy.Integer(max(int(n) - 1, 0).bit_length())


@dataclasses.dataclass(frozen=True)
class Cost:
    node: Node
    kind: str  # matmul | attention | router | sort | topk | gather | scatter | predictor | other
    block: str | None  # qualified name of the block it belongs to
    fwd: sympy.Expr  # in the graph's raw symbols
    bwd: sympy.Expr


# --- per-node formulas --------------------------------------------------------------------------

def _shapes(a):
    """Nodes (and tensors) in `a` replaced by their shapes as tuples of sympy expressions."""
    a = map_aggregate(a, lambda x: x.meta.get("val") if isinstance(x, Node) else x)
    return tree_map(lambda t: tuple(expr(s) for s in t.shape) if isinstance(t, torch.Tensor) else t, a)


def _matmul(n: Node, op) -> sympy.Expr:
    a, b = (_shapes(n.args[i]) for i in _MM[op])
    out = _shapes(n.meta["val"])
    mm = flop_registry[aten.mm]
    if op is aten.linear:  # x [..., in] @ w[out, in]^T
        return mm((math.prod(a[:-1]), a[-1]), (a[-1], b[0]))
    if op is aten.matmul:  # broadcast batch dims folded into the rows
        rows, m = (math.prod(out[:-1]), out[-1]) if len(b) > 1 else (math.prod(out), 1)
        return mm((rows, a[-1]), (a[-1], m))
    if op in (aten.conv1d, aten.conv2d, aten.conv3d, aten.conv_transpose1d, aten.conv_transpose2d,
              aten.conv_transpose3d):
        transposed = op in (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
        return flop_registry[aten.convolution](a, b, None, None, None, None, transposed, out_val=out)
    if op is aten.tensordot:  # (free of a) x (contracted) @ (contracted) x (free of b)
        contracted = math.prod(a[d] for d in n.args[2])
        return mm((math.prod(a) / contracted, contracted), (contracted, math.prod(b) / contracted))
    return flop_registry[op](*_shapes(n.args), out_val=out, **_shapes(n.kwargs))


def _einsum(n: Node) -> sympy.Expr:
    """A two-operand einsum as the bmm torch runs it: 2 x the product of the sizes of every index that is
    kept in the output or contracted between the operands (one summed in one operand alone is reduced
    before the product, not in it)."""
    shapes = _shapes(n.args[1])
    terms, arrow, out = n.args[0].replace(" ", "").partition("->")
    terms = terms.split(",")
    if not arrow:  # implicit output: the indices that appear once, in order
        once = [c for c in sorted(set("".join(terms))) if "".join(terms).count(c) == 1 and c != "."]
        out = ("..." if any("..." in t for t in terms) else "") + "".join(once)
    sizes, names = {}, []
    for term, shape in zip(terms, shapes):
        k = len(shape) - len(term.replace("...", ""))
        letters = term.replace("...", "".join(chr(0x100 + k - 1 - i) for i in range(k)))  # ellipsis dims, right-aligned
        names.append(letters)
        for c, s in zip(letters, shape):
            sizes[c] = s if c not in sizes or sizes[c] == 1 else sizes[c]
    k_out = max((len(s) - len(t.replace("...", "")) for t, s in zip(terms, shapes)), default=0)
    out = out.replace("...", "".join(chr(0x100 + k_out - 1 - i) for i in range(k_out)))
    kept = [c for c in sizes if c in out or all(c in letters for letters in names)]
    return 2 * math.prod(sizes[c] for c in kept)


def _data(n: Node, role: str) -> sympy.Expr:
    if role == "sort":
        x = _shapes(n.args[0])
        return math.prod(x) * clog2(x[op_arg(n.target, n.args, n.kwargs, "dim", -1)])
    if n.target is aten.topk.default:  # a heap of k per row
        return math.prod(_shapes(n.args[0])) * clog2(_shapes(n.meta["val"][0])[op_arg(n.target, n.args, n.kwargs, "dim", -1)])
    if role == "gather":
        return math.prod(_shapes(n.meta["val"]))
    if role == "scatter":  # the routed tokens written (a masked `where` writes every element)
        return math.prod(_shapes(n.args[2] if n.target is aten.index_put.default else n))
    return sympy.Integer(0)


def node_cost(n: Node, grads: set[Node]) -> tuple[str, sympy.Expr, sympy.Expr]:
    """(kind, forward, backward) FLOPs of one node; `grads` holds the nodes that need a gradient."""
    role = n.meta.get("modfx_role")
    op = getattr(n.target, "_overloadpacket", None)
    zero = sympy.Integer(0)
    if role in _DATA:
        return role, sympy.sympify(_data(n, role)), zero
    if op is aten.einsum and len(n.args[1]) == 2:
        fwd = sympy.sympify(_einsum(n))
        needs = sum(1 for a in n.args[1] if a in grads) if n in grads else 0
        return role or "matmul", fwd, fwd * needs
    if op in _MM:
        fwd = sympy.sympify(_matmul(n, op))
        needs = sum(1 for i in _MM[op] if i < len(n.args) and n.args[i] in grads) if n in grads else 0
        return role or "matmul", fwd, fwd * needs
    if op in _ATTN:
        q, k, v = _attention_shapes(*_shapes(n.args[:3]))
        c = CAUSAL if op_arg(n.target, n.args, n.kwargs, "is_causal", False) else 1
        fwd = c * flop_registry[_SDPA](q, k, v)
        out = (*q[:-1], v[-1])
        needs = [n in grads and a in grads for a in n.args[:3]]  # q, k, v
        if not any(needs):
            bwd = 0
        elif op is aten.scaled_dot_product_attention and _runs_math_kernel(n, grads):
            # two bmm's, q @ k^T and p @ v: each operand's gradient costs one bmm (p's if q or k needs one)
            bwd = fwd / 2 * (needs[0] + needs[1] + (needs[0] or needs[1]) + needs[2])
        else:  # a fused kernel: its backward recomputes the scores
            bwd = c * flop_registry[_SDPA_BWD](out, q, k, v)
        return role or "attention", sympy.sympify(fwd), sympy.sympify(bwd)
    return role or "other", zero, zero


def _attention_shapes(q, k, v):
    """q, k, v [B, H, S, hd] with k's and v's batch, heads and (when it equals k's) head size read from q:
    a key/value input with a batch symbol of its own (an encoder memory given as a model input) gets its
    head size as an expression of both batch symbols from a `view(..., -1, ...)`, equal to q's at run time
    but not provably so for torch's formulas."""
    kv_hd = q[-1] if k[-1] != q[-1] and v[-1] == k[-1] else v[-1]
    return q, (*q[:-2], k[-2], q[-1]), (*q[:-2], v[-2], kv_hd)


def _runs_math_kernel(n: Node, grads: set[Node]) -> bool:
    """Whether torch runs this scaled_dot_product_attention call as its decomposed math kernel (plain
    bmm's) rather than a fused one, e.g. multi-query attention without `enable_gqa` on CPU. Asked of torch's
    own dispatch, `_fused_sdp_choice`, on real tensors with the inputs' example sizes, strides, dtypes,
    device and gradient needs (for fake tensors it always answers "math")."""
    def real(a):
        v = a.meta.get("val") if isinstance(a, Node) else a
        if not isinstance(v, torch.Tensor):
            return v
        hint = lambda s: s.node.hint if isinstance(s, torch.SymInt) else s  # noqa: E731
        sizes, strides = [hint(s) for s in v.shape], [hint(s) for s in v.stride()]
        if any(x is None for x in (*sizes, *strides)):
            raise LookupError("no example size")
        t = torch.empty_strided(sizes, strides, dtype=v.dtype, device=v.device)
        return t.requires_grad_() if a in grads and t.is_floating_point() else t
    try:
        args, kwargs = map_aggregate((n.args, n.kwargs), real)
        return torch.ops.aten._fused_sdp_choice(*args, **kwargs) == 0  # SDPBackend.math
    except Exception:  # noqa: BLE001 - no example sizes or no such device here: count the fused kernel
        return False


def needs_grad(graph: Graph, root=None) -> set[Node]:
    """Nodes whose value needs a gradient: parameters (as `root` has them, else as captured) and
    floating results of differentiable ops on them, that reach an output through differentiable ops
    (a value read only through `detach`, such as a ranking score, gets no gradient)."""
    return ancestors_within(graph.output_node(), _depends_on_params(graph, root))


def _depends_on_params(graph: Graph, root) -> set[Node]:
    out: set[Node] = set()
    for n in graph.nodes:
        v = n.meta.get("val")
        if n.op == "get_attr":
            t = _resolve(root, n.target) if root is not None else v
            if isinstance(t, torch.Tensor) and t.requires_grad:
                out.add(n)
        elif n.op == "placeholder":
            if isinstance(v, torch.Tensor) and v.requires_grad:
                out.add(n)
        elif n.op == "call_function" and n.target is not aten.detach.default and _floating(v):
            if any(a in out for a in n.all_input_nodes):
                out.add(n)
    return out


def _resolve(root, target: str):
    try:
        return operator.attrgetter(target)(root)
    except AttributeError:
        return None


def _floating(v) -> bool:
    if isinstance(v, torch.Tensor):
        return v.is_floating_point()
    return isinstance(v, (tuple, list)) and any(_floating(x) for x in v)


def count(graph: Graph, blocks=(), root=None) -> list[Cost]:
    """A `Cost` for every call_function node, attributed to the first of `blocks` on its module stack."""
    grads, names = needs_grad(graph, root), set(blocks)
    costs = []
    for n in (n for n in graph.nodes if n.op == "call_function"):
        kind, fwd, bwd = node_cost(n, grads)
        block = next((p for p in module_paths(n) if p in names), None)
        costs.append(Cost(n, kind, block, fwd, bwd))
    return costs


# --- symbols ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Names:
    """Readable names for the raw export symbols: batch -> B, sequence -> S, each routed block's
    capacity k (a FloorDiv of S) -> k, or k_i when the blocks' capacities differ. With several routed
    stacks (MoDConfig.token_input a tuple), each stack's sequence is S_<input> and its capacity k_<input>."""

    table: dict  # raw expression -> pretty symbol
    hints: dict  # raw symbol -> its example value
    seqs: tuple  # pretty symbols of the routed stacks' sequences
    k: dict  # routed block -> raw k expression
    length: dict  # routed block -> raw token-axis length the block's top-k ranks (S, or S + 1 with CLS)

    def seq_of(self, block: str) -> sympy.Symbol | None:
        """The routed stack's sequence symbol that `block`'s top-k ranks over (None when static)."""
        length = self.length.get(block)
        return None if length is None else next(iter(self.pretty(length).free_symbols & set(self.seqs)), None)

    def pretty(self, e) -> sympy.Expr:
        return sympy.expand(sympy.sympify(e).xreplace(self.table))

    def define(self, e) -> sympy.Expr:
        """`e` with B and S named but k spelled out, e.g. (S + 7)//8."""
        return sympy.sympify(e).xreplace({r: p for r, p in self.table.items() if r.is_Symbol})

    def values(self, given: dict | None = None) -> dict:
        """Raw and pretty symbol -> int, from the example values overridden by `given` (raw symbol -> int)."""
        env = {s: sympy.Integer(v) for s, v in {**self.hints, **(given or {})}.items()}
        named = {p: raw.xreplace(env) for raw, p in self.table.items()}
        return {**env, **{p: v for p, v in named.items() if v.is_Integer}}

    @staticmethod
    def of(graph: Graph, blocks=(), seq: sympy.Expr | tuple | None = None) -> "Names":
        """`seq`: the routed blocks' token-axis length (Capture.seq_expr), or a tuple of them, one per routed
        stack (Capture.seq_exprs); default: the first input's."""
        pos = dict(integer=True, positive=True)
        table, stack_input = {}, {}  # raw expression -> pretty symbol; raw S of a routed stack -> its input
        seqs = seq if isinstance(seq, tuple) else (seq,)
        seqs = [token_axis_length(graph) if s is None else s for s in seqs]  # axis 1 of the inputs, or 0 sequence-first
        seqs = [s for s in seqs if s is not None and s.is_Symbol]
        placeholders = graph.find_nodes(op="placeholder") if seqs else []
        for i, s in enumerate(seqs):
            tokens = input_over(graph, s)
            if tokens is None:
                continue
            shape = shape_exprs(tokens)
            batch = shape[1] if shape[0] == s else shape[0]
            if i == 0 and batch.is_Symbol:
                table[batch] = sympy.Symbol("B", **pos)
            table[s] = sympy.Symbol("S" if len(seqs) == 1 else f"S_{tokens.name}", **pos)
            stack_input[s] = tokens.name
        for ph in placeholders:  # another sequence (an encoder's, when the decoder is routed): S_<input>
            shape = shape_exprs(ph)
            if shape and len(shape) >= 2 and shape[1].is_Symbol and shape[1] not in table:
                table[shape[1]] = sympy.Symbol(f"S_{ph.name}", **pos)
        k, length = {}, {}
        for n in graph.nodes:
            count = chosen_count(n)
            if count is not None:
                b = module_paths(n)[-1]
                k[b] = expr(count.meta["val"] if isinstance(count, Node) else count)
                length[b] = shape_exprs(n.args[0])[1]
        distinct = {e for e in k.values() if not e.is_Symbol and e.free_symbols}
        of_stack = {e: [stack_input[s] for s in e.free_symbols if s in stack_input] for e in distinct}
        per_stack = len(stack_input) > 1 and len(distinct) == len(stack_input)
        per_stack = per_stack and all(len(v) == 1 for v in of_stack.values())
        for b, e in k.items():
            if e in distinct:
                index = list(blocks).index(b) if b in blocks else b
                name = "k" if len(distinct) == 1 else f"k_{of_stack[e][0]}" if per_stack else f"k_{index}"
                table[e] = sympy.Symbol(name, **pos)
        try:
            env = fake_mode_of(graph).shape_env
            # torch >= 2.13 names it backed_var_to_val; torch 2.11 var_to_val (deprecated since)
            vals = env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val
            hints = {s: int(v) for s, v in vals.items()}
        except (RuntimeError, AttributeError):
            hints = {}
        return Names(table, hints, tuple(table[s] for s in stack_input), k, length)


# --- budget check -------------------------------------------------------------------------------

def _fmt(names: Names, c: Cost) -> str:
    stack = module_paths(c.node)
    return f"{c.node.name} ({c.node.target}, {stack[-1] if stack else '-'}: {names.pretty(c.fwd)})"


def _total(names: Names, costs, keep=lambda c: True) -> sympy.Expr:
    return names.pretty(sympy.Add(*(c.fwd for c in costs if keep(c))))


def _check_body(block: str, costs: list[Cost], names: Names) -> None:
    """A routed block's body (its nodes minus the routing ones) must not grow with S at fixed k."""
    k, length, S = names.k.get(block), names.length.get(block), names.seq_of(block)
    if S is None or k is None or names.pretty(k) == names.pretty(length):
        return  # static sequence, or capacity 1 (k = S)
    bad = [c for c in costs if c.block == block and c.kind not in ROUTING and S in names.pretty(c.fwd).free_symbols]
    if bad:
        raise ModfxError(
            f"FLOP budget: routed block {block} still runs on all S tokens, not the k = {names.define(k)} routed "
            "ones; its body should scale with k only. Offending nodes:\n  " + "\n  ".join(_fmt(names, c) for c in bad[:8])
            + "\nThis is a bug in the routing rewrite (the region was not re-pointed at the gathered tokens)."
        )


def _ideal(dense: list[Cost], dnames: Names, names: Names, routed) -> tuple[sympy.Expr, dict]:
    """Dense total with each routed block's cost re-evaluated at k tokens, and per-scope expectations."""
    scopes: dict = {}
    for c in dense:
        scopes[c.block] = scopes.get(c.block, 0) + c.fwd
    expect = {}
    for b, e in scopes.items():
        e = dnames.pretty(e)
        if b in routed and b in names.k:
            length, k, S = names.pretty(names.length[b]), names.pretty(names.k[b]), names.seq_of(b)
            (s,) = sympy.solve(sympy.Eq(length, k), S) if S is not None and length != k else (None,)
            e = sympy.expand(e.xreplace({S: s})) if s is not None else e
        expect[b] = e
    return sympy.Add(*expect.values()), expect


def check_budget(graph: Graph, dense: Graph, blocks, routed, seq: sympy.Expr | None = None, rel: float = 1e-3) -> None:
    """Raise `ModfxError` if a routed block's body still scales with S (`seq`, the routed blocks' token
    axis), or if the routed graph's forward FLOPs exceed the dense graph's with the routed blocks run on k
    tokens, plus the routing overhead."""
    names, dnames = Names.of(graph, blocks, seq), Names.of(dense, blocks, seq)
    costs, dcosts = count(graph, blocks), count(dense, blocks)
    for b in routed:
        _check_body(b, costs, names)
    ideal, expect = _ideal(dcosts, dnames, names, set(routed))
    body = lambda c: c.kind not in ROUTING  # noqa: E731
    excess = sympy.expand(_total(names, costs, body) - ideal)
    if excess == 0:
        return
    for env in _probes(names):
        limit = rel * float(ideal.xreplace(env))
        if float(excess.xreplace(env)) > limit:
            raise ModfxError(_excess_message(names, costs, expect, env, limit))


def _probes(names: Names):
    """The example sizes, and the same with 8x longer sequences."""
    yield names.values()
    longer = {raw: 8 * names.hints[raw] for raw, p in names.table.items() if p in names.seqs and raw in names.hints}
    if longer:
        yield names.values(longer)


def _excess_message(names: Names, costs, expect, env, limit) -> str:
    lines = []
    for scope, e in expect.items():
        mine = [c for c in costs if c.block == scope and c.kind not in ROUTING]
        over = float(_total(names, mine).xreplace(env)) - float(e.xreplace(env))
        if over > limit:
            heavy = sorted((c for c in mine if c.fwd != 0), key=lambda c: -float(c.fwd.xreplace(env)))[:5]
            lines.append(f"{scope or '(outside blocks)'}: {over:.3g} FLOPs over; heaviest nodes: "
                         + ", ".join(_fmt(names, c) for c in heavy))
    at = ", ".join(f"{p}={env[p]}" for p in names.table.values())
    return ("FLOP budget: the routed graph costs more than the dense model with its routed blocks run on k "
            f"tokens plus the routing overhead (at {at}).\n  " + "\n  ".join(lines or ["(no single scope)"]))


# --- FlopCounterMode mapping for the ops torch counts as 0 ------------------------------------------

def _cpu_attn(q, k, v, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs):
    return int((CAUSAL if is_causal else 1) * flop_registry[_SDPA](q, k, v))


def _cpu_attn_bwd(grad_out, q, k, v, out, lse, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs):
    return int((CAUSAL if is_causal else 1) * flop_registry[_SDPA_BWD](grad_out, q, k, v))


def torch_mapping() -> dict:
    """`FlopCounterMode(custom_mapping=...)` entries for the CPU flash-attention kernels (torch counts 0)."""
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attn,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attn_bwd,
    }
