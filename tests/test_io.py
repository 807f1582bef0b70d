"""Workflows: transform(model) alone, routing parameter groups, save/load and pickling, .pt2 and AOTInductor artifacts."""

import copy
import dataclasses
import os

import pytest
import torch

import modfx
from modfx.models import gpt, llama

V = 64


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    model = llama.Llama(llama.LlamaConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=V)).eval()
    ids = torch.randint(0, V, (2, 16))
    return model, modfx.transform(model, (ids,)).eval(), ids


def test_transform_without_example_inputs_infers_token_ids_from_the_embedding():
    model = gpt.GPT(gpt.GPTConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=V))
    p = modfx.plan(modfx.transform(model))
    assert p.example_inputs == "(2, 16) int64"
    assert len(p.routed) == 1


def test_transform_without_example_inputs_infers_features_for_a_linear_first_layer():
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    assert modfx.plan(modfx.transform(model)).example_inputs == "(2, 16, 8) float32"


def test_nothing_to_infer_says_how_to_pass_inputs():
    class NoLayers(torch.nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(modfx.ModfxError, match="pass them"):
        modfx.transform(NoLayers())


def test_routing_parameters_single_out_routers_and_predictors(built):
    _, mod, _ = built
    names = {n for n, p in mod.named_parameters() if any(p is q for q in modfx.routing_parameters(mod))}
    assert names == {"layers.1.mod_router.weight", *(f"layers.1.mod_predictor.{i}.{w}" for i in (0, 2) for w in ("weight", "bias"))}


def test_trainable_routing_parameters_freeze_the_rest():
    model = llama.Llama(llama.LlamaConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=V))
    mod = modfx.transform(model, (torch.randint(0, V, (2, 16)),), weighting="ste")
    params = modfx.trainable_routing_parameters(mod)
    assert {id(p) for p in mod.parameters() if p.requires_grad} == {id(p) for p in params}


def test_save_and_load_round_trip(built, tmp_path):
    _, mod, ids = built
    modfx.save(mod, tmp_path / "mod.pt")
    again = modfx.load(tmp_path / "mod.pt")
    assert torch.equal(again(ids).logits, mod(ids).logits)
    assert modfx.plan(again).routed == modfx.plan(mod).routed


def test_a_save_made_with_the_old_default_predictor_width_loads(built, tmp_path):
    model, _, ids = built
    old = modfx.transform(model, (ids,), predictor_hidden=16).eval()  # the default before commit 843a86c
    blob = modfx.io.state(old)
    blob["config"] = dataclasses.replace(blob["config"], predictor_hidden=None)  # as such a save stored it
    again = modfx.io.rebuild(blob)
    assert torch.equal(again(ids).logits, old(ids).logits)
    assert again.get_submodule("layers.1.mod_predictor")[0].weight.shape[0] == 16


def test_pt2_export_runs_without_modfx_and_matches_eager(built, tmp_path):
    _, mod, ids = built
    modfx.export(mod, tmp_path / "mod.pt2")
    loaded = torch.export.load(tmp_path / "mod.pt2").module()
    for x in (ids, torch.randint(0, V, (3, 21))):
        (logits,) = loaded(x)
        torch.testing.assert_close(logits, mod(x).logits, rtol=0, atol=1e-6)


@pytest.mark.skipif(not os.environ.get("MODFX_SLOW_TESTS"), reason="AOTInductor compiles C++ for ~1 min; MODFX_SLOW_TESTS=1")
def test_aoti_package_matches_eager(built, tmp_path):
    _, mod, ids = built
    path = modfx.export_aoti(mod, tmp_path / "mod_aoti.pt2")
    (logits,) = torch._inductor.aoti_load_package(path)(ids)
    torch.testing.assert_close(logits, mod(ids).logits, rtol=1e-5, atol=1e-5)


def test_pickled_module_is_rebuilt_with_its_weights_and_routing_mode(built, tmp_path):
    _, mod, ids = built
    modfx.set_routing(mod, "predictor")
    try:
        torch.save(mod, tmp_path / "whole.pt")
        again = torch.load(tmp_path / "whole.pt", weights_only=False)
        assert again._routing == "predictor" and not again.training
        assert torch.equal(again(ids).logits, mod(ids).logits)
    finally:
        modfx.set_routing(mod, "topk")


def test_deep_copy_is_equal_and_independent(built):
    _, mod, ids = built
    twin = copy.deepcopy(mod)
    assert torch.equal(twin(ids).logits, mod(ids).logits)
    with torch.no_grad():
        twin.get_parameter("layers.1.mod_router.weight").add_(1.0)
    assert not torch.equal(twin(ids).logits, mod(ids).logits)
    assert twin.get_parameter("layers.1.mod_router.weight") is not mod.get_parameter("layers.1.mod_router.weight")


def test_shallow_copy_shares_the_parameters(built):
    _, mod, ids = built
    twin = copy.copy(mod)
    assert twin.get_parameter("layers.1.mod_router.weight") is mod.get_parameter("layers.1.mod_router.weight")
    assert torch.equal(twin(ids).logits, mod(ids).logits)


def test_pt2_export_of_a_module_transformed_with_keyword_inputs(built, tmp_path):
    model, _, ids = built
    mod = modfx.transform(model, example_kwargs={"idx": ids}).eval()
    modfx.export(mod, tmp_path / "kw.pt2")
    (logits,) = torch.export.load(tmp_path / "kw.pt2").module()(ids)  # keyword inputs come positionally
    torch.testing.assert_close(logits, mod(idx=ids).logits, rtol=1e-5, atol=1e-5)


def test_a_config_pickled_before_a_field_existed_loads_with_its_default():
    import pickle

    state = dict(modfx.MoDConfig(capacity=0.25).__dict__)
    del state["padding_mask"]  # as saved by a modfx without that field
    old = object.__new__(modfx.MoDConfig)
    old.__dict__.update(state)
    again = pickle.loads(pickle.dumps(old))
    assert again.padding_mask is None and again.capacity == 0.25
