"""The core transform, specified by its oracles on every reference model."""

import copy

import pytest
import sympy
import torch

import modfx
from modfx.models import encoder, gpt, llama, moe

from reference import mod_forward, routers_of

D, H, V, S, B = 32, 4, 64, 24, 2

MODELS = {
    "gpt": lambda: gpt.GPT(gpt.GPTConfig(n_layers=3, d_model=D, n_heads=H, vocab_size=V, max_seq_len=128)),
    "llama": lambda: llama.Llama(llama.LlamaConfig(n_layers=3, d_model=D, n_heads=H, n_kv_heads=2, vocab_size=V, max_seq_len=128)),
    "encoder": lambda: encoder.Encoder(encoder.EncoderConfig(n_layers=3, d_model=D, n_heads=H, vocab_size=V, max_seq_len=128)),
    "moe": lambda: moe.MoE(moe.MoEConfig(n_layers=3, d_model=D, n_heads=H, vocab_size=V, max_seq_len=128)),
}
CAUSAL = ["gpt", "llama", "moe"]


def ids_of(batch=B, seq=S):
    return torch.randint(0, V, (batch, seq))


@pytest.fixture(scope="module", params=list(MODELS))
def built(request):
    torch.manual_seed(0)
    model = MODELS[request.param]().eval()
    mod = modfx.transform(model, (ids_of(),), capacity=0.25, every=2)
    return request.param, model, mod


def test_capacity_one_without_weighting_reproduces_the_model(built):
    name, model, _ = built
    dense = modfx.transform(model, (ids_of(),), capacity=1.0, weighting="none", every=1)
    ids = ids_of()
    torch.testing.assert_close(dense(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("weighting", ["raw", "sigmoid"])
def test_equals_hand_written_eager_reference(built, weighting):
    name, model, mod = built
    mod = modfx.transform(model, (ids_of(),), capacity=0.25, every=2, weighting=weighting)
    ids = ids_of()
    want = mod_forward(model, ids, routers_of(mod, model), 0.25, weighting)
    torch.testing.assert_close(mod(ids).logits, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("weighting", ["raw", "sigmoid"])
def test_gradients_equal_hand_written_eager_reference(built, weighting):
    name, model, _ = built
    mod = modfx.transform(model, (ids_of(),), capacity=0.25, every=2, weighting=weighting)
    ids = ids_of()
    mod(ids).logits.pow(2).mean().backward()
    reference = copy.deepcopy(model)
    routers = {i: w.detach().clone().requires_grad_() for i, w in routers_of(mod, model).items()}
    mod_forward(reference, ids, routers, 0.25, weighting).pow(2).mean().backward()
    for i, w in routers.items():
        torch.testing.assert_close(mod.get_parameter(f"layers.{i}.mod_router.weight").grad, w.grad, rtol=1e-4, atol=1e-6)
    for n, p in reference.named_parameters():
        torch.testing.assert_close(mod.get_parameter(n).grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_rewritten_graph_keeps_batch_and_sequence_symbolic(built):
    # Inserted nodes are fake-run to fill meta['val']; a run that reads a symbolic size as an int
    # (torch 2.11's linear without the Python dispatcher) specializes B and S for the whole graph.
    _, _, mod = built
    graph = mod.modfx_graphs[("topk", False)]
    routers = [n for n in graph.nodes if n.meta.get("modfx_role") == "router"]
    assert routers
    for n in routers:
        batch, seq = n.meta["val"].shape[:2]
        assert isinstance(batch, torch.SymInt) and isinstance(seq, torch.SymInt), n.meta["val"].shape
        assert not batch.node.expr.is_number and not seq.node.expr.is_number, n.meta["val"].shape


def test_routed_block_changes_exactly_k_tokens_and_leaves_the_rest_bit_identical():
    model = llama.Llama(llama.LlamaConfig(n_layers=1, d_model=D, n_heads=H, vocab_size=V)).eval()
    mod = modfx.transform(model, (ids_of(),), capacity=0.25, blocks=(0,))
    ids = ids_of()
    skipped = model.head(model.norm(model.tok_emb(ids)))  # every token skips the only block
    same = (mod(ids).logits == skipped).all(dim=-1)  # [B, S]
    k = 6  # ceil(0.25 * 24)
    assert same.sum(dim=1).tolist() == [S - k] * B


def test_gathered_tokens_keep_their_original_rope_positions():
    model = llama.Llama(llama.LlamaConfig(n_layers=2, d_model=D, n_heads=H, vocab_size=V)).eval()
    with torch.no_grad():  # weights large enough that attention patterns (and so positions) matter
        for p in model.parameters():
            p.normal_(0, 0.3)
    mod = modfx.transform(model, (ids_of(),), capacity=0.25, blocks=(1,))
    ids = ids_of()
    routers = routers_of(mod, model)
    right = mod_forward(model, ids, routers, 0.25, positions="original")
    wrong = mod_forward(model, ids, routers, 0.25, positions="compacted")
    got = mod(ids).logits
    torch.testing.assert_close(got, right, rtol=0, atol=1e-5)
    assert (got - wrong).abs().max() > 1e-3


@pytest.mark.parametrize("name", CAUSAL)
def test_routed_computation_is_causal_at_capacity_one(name):
    model = MODELS[name]().eval()
    mod = modfx.transform(model, (ids_of(),), capacity=1.0)
    ids = ids_of()
    t = 10
    perturbed = ids.clone()
    perturbed[:, t:] = (perturbed[:, t:] + 1) % V
    torch.testing.assert_close(mod(ids).logits[:, :t], mod(perturbed).logits[:, :t], rtol=0, atol=0)


def test_fullgraph_compile_matches_eager_at_three_sequence_lengths(built):
    name, _, mod = built
    compiled = torch.compile(mod, fullgraph=True, dynamic=True)
    with torch.no_grad():  # the forward graph; test_compiled_training_step_* compiles a backward
        for seq in (16, 24, 37):
            ids = ids_of(seq=seq)
            torch.testing.assert_close(compiled(ids).logits, mod(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weighting", ["raw", "sigmoid"])
def test_routers_receive_gradients(weighting):
    model = MODELS["llama"]()
    mod = modfx.transform(model, (ids_of(),), capacity=0.25, weighting=weighting)
    mod(ids_of()).logits.float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in mod.named_parameters() if n.endswith("mod_router.weight")}
    assert list(grads) == ["layers.1.mod_router.weight"]
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_training_step_updates_routers_and_blocks():
    model = MODELS["gpt"]()
    mod = modfx.transform(model, (ids_of(),), capacity=0.25)
    opt = torch.optim.AdamW(mod.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in mod.named_parameters()}
    ids = ids_of()
    loss = torch.nn.functional.cross_entropy(mod(ids).logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    for n in ("layers.1.mod_router.weight", "layers.1.mod_predictor.0.weight", "layers.1.attn.qkv.weight"):
        assert not torch.equal(before[n], mod.get_parameter(n)), n


def test_users_model_is_unchanged(built):
    name, _, _ = built
    model = MODELS[name]()
    model.train()
    state = copy.deepcopy(model.state_dict())
    ids = ids_of()
    model.eval()
    out = model(ids).logits
    model.train()
    modfx.transform(model, (ids,), capacity=0.25)
    assert model.training
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    model.eval()
    torch.testing.assert_close(model(ids).logits, out, rtol=0, atol=0)


def test_state_dict_keeps_original_names_and_adds_routing_keys(built):
    _, model, mod = built
    keys, orig = set(mod.state_dict()), set(model.state_dict())
    assert orig <= keys
    assert {k.split(".mod_")[1].split(".")[0] for k in keys - orig} == {"router", "predictor"}


def test_output_structure_is_the_models(built):
    _, model, mod = built
    ids = ids_of()
    assert type(mod(ids)) is type(model(ids))


def test_plan_reports_blocks_and_gathered_side_inputs():
    model = MODELS["llama"]()
    p = modfx.plan(modfx.transform(model, (ids_of(),), capacity=0.25, every=2))
    assert [b.name for b in p.blocks] == ["layers.0", "layers.1", "layers.2"]
    assert [b.routed for b in p.blocks] == [False, True, False]
    assert [s.seq_axes for s in p.routed[0].side_inputs] == [(1,), (1,)]  # RoPE cos, sin
    assert "layers.1" in str(p)


def test_encoder_mask_is_gathered_along_its_key_axis():
    p = modfx.plan(modfx.transform(MODELS["encoder"](), (ids_of(),)))
    assert [s.seq_axes for s in p.routed[0].side_inputs] == [(3,)]


def test_deterministic_outputs_across_runs(built):
    _, _, mod = built
    ids = ids_of()
    assert torch.equal(mod(ids).logits, mod(ids).logits)


def test_ties_in_router_scores_go_to_earlier_tokens():
    model = llama.Llama(llama.LlamaConfig(n_layers=1, d_model=D, n_heads=H, vocab_size=V)).eval()
    mod = modfx.transform(model, (ids_of(),), capacity=0.25, blocks=(0,), weighting="none")
    ids = torch.full((1, S), 3)  # identical tokens: equal hidden states, equal... except RoPE (none before block)
    skipped = model.head(model.norm(model.tok_emb(ids)))
    changed = ~(mod(ids).logits == skipped).all(dim=-1)[0]
    assert changed.nonzero().flatten().tolist() == list(range(6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_k_selection_is_a_stable_descending_sort_on_ties_and_signed_zeros(dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from modfx.passes.route_topk import _topk_earliest

    n, k = 64, 16
    g = torch.fx.Graph()
    logits = g.placeholder("logits")
    logits.meta["val"] = FakeTensorMode().from_tensor(torch.empty(3, n, dtype=dtype))
    g.output(_topk_earliest(g, logits, n, k, None))
    select = torch.fx.GraphModule(torch.nn.Module(), g)
    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        r = torch.randn(3, n, generator=gen).mul(2).round()  # few distinct values: many ties at the k-th
        r[:, torch.randperm(n, generator=gen)[:8]] = -0.0
        r[:, torch.randperm(n, generator=gen)[:8]] = 0.0
        r = r.to(dtype)
        want = r.sort(dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values
        assert torch.equal(select(r).sort(dim=1).values, want), trial


def test_top_k_selection_ranks_padded_tokens_last():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from modfx.passes.route_topk import _topk_earliest

    n, k = 32, 8
    g = torch.fx.Graph()
    fake = FakeTensorMode()
    logits, real = g.placeholder("logits"), g.placeholder("real")
    logits.meta["val"], real.meta["val"] = fake.from_tensor(torch.empty(2, n)), fake.from_tensor(torch.empty(2, n, dtype=torch.bool))
    g.output(_topk_earliest(g, logits, n, k, None, real))
    select = torch.fx.GraphModule(torch.nn.Module(), g)
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(2, n, generator=gen)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, :28] = False  # 4 real tokens < k: all 4 chosen, then the earliest padded ones
    mask[1, ::2] = False
    want = r.masked_fill(~mask, float("-inf")).sort(dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values
    got = select(r, mask).sort(dim=1).values
    assert torch.equal(got, want)
    assert got[0].tolist() == [0, 1, 2, 3, 28, 29, 30, 31] and mask[1, got[1]].all()


def test_float64_scores_are_ranked_by_a_stable_sort_and_equal_the_eager_reference():
    model = MODELS["llama"]().double().eval()
    mod = modfx.transform(model, (ids_of(),), capacity=0.25, every=2)
    targets = [n.target for n in mod.modfx_graphs[("topk", False)].nodes]
    assert torch.ops.aten.sort.stable in targets and torch.ops.aten.topk.default not in targets
    ids = ids_of()
    want = mod_forward(model, ids, routers_of(mod, model), 0.25)
    torch.testing.assert_close(mod(ids).logits, want, rtol=0, atol=1e-10)


def test_adjacent_routed_blocks_equal_the_eager_reference():
    model = MODELS["llama"]().eval()
    mod = modfx.transform(model, (ids_of(),), capacity=0.25, every=1)
    ids = ids_of()
    want = mod_forward(model, ids, routers_of(mod, model), 0.25)
    torch.testing.assert_close(mod(ids).logits, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seq_first", [False, True])
def test_split_tokens_gives_x_its_chosen_rows_gradient_added_once(seq_first):
    from modfx.passes.route_topk import split_tokens

    x = torch.randn(3, 10, 4, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 4, 9], [1, 2, 3], [5, 7, 8]])  # [B, k] sorted, unique per row
    b = torch.arange(3)[:, None]
    xt = x.transpose(0, 1) if seq_first else x  # [S, B, D] or [B, S, D]
    rows = (idx.T, b.T) if seq_first else (b, idx)
    u = torch.randn(xt[rows].shape, dtype=torch.float64)
    g = torch.randn(xt.shape, dtype=torch.float64)
    xp, xg = split_tokens(xt, *rows)
    y = torch.index_put(xp, rows, xg * u, accumulate=True)
    (grad,) = torch.autograd.grad(y, x, g)
    # the same map through the plain ops: y = x + scatter(x_k * u) at the chosen rows
    y_plain = torch.index_put(xt, rows, xt[rows] * u, accumulate=True)
    (grad_plain,) = torch.autograd.grad(y_plain, x, g)
    assert torch.equal(y, y_plain)
    torch.testing.assert_close(grad, grad_plain, rtol=0, atol=1e-12)
    with torch.no_grad():
        assert split_tokens(xt, *rows)[0] is xt  # no copy of x when no gradient is recorded


def test_sequence_first_encoder_routes_k_tokens_of_each_sequence_and_trains():
    """nn.TransformerEncoder with batch_first=False: x is [S, B, D], batch on axis 1."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(D, H, 2 * D, dropout=0.0)  # sequence-first
    model = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    x = torch.randn(S, B, D)
    mod = modfx.transform(model, (x,), capacity=0.25, blocks=(0,))
    same = (mod(x) == x).all(dim=-1)  # [S, B]: tokens that skipped the only block
    assert same.sum(dim=0).tolist() == [S - 6] * B  # k = ceil(0.25 * 24) per sequence
    mod.train()
    compiled = torch.compile(mod, fullgraph=True)
    torch.testing.assert_close(compiled(x), mod(x), rtol=1e-4, atol=1e-5)
    compiled(x).pow(2).mean().backward()
    assert mod.get_parameter("layers.0.mod_router.weight").grad.abs().sum() > 0


def test_capacity_one_without_weighting_reproduces_the_model_under_bf16_autocast(built):
    name, model, _ = built
    dense = modfx.transform(model, (ids_of(),), capacity=1.0, weighting="none", every=1)
    ids = ids_of()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = dense(ids).logits, model(ids).logits
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_equals_hand_written_eager_reference_under_bf16_autocast(built):
    name, model, mod = built
    ids = ids_of()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mod(ids).logits
        want = mod_forward(model, ids, routers_of(mod, model), 0.25)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_compiled_training_step_under_bf16_autocast_matches_eager():
    torch.manual_seed(0)
    mod = modfx.transform(MODELS["llama"](), (ids_of(),), capacity=0.25)
    compiled = torch.compile(mod, fullgraph=True)
    ids = ids_of()
    grads = []
    for step in (mod, compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = step(ids).logits
        logits.float().pow(2).mean().backward()
        grads.append({n: p.grad for n, p in mod.named_parameters()})
        mod.zero_grad(set_to_none=True)
    eager, inductor = grads
    assert eager["layers.1.mod_router.weight"].abs().sum() > 0
    for n, g in eager.items():
        torch.testing.assert_close(inductor[n], g, rtol=5e-2, atol=5e-3, msg=n)


def test_torch_func_grad_equals_backward():
    torch.manual_seed(0)
    mod = modfx.transform(MODELS["llama"](), (ids_of(),), capacity=0.25)
    ids = ids_of()
    params = dict(mod.named_parameters())
    grads = torch.func.grad(lambda p: torch.func.functional_call(mod, p, (ids,)).logits.pow(2).mean())(params)
    mod(ids).logits.pow(2).mean().backward()
    for n, p in params.items():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_per_sample_gradients_under_vmap_equal_one_backward_per_sample():
    torch.manual_seed(0)
    mod = modfx.transform(MODELS["llama"](), (ids_of(),), capacity=0.25)  # with the predictor's aux loss
    ids = ids_of(batch=3)
    params = {n: p.detach() for n, p in mod.named_parameters()}

    def loss(p, x):  # one sequence, as a batch of one
        return torch.func.functional_call(mod, p, (x[None],)).logits.pow(2).mean()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, ids)
    for i in range(3):
        mod.zero_grad(set_to_none=True)
        mod(ids[i : i + 1]).logits.pow(2).mean().backward()
        for n, p in mod.named_parameters():
            torch.testing.assert_close(per_sample[n][i], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    assert per_sample["layers.1.mod_router.weight"].abs().sum() > 0


def _grad_of_squared_logits(mod, ids):
    return torch.func.grad(lambda p: torch.func.functional_call(mod, p, (ids,)).logits.pow(2).mean())


def test_compiled_torch_func_grad_equals_eager_with_the_predictors_loss():
    model = llama.Llama(llama.LlamaConfig(n_layers=2, d_model=D, n_heads=H, vocab_size=V))
    mod = modfx.transform(model, (ids_of(),), capacity=0.25)
    params = {n: p.detach() for n, p in mod.named_parameters()}
    mod(ids_of(seq=S - 1))
    stats = modfx.routing_stats(mod)
    grad = _grad_of_squared_logits(mod, ids_of())
    want, got = grad(params), torch.compile(grad, fullgraph=True)(params)
    assert want["layers.1.mod_predictor.0.weight"].abs().sum() > 0
    assert modfx.routing_stats(mod) == stats  # the transforms' statistics are per-call values, not kept
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-6, msg=n)


def test_compiled_per_sample_gradients_equal_eager_without_the_predictor():
    model = llama.Llama(llama.LlamaConfig(n_layers=2, d_model=D, n_heads=H, vocab_size=V))
    mod = modfx.transform(model, (ids_of(),), capacity=0.25, predictor=False)
    params = {n: p.detach() for n, p in mod.named_parameters()}
    per_sample = torch.func.vmap(lambda p, x: _grad_of_squared_logits(mod, x[None])(p), in_dims=(None, 0))
    ids = ids_of(batch=3)
    want, got = per_sample(params, ids), torch.compile(per_sample, fullgraph=True)(params, ids)
    assert want["layers.1.mod_router.weight"].abs().sum() > 0
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-6, msg=n)


def test_symbolic_sizes_with_max_and_min_are_emitted():
    from modfx.passes.graph_utils import emit_sym_expr

    K = sympy.Symbol("k", integer=True, positive=True)
    graph = torch.fx.Graph()
    assert emit_sym_expr(graph, sympy.Max(0, 1 - K) + sympy.Min(K, 3), {K: 5}) == 3
