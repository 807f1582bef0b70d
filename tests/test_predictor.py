"""The predictor branch: trained by the normal backward, causal routing, exact full-sequence forward."""

import pytest
import torch

import modfx
from modfx.models import llama
from modfx.models.common import rope_at

from reference import widest_middle_gap

D, H, V, S, B = 32, 4, 64, 24, 2


def make(**overrides):
    torch.manual_seed(0)
    model = llama.Llama(llama.LlamaConfig(n_layers=2, d_model=D, n_heads=H, vocab_size=V)).eval()
    ids = torch.randint(0, V, (B, S))
    return model, modfx.transform(model, (ids,), **{"capacity": 0.25, **overrides}), ids


@pytest.fixture(scope="module")
def built():
    return make()


def test_aux_loss_leaves_outputs_and_main_gradients_unchanged():
    grads, outs = {}, {}
    for w in (0.0, 1.0):
        model, mod, ids = make(aux_loss_weight=w)
        out = mod(ids).logits
        out.pow(2).mean().backward()
        outs[w] = out.detach()
        grads[w] = {n: p.grad.clone() for n, p in mod.named_parameters() if p.grad is not None}
    assert torch.equal(outs[0.0], outs[1.0])
    main = [n for n in grads[1.0] if "mod_predictor" not in n]
    assert main and all(torch.equal(grads[0.0][n], grads[1.0][n]) for n in main)
    pred = [n for n in grads[1.0] if "mod_predictor" in n]
    assert pred and all(grads[1.0][n].abs().sum() > 0 for n in pred)
    assert all(grads[0.0][n].abs().sum() == 0 for n in pred)


def grads_of(mod, loss) -> dict:
    mod.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad for n, p in mod.named_parameters()}


def task_loss(mod, ids):
    return torch.nn.functional.cross_entropy(mod(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def test_aux_losses_added_to_the_loss_give_the_gradients_they_give_riding_along_in_backward():
    _, riding, ids = make(router_aux_weight=0.1)
    _, added, _ = make(router_aux_weight=0.1, aux_in_backward=False)
    added.load_state_dict(riding.state_dict())
    want = grads_of(riding, task_loss(riding, ids))
    got = grads_of(added, task_loss(added, ids) + modfx.aux_loss(added))
    assert want["layers.1.mod_predictor.0.weight"].abs().sum() > 0
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-8, msg=n)
    assert grads_of(added, task_loss(added, ids))["layers.1.mod_predictor.0.weight"] is None  # none rides along


def test_aux_losses_added_to_a_scaled_loss_are_unscaled_with_it():
    _, mod, ids = make(aux_in_backward=False)
    want = grads_of(mod, task_loss(mod, ids) + modfx.aux_loss(mod))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    got = grads_of(mod, scaler.scale(task_loss(mod, ids) + modfx.aux_loss(mod)))
    scaler.unscale_(torch.optim.SGD(mod.parameters(), lr=0.1))
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, rtol=1e-4, atol=1e-9, msg=n)


def test_aux_loss_is_refused_where_the_aux_losses_ride_along_or_before_a_forward(built):
    _, mod, _ = built
    with pytest.raises(modfx.ModfxError, match="ride along in backward.*count them twice"):
        modfx.aux_loss(mod)
    _, fresh, _ = make(aux_in_backward=False)
    with pytest.raises(modfx.ModfxError, match="call the module first"):
        modfx.aux_loss(fresh)


def test_router_aux_loss_adds_the_bce_of_the_router_score_against_top_k_to_its_gradient():
    # 2 layers, block 1 routed: with the language-model gradient zeroed, the router's gradient is exactly
    # that of weight * BCE(r, top-k membership) at block 1's input
    model, mod, ids = make(router_aux_weight=0.5, aux_loss_weight=0.0)
    out = mod(ids).logits
    assert torch.equal(out, make()[1](ids).logits)  # forward unchanged
    (0 * out.sum()).backward()
    w = mod.get_submodule("layers.1.mod_router").weight.detach().requires_grad_()
    cos, sin = rope_at(model.cos, model.sin, S)
    x1 = model.layers[0](model.tok_emb(ids), cos, sin).detach()  # [B, S, D]
    r = (x1 @ w.T)[..., 0]  # [B, S]
    k = 6  # ceil(0.25 * 24)
    idx = r.sort(dim=1, descending=True, stable=True).indices[:, :k]
    target = torch.zeros_like(r).scatter(1, idx, 1.0)
    (0.5 * torch.nn.functional.binary_cross_entropy_with_logits(r, target)).backward()
    torch.testing.assert_close(mod.get_submodule("layers.1.mod_router").weight.grad, w.grad)


def test_predictor_gradient_is_that_of_its_bce_against_top_k():
    # the predictor's first layer shares one GEMM with the ranking score; its gradient must still be exactly
    # that of aux_weight * BCE(predictor(stopgrad(x)), top-k membership) at block 1's input
    model, mod, ids = make(aux_loss_weight=0.5)
    out = mod(ids).logits
    (0 * out.sum()).backward()
    pred = mod.get_submodule("layers.1.mod_predictor")
    w = mod.get_submodule("layers.1.mod_router").weight.detach()
    x1 = model.layers[0](model.tok_emb(ids), *rope_at(model.cos, model.sin, S)).detach()  # [B, S, D]
    idx = (x1 @ w.T)[..., 0].sort(dim=1, descending=True, stable=True).indices[:, :6]  # k = ceil(0.25 * 24)
    ref = [p.detach().clone().requires_grad_() for p in pred.parameters()]
    logits = torch.func.functional_call(pred, dict(zip((n for n, _ in pred.named_parameters()), ref)), (x1,))[..., 0]
    target = torch.zeros_like(logits).scatter(1, idx, 1.0)
    (0.5 * torch.nn.functional.binary_cross_entropy_with_logits(logits, target)).backward()
    for got, want in zip(pred.parameters(), ref):
        torch.testing.assert_close(got.grad, want.grad)
    assert mod.get_submodule("layers.1.mod_router").weight.grad.abs().sum() == 0  # no LM loss: no router gradient


def test_ranking_score_and_predictor_first_layer_are_one_gemm_over_the_block_input(built):
    _, mod, _ = built
    h = modfx.config.predictor_width(D)
    assert (1 + h) % 16 == 0
    for key, graph in mod.modfx_graphs.items():
        # linears over stopgrad(x), all S tokens (no == on the symbolic sizes: it would specialise them)
        over_s = [n for n in graph.nodes if n.target is torch.ops.aten.linear.default
                  and n.args[0].target is torch.ops.aten.detach.default]
        widths = sorted(int(n.meta["val"].shape[-1]) for n in over_s)
        # top-k: [D, 1 + h] once; predictor routing: the router keeps its gradient, so no fusion there
        assert widths == ([1 + h] if key[0] == "topk" else [h]), key


def test_routing_stats_report_the_last_forward(built):
    _, mod, ids = built
    modfx.set_routing(mod, "topk")
    mod(ids)
    stats = modfx.routing_stats(mod)
    assert list(stats) == ["layers.1"]
    s = stats["layers.1"]
    assert s["aux_loss"] > 0 and 0 <= s["accuracy"] <= 1 and 0 <= s["selected"] <= 1


def test_predictor_routing_is_causal(built):
    _, mod, ids = built
    modfx.set_routing(mod, "predictor")
    try:
        t = 9
        perturbed = ids.clone()
        perturbed[:, t:] = (perturbed[:, t:] + 7) % V
        torch.testing.assert_close(mod(ids).logits[:, :t], mod(perturbed).logits[:, :t], rtol=0, atol=0)
    finally:
        modfx.set_routing(mod, "topk")


def test_predictor_routing_processes_exactly_the_selected_tokens():
    """Eager oracle: per sequence, the selected tokens (predictor logit > 0) run the block among
    themselves (at their original positions); every other token passes the block unchanged."""
    model, mod, ids = make(blocks=(1,), weighting="sigmoid")
    pred = mod.get_submodule("layers.1.mod_predictor")
    with torch.no_grad():
        x = model.layers[0](model.tok_emb(ids), *rope_at(model.cos, model.sin, S))
        pred[2].bias -= widest_middle_gap(pred(x))  # select about half of the tokens
    modfx.set_routing(mod, "predictor")
    got = mod(ids).logits
    router = mod.get_submodule("layers.1.mod_router").weight.detach()
    with torch.no_grad():
        rows = []
        for b in range(B):
            xb = x[b : b + 1]
            sel = (pred(xb)[0, :, 0] > 0).nonzero().flatten()
            assert 0 < len(sel) < S
            cos, sin = model.cos[sel][None], model.sin[sel][None]
            xs = xb[:, sel]
            f = model.layers[1](xs, cos, sin) - xs
            out = xb.clone()
            out[:, sel] = xs + torch.sigmoid(xs @ router.T) * f
            rows.append(out)
        want = model.head(model.norm(torch.cat(rows)))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_predictor_selecting_everything_at_capacity_one_reproduces_the_model():
    model, mod, ids = make(capacity=1.0, weighting="none", every=1)
    with torch.no_grad():
        for i in range(2):
            mod.get_submodule(f"layers.{i}.mod_predictor")[2].bias.fill_(100.0)
    modfx.set_routing(mod, "predictor")
    torch.testing.assert_close(mod(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_predictor_routing_compiles_in_one_graph(built):
    _, mod, ids = built
    modfx.set_routing(mod, "predictor")
    try:
        compiled = torch.compile(mod, fullgraph=True)
        torch.testing.assert_close(compiled(ids).logits, mod(ids).logits, rtol=1e-5, atol=1e-5)
    finally:
        modfx.set_routing(mod, "topk")


def test_unknown_routing_mode_is_refused(built):
    with pytest.raises(modfx.ModfxError, match="unknown routing mode"):
        modfx.set_routing(built[1], "random")


def test_predictor_mode_needs_the_predictor():
    _, mod, _ = make(predictor=False)
    with pytest.raises(modfx.ModfxError, match="predictor=False"):
        modfx.set_routing(mod, "predictor")
