"""FLOP accounting: symbolic forms, agreement with torch's FlopCounterMode, the report, the budget check."""

import copy
import functools
import warnings
from fractions import Fraction

import pytest
import sympy
import torch
from torch import nn

import modfx
from modfx.capture import capture
from modfx.flops import flops, torch_count
from modfx.models import gpt, llama
from modfx.passes.discover import find_blocks
from modfx.passes.flops import check_budget
from modfx.passes.graph_utils import aten, call
from modfx.passes.route_topk import gather_tokens, select_topk, token_index
from modfx.passes.router import insert_router

B, S, k = sympy.symbols("B S k", integer=True, positive=True)
N, D, H, V = 2, 64, 4, 64
MODELS = {
    "llama": lambda: llama.Llama(llama.LlamaConfig(n_layers=N, d_model=D, n_heads=H, vocab_size=V)),
    "gpt": lambda: gpt.GPT(gpt.GPTConfig(n_layers=N, d_model=D, n_heads=H, vocab_size=V)),
}


class Case:
    def __init__(self, name):
        torch.manual_seed(0)
        self.model = MODELS[name]()
        self.ids = torch.randint(0, V, (2, 64))
        self.mod = modfx.transform(self.model, (self.ids,), capacity=0.125, every=2)  # routes layers.1
        self.dense = flops(self.model, (self.ids,))
        self.routed = flops(self.mod, (self.ids,))
        self.cap = capture(self.model, (self.ids,), {})


@functools.lru_cache(maxsize=None)
def built(name) -> Case:
    return Case(name)


@pytest.fixture(params=list(MODELS))
def case(request):
    return built(request.param)


@pytest.fixture
def llama_case():
    return built("llama")


def per_layer(model) -> tuple[int, int]:
    """(linear FLOPs per token, attention FLOPs per token^2) of one block, from the config."""
    if isinstance(model, llama.Llama):
        return 8 * D * D + 6 * D * model.config.ffn_hidden, 4 * D
    return 8 * D * D + 16 * D * D, 4 * D  # qkv + proj, 4x MLP


def rows(report):
    return {r.name: r for r in (*report.blocks, *report.kinds, report.overhead)}


def test_dense_totals_are_linear_in_tokens_plus_quadratic_attention(case):
    lin, att = per_layer(case.model)
    head = 2 * D * V
    r = rows(case.dense)
    assert r["matmul"].expr == (N * lin + head) * B * S
    assert r["attention"].expr == N * att * B * S**2  # causal attention counted in full (CAUSAL = 1)
    assert case.dense.total == (N * lin + head) * B * S + N * att * B * S**2
    # backward: 2x per matmul, 2.5x for attention (scores recomputed), as FlopCounterMode
    assert sympy.expand(case.dense.train - 3 * (N * lin + head) * B * S - sympy.Rational(7, 2) * N * att * B * S**2) == 0
    assert 3.0 <= case.dense.train_at / case.dense.total_at <= 3.5
    assert case.dense.at == {"B": 2, "S": 64}


def test_routed_block_body_scales_with_k(case):
    lin, att = per_layer(case.model)
    r = rows(case.routed)
    assert r["attention"].expr == att * B * S**2 + att * B * k**2  # layers.0 on S, layers.1 on k
    assert r["matmul"].expr == (lin + 2 * D * V) * B * S + lin * B * k
    assert r["router"].expr == 2 * D * B * k  # re-scores the k chosen tokens
    h = modfx.config.predictor_width(D)  # the ranking over all S shares the predictor's first GEMM [D, 1 + h]
    # (its second layer, h -> 1, is a weighted sum: elementwise, 0 FLOPs here as in FlopCounterMode)
    assert sympy.expand(r["predictor"].expr).coeff(S).coeff(B) == 2 * D * (1 + h)
    assert {"sort", "topk", "gather", "scatter"} <= set(r)
    assert r["layers.1"].routed and not r["layers.0"].routed
    body = r["layers.1"].expr - sum(r[x].expr for x in ("router", "sort", "topk", "gather", "scatter", "predictor") if x in r)
    assert sympy.expand(body).free_symbols == {B, k}
    assert case.routed.at == {"B": 2, "S": 64, "k": 8}
    assert case.routed.total_at < 0.75 * case.dense.total_at


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "fwd+bwd"])
@pytest.mark.parametrize("which", ["dense", "routed"])
def test_agrees_with_flop_counter_mode(case, which, backward):
    module, report = (case.model, case.dense) if which == "dense" else (case.mod, case.routed)
    torch_total = sum(torch_count(module, (case.ids,), backward=backward).values())
    ours = report.train_at if backward else report.total_at
    assert abs(ours - torch_total) <= 0.01 * torch_total
    # exactly, once the routing data movement (which torch counts as 0) is left out
    data = sum(r.fwd for r in report.kinds if r.name in ("sort", "topk", "gather", "scatter"))
    assert ours - data == torch_total


@pytest.mark.parametrize("which", ["dense", "routed"])
def test_attention_on_torchs_math_kernel_counts_its_backward_as_bmms(which):
    """Multi-query attention without enable_gqa runs as SDPA's math kernel on CPU (two bmm's, backward 2x
    forward), not a fused kernel (2.5x): the count follows the kernel torch picks, like FlopCounterMode."""
    import transformers

    cfg = transformers.FalconConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, use_cache=False)
    model = transformers.FalconForCausalLM(cfg).eval()
    ids = torch.randint(0, V, (2, 24))
    module = model if which == "dense" else modfx.transform(model, (ids,), capacity=0.25, every=2)
    report = flops(module, (ids,))
    counted = torch_count(module, (ids,), backward=True)
    assert "aten.bmm" in counted and not any("attention" in op for op in counted)  # the math kernel ran
    data = sum(r.fwd for r in report.kinds if r.name in ("sort", "topk", "gather", "scatter"))
    assert report.train_at - data == sum(counted.values())


def test_evaluates_at_other_shapes(llama_case):
    ids = torch.randint(0, V, (3, 96))
    report = flops(llama_case.mod, (ids,))
    assert report.at == {"B": 3, "S": 96, "k": 12}
    assert abs(report.total_at - sum(torch_count(llama_case.mod, (ids,)).values())) <= 0.01 * report.total_at
    assert flops(llama_case.mod).total_at == llama_case.routed.total_at  # shapes it was captured with


def test_report_renders_with_tabulate(llama_case):
    text = str(llama_case.routed)
    for word in ("layers.0", "layers.1", "yes", "matmul", "attention", "router", "sort", "gather", "scatter",
                 "routing overhead", "forward + backward", "S=64", "k=8", "B*k"):
        assert word in text
    assert "-----" in text


def test_budget_check_passes_for_every_graph_variant(case):
    plan = case.mod.modfx_plan
    for (mode, training), g in case.mod.modfx_graphs.items():
        check_budget(g, case.cap.graphs[training], [b.name for b in plan.blocks], [b.name for b in plan.routed])


def _dense_copy(case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(case.cap.graphs[case.model.training])


def broken_rewrite(case):
    """Routes layers.1 (router, top-k, gather, scatter of k tokens) but still runs its body on all S
    tokens and gathers the k results afterwards."""
    g = _dense_copy(case)
    block = find_blocks(g, case.cap.seq_expr)[1]
    st = block.stack
    r = insert_router(g, nn.Module(), block)
    with g.inserting_before(block.first):
        _, _, _, idx = select_topk(g, block, r, Fraction(1, 8))
    users = list(block.out.users)
    with g.inserting_before(block.out.next):
        yg = gather_tokens(g, block.out, idx, (block.seq_axis,), block.batch_axis, st)  # [B, k, D]
        index = token_index(g, idx, block.x, block.seq_axis, block.batch_axis, st)
        merged = call(g, aten.scatter.src, (block.x, block.seq_axis, index, yg), stack=st, tag="scatter")
    for u in users:
        u.replace_input_with(block.out, merged)
    g.lint()
    attention = next(n.name for n in block.nodes if n.target is aten.scaled_dot_product_attention.default)
    return g, attention


def test_budget_check_catches_a_block_still_running_on_all_tokens(llama_case):
    g, attention = broken_rewrite(llama_case)
    names = [b.name for b in llama_case.mod.modfx_plan.blocks]
    with pytest.raises(modfx.ModfxError, match=r"layers\.1 still runs on all S tokens") as e:
        check_budget(g, _dense_copy(llama_case), names, ["layers.1"])
    assert attention in str(e.value) and "B*S**2" in str(e.value)


def test_budget_check_catches_extra_work_outside_the_blocks(llama_case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        g = copy.deepcopy(llama_case.mod.modfx_graphs[("topk", llama_case.mod.training)])
    head = [n for n in g.nodes if n.target is aten.linear.default][-1]
    with g.inserting_after(head):
        dup = g.node_copy(head)  # the head computed twice
    plan = llama_case.mod.modfx_plan
    with pytest.raises(modfx.ModfxError, match=r"outside blocks") as e:
        check_budget(g, _dense_copy(llama_case), [b.name for b in plan.blocks], [b.name for b in plan.routed])
    assert dup.name in str(e.value)


class DecoderOverMemory(nn.Module):
    """nn.TransformerDecoderLayer blocks whose cross-attention memory is a model input of its own: its batch
    axis gets a symbol of its own, and the keys' head size becomes an expression of both batch symbols."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.layers = nn.ModuleList([nn.TransformerDecoderLayer(D, H, 2 * D, dropout=0.0, batch_first=True)
                                     for _ in range(N)])

    def forward(self, tgt, memory):
        x = self.emb(tgt)
        for layer in self.layers:
            x = layer(x, memory)
        return x


def test_attention_over_a_memory_input_with_its_own_batch_symbol_agrees_with_flop_counter_mode():
    torch.manual_seed(0)
    model, inputs = DecoderOverMemory().eval(), (torch.randint(0, V, (2, 32)), torch.randn(2, 20, D))
    mod = modfx.transform(model, inputs, every=1)  # the budget check counts its attention too
    for m in (model, mod):
        report = flops(m, inputs)
        data = sum(r.fwd for r in report.kinds if r.name in ("sort", "topk", "gather", "scatter"))
        assert report.total_at - data == sum(torch_count(m, inputs).values())


class ContractionBlock(nn.Module):
    """A residual block whose contribution is an einsum, a tensordot or a transposed convolution: ops the
    export graph keeps whole that run as bmm / mm / convolution."""

    def __init__(self, kind):
        super().__init__()
        self.kind, self.norm, self.w = kind, nn.LayerNorm(D), nn.Parameter(torch.randn(D, D) * 0.1)
        self.conv = nn.ConvTranspose1d(D, D, 3, padding=1)

    def forward(self, x):  # [B, S, D]
        h = self.norm(x)
        if self.kind == "einsum":
            return x + torch.einsum("bsd,de->bse", h, self.w)
        if self.kind == "einsum-attention":
            return x + torch.einsum("bqk,bkd->bqd", torch.einsum("bqd,bkd->bqk", h, h).softmax(-1), h)
        if self.kind == "ellipsis":
            return x + torch.einsum("...d,de->...e", h, self.w)
        if self.kind == "tensordot":
            return x + torch.tensordot(h, self.w, dims=([2], [0]))
        return x + self.conv(h.transpose(1, 2)).transpose(1, 2)


class Contractions(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.emb, self.head = nn.Embedding(V, D), nn.Linear(D, V)
        self.layers = nn.ModuleList(ContractionBlock(kind) for _ in range(4))

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


@pytest.mark.parametrize("kind", ["einsum", "einsum-attention", "ellipsis", "tensordot", "conv-transpose"])
def test_einsum_tensordot_and_transposed_convolution_agree_with_flop_counter_mode(kind):
    torch.manual_seed(0)
    model, ids = Contractions(kind).eval(), torch.randint(0, V, (2, 32))
    for m in (model, modfx.transform(model, (ids,))):
        report = flops(m, (ids,))
        data = sum(r.fwd for r in report.kinds if r.name in ("sort", "topk", "gather", "scatter"))
        assert report.total_at - data == sum(torch_count(m, (ids,)).values())
        assert report.train_at - data == sum(torch_count(m, (ids,), backward=True).values())
