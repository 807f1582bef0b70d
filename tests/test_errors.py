"""Bad input ends in a ModfxError that says what was wrong and what to do; the user's model is untouched."""

import copy

import pytest
import torch
from torch import nn

import modfx
from modfx.models import gpt, llama

V = 64


def small():
    torch.manual_seed(0)
    return gpt.GPT(gpt.GPTConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=V, max_seq_len=64))


def ids(b=2, s=16):
    return torch.randint(0, V, (b, s))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"capacity": 0.0}, "capacity must be in"),
        ({"capacity": 1.5}, "capacity must be in"),
        ({"every": 0}, "every must be"),
        ({"blocks": ()}, "blocks is empty"),
        ({"blocks": (5,)}, "out of range"),
        ({"weighting": "softmax"}, "unknown weighting"),
        ({"router_aux_weight": -1.0}, "router_aux_weight must be >= 0"),
        ({"padding_mask": 3}, "padding_mask must be the name of a model input"),
        ({"token_input": 3}, "token_input must be the name of a model input"),
        ({"token_input": ("idx", "idx")}, "token_input must name distinct model inputs"),
        ({"token_input": ()}, "token_input must name distinct model inputs"),
        ({"capacty": 0.5}, "unknown MoDConfig field"),
    ],
)
def test_bad_config_is_refused_and_model_unchanged(overrides, message):
    model = small()
    model.register_forward_hook(lambda *a: None)
    state = copy.deepcopy(model.state_dict())
    hooks = dict(model._forward_hooks)
    with pytest.raises(modfx.ModfxError, match=message):
        modfx.transform(model, (ids(),), **overrides)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model.training
    assert dict(model._forward_hooks) == hooks


def test_model_without_residual_blocks_says_what_modfx_looks_for():
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(modfx.ModfxError, match="no transformer blocks found.*residual add"):
        modfx.transform(mlp, (torch.randn(2, 5, 8),))


def test_cnn_has_no_blocks():
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(modfx.ModfxError, match="no transformer blocks found"):
        modfx.transform(cnn, (torch.randn(2, 3, 16, 16),))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 8)

    def forward(self, idx):
        x = self.emb(idx)
        if x.sum() > 0:  # data-dependent Python control flow
            return x
        return -x


def test_uncapturable_model_keeps_the_export_error_as_cause():
    with pytest.raises(modfx.ModfxError, match="torch.export could not capture") as info:
        modfx.transform(DataDependent(), (ids(),))
    assert info.value.__cause__ is not None
    assert "torch.cond" in str(info.value)


@pytest.mark.parametrize("bad", ["ids", 3])
def test_example_inputs_of_the_wrong_type(bad):
    with pytest.raises(modfx.ModfxError, match="example"):
        modfx.transform(small(), bad)


def test_calling_with_another_structure_says_how_to_call():
    mod = modfx.transform(small(), (ids(),))
    with pytest.raises(modfx.ModfxError, match="structure differs"):
        mod(ids(), ids())


def test_inputs_go_by_keyword_or_by_position_as_the_models_signature_allows():
    model = small().eval()
    x = ids()
    by_position, by_keyword = modfx.transform(model, (x,)), modfx.transform(model, example_kwargs={"idx": x})
    by_keyword.load_state_dict(by_position.state_dict())  # the same routers and predictors
    want = by_position(x).logits
    for mod in (by_position, by_keyword):
        torch.testing.assert_close(mod(x).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(mod(idx=x).logits, want, rtol=0, atol=0)


def test_a_torch_compiled_model_is_transformed_through_its_original_module():
    model = small().eval()
    x = ids()
    got = modfx.transform(torch.compile(model), (x,), capacity=1.0, weighting="none")
    torch.testing.assert_close(got(x).logits, model(x).logits, rtol=0, atol=1e-5)


def test_transforming_a_transformed_module_says_to_transform_the_original():
    mod = modfx.transform(small(), (ids(),))
    with pytest.raises(modfx.ModfxError, match="already the result of modfx.transform"):
        modfx.transform(mod, (ids(),))


def test_other_batch_sizes_and_short_sequences_work():
    model = small().eval()
    mod = modfx.transform(model, (ids(),), capacity=1.0, weighting="none")
    for b, s in ((1, 1), (3, 5), (5, 40)):
        x = ids(b, s)
        torch.testing.assert_close(mod(x).logits, model(x).logits, rtol=0, atol=1e-5)


def test_batch_one_example_still_gives_a_module_for_any_batch():
    model = small().eval()
    mod = modfx.transform(model, (ids(1, 16),), capacity=1.0, weighting="none")
    x = ids(4, 20)
    torch.testing.assert_close(mod(x).logits, model(x).logits, rtol=0, atol=1e-5)


def test_batch_one_example_with_positions_per_token_still_gives_a_module_for_any_batch():
    model = small().eval()
    mod = modfx.transform(model, (ids(1, 16), torch.arange(16)), capacity=1.0, weighting="none")
    x = ids(4, 20)
    torch.testing.assert_close(mod(x, torch.arange(20)).logits, model(x).logits, rtol=0, atol=1e-5)


def test_a_short_example_with_positions_per_token_is_lengthened_with_them():
    from reference import mod_forward, routers_of

    model = small().eval()
    mod = modfx.transform(model, (ids(2, 8), torch.arange(8)), capacity=0.125, weighting="sigmoid")  # k(8) = 1
    for s in (8, 24):
        x = ids(3, s)
        want = mod_forward(model, x, routers_of(mod, model), 0.125, "sigmoid")
        torch.testing.assert_close(mod(x, torch.arange(s)).logits, want, rtol=1e-5, atol=1e-5)


class TakesAnything(nn.Module):
    """A wrapper whose forward takes its inputs through *args and **kwargs (as Hugging Face models take
    `output_hidden_states` and friends)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args).logits * kwargs["scale"]


def test_inputs_taken_through_var_args_and_var_kwargs_are_captured_with_dynamic_batch_and_tokens():
    model = TakesAnything(small()).eval()
    mod = modfx.transform(model, (ids(),), example_kwargs={"scale": torch.tensor(2.0)}, capacity=1.0, weighting="none")
    x, scale = ids(3, 20), torch.tensor(3.0)
    torch.testing.assert_close(mod(x, scale=scale), model(x, scale=scale), rtol=0, atol=1e-5)


def test_an_example_that_is_a_view_gives_a_module_for_contiguous_inputs():
    model = small().eval()
    data = ids(2, 17)
    mod = modfx.transform(model, (data[:, :-1],), capacity=1.0, weighting="none")  # the usual x = data[:, :-1]
    for x in (data[:, :-1], ids(3, 20)):
        torch.testing.assert_close(mod(x).logits, model(x).logits, rtol=0, atol=1e-5)


class NormedBlock(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.bn, self.f = nn.BatchNorm1d(d), nn.Linear(d, d)

    def forward(self, x):  # [B, S, D]
        return x + self.f(self.bn(x.transpose(1, 2)).transpose(1, 2))


class BatchNormed(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.emb, self.layers, self.head = nn.Embedding(V, d), nn.ModuleList(NormedBlock() for _ in range(2)), nn.Linear(d, V)

    def forward(self, x):
        x = self.emb(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_batch_norm_captured_in_eval_normalises_by_the_batch_after_train():
    model = BatchNormed().eval()
    mod = modfx.transform(model, (ids(),), capacity=1.0, weighting="none", every=1).train()
    reference = copy.deepcopy(model).train()
    x = ids()
    torch.testing.assert_close(mod(x), reference(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mod.get_buffer("layers.0.bn.running_mean"), reference.layers[0].bn.running_mean)


def test_a_hugging_face_model_that_returns_its_cache_is_refused_with_use_cache_false_as_the_fix():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)  # use_cache=True by default
    with pytest.raises(modfx.ModfxError, match=r"returns its KV cache .* use_cache=False"):
        modfx.transform(transformers.LlamaForCausalLM(config), (ids(),))


def test_static_input_axis_of_another_size_says_to_transform_again():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Linear(8, 16), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    mod = modfx.transform(model, (torch.randn(2, 16, 8),))
    assert mod(torch.randn(3, 20, 8)).shape == (3, 20, 16)
    with pytest.raises(modfx.ModfxError, match=r"args\[0\] has shape \[2, 16, 9\].*\[\*, \*, 8\].*Transform again"):
        mod(torch.randn(2, 16, 9))


class BranchOnLength(nn.Module):
    """A branch on the input length (a fast path for multiples of 8): export keeps the path it took."""

    def __init__(self):
        super().__init__()
        self.model = small()

    def forward(self, idx):
        out = self.model(idx).logits
        return out * 2 if idx.shape[1] % 8 == 0 else out


def test_inputs_that_would_take_another_branch_on_their_shape_are_refused_not_run_on_the_captured_one():
    model = BranchOnLength().eval()
    mod = modfx.transform(model, (ids(2, 16),), capacity=1.0, weighting="none")
    x = ids(3, 24)
    torch.testing.assert_close(mod(x), model(x), rtol=0, atol=1e-5)
    with pytest.raises(modfx.ModfxError, match=r"break a condition .* \(idx\.size\(\)\[1\] % 8 == 0\)"):
        mod(ids(2, 20))


def test_a_length_beyond_the_models_own_bound_is_refused():
    model = llama.Llama(llama.LlamaConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=V, max_seq_len=64))
    mod = modfx.transform(model.eval(), (ids(),))  # RoPE tables of 64 rows, sliced by the length
    with pytest.raises(modfx.ModfxError, match=r"idx\.size\(\)\[1\] <= 64"):
        mod(ids(2, 65))


def test_compiled_calls_that_would_take_another_branch_fail_rather_than_run_the_captured_one():
    mod = modfx.transform(BranchOnLength().eval(), (ids(2, 16),))
    torch._dynamo.reset()
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    x = ids(2, 24)
    torch.testing.assert_close(compiled(x), mod(x))
    with pytest.raises(Exception, match=r"Guard failed: idx\.size\(\)\[1\] % 8 == 0"):
        compiled(ids(2, 20))


class ConvBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(16, 16, 1)

    def forward(self, x):  # [B, D, S]
        return x + self.conv(x)


class ChannelsFirst(nn.Module):
    """SqueezeBERT's layout: the hidden state is [B, D, S], its blocks 1x1 convolutions."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 16)
        self.layers = nn.ModuleList([ConvBlock() for _ in range(2)])

    def forward(self, idx):
        x = self.emb(idx).transpose(1, 2)  # [B, D, S]
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_channels_first_hidden_state_is_refused_with_its_layout():
    with pytest.raises(modfx.ModfxError, match=r"layers\.0: its hidden state .* tokens on its last axis .*\[B, D, S\]"):
        modfx.transform(ChannelsFirst(), (ids(),))


def test_to_bfloat16_recaptures_and_keeps_precision():
    model = small().eval()
    mod = modfx.transform(model, (ids(),), capacity=0.5)
    x = ids()
    ref = mod(x).logits
    mod16 = mod.to(torch.bfloat16)
    out = mod16(x).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def test_no_grad_and_inference_mode_work():
    mod = modfx.transform(small(), (ids(),))
    x = ids()
    with torch.no_grad():
        a = mod(x).logits
    with torch.inference_mode():
        b = mod(x).logits
    assert torch.equal(a, b)


def test_state_dict_round_trips():
    model = small()
    mod = modfx.transform(model, (ids(),)).eval()
    other = modfx.transform(small(), (ids(),)).eval()
    other.load_state_dict(mod.state_dict())
    x = ids()
    assert torch.equal(other(x).logits, mod(x).logits)


def test_dense_checkpoint_loads_with_only_routing_keys_missing():
    model = small()
    mod = modfx.transform(model, (ids(),))
    missing, unexpected = mod.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(".mod_router." in k or ".mod_predictor." in k for k in missing)


def test_train_and_eval_switch_dropout():
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=V, dropout=0.5))
    mod = modfx.transform(model, (ids(),))
    x = ids()
    mod.eval()
    assert torch.equal(mod(x).logits, mod(x).logits)
    mod.train()
    assert not torch.equal(mod(x).logits, mod(x).logits)


class PositionsInside(nn.Module):
    """A block that embeds arange(S) itself: on k routed tokens these positions would be 0..k-1."""

    def __init__(self):
        super().__init__()
        self.pos, self.proj = nn.Embedding(64, 32), nn.Linear(32, 32)

    def forward(self, x):
        return x + self.proj(x + self.pos(torch.arange(x.shape[1])))


class Stack(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_positions_computed_inside_a_block_are_refused():
    with pytest.raises(modfx.ModfxError, match=r"block layers\.0: node \w+ computes positions inside the block"):
        modfx.transform(Stack([PositionsInside(), PositionsInside()]), (torch.randn(2, 16, 32),))


def test_symbolic_sizes_fixed_by_user_code_are_reported_when_another_routing_mode_is_built():
    model = llama.Llama(llama.LlamaConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=V)).eval()
    mod = modfx.transform(model, (ids(2, 16),))
    tokens = next(n for n in mod.modfx_graphs[("topk", False)].nodes if n.op == "placeholder" and n.name == "idx")
    assert tokens.meta["val"].shape[1] == 16  # a bool of a symbolic size: a guard fixes S in the shared environment
    with pytest.raises(modfx.ModfxError, match=r"fixed after the transform \({'idx.shape\[1\]': 16}\).*Transform the model again"):
        modfx.set_routing(mod, "predictor")


def test_hooks_on_the_model_are_reported_as_running_only_at_capture():
    model = small()
    seen = []
    model.layers[0].register_forward_hook(lambda m, args, out: seen.append(out))
    with pytest.warns(UserWarning, match=r"modules with hooks: layers\.0\..*do not run when the transformed module is called"):
        mod = modfx.transform(model, (ids(),), capacity=0.5)
    calls = len(seen)
    mod(ids())
    assert len(seen) == calls  # as the warning says


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32)

    def forward(self, x):
        return x + self.proj(x)


class SharedLayer(nn.Module):
    """One layer applied three times (weights shared across depth, as in ALBERT)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Residual()])

    def forward(self, x):
        for _ in range(3):
            x = self.layers[0](x)
        return x


def test_a_layer_called_repeatedly_is_refused_not_routed_as_one_block():
    with pytest.raises(modfx.ModfxError, match=r"(?s)no transformer blocks found.*layers\.0 runs 3 times \(one module called repeatedly"):
        modfx.transform(SharedLayer(), (torch.randn(2, 16, 32),))


def test_a_configuration_that_routes_no_block_is_refused():
    with pytest.raises(modfx.ModfxError, match=r"routes none of the 1 blocks found \(layers\.0\): every=2 .* use every=1"):
        modfx.transform(Stack([Residual()]), (torch.randn(2, 16, 32),))
    assert len(modfx.plan(modfx.transform(Stack([Residual()]), (torch.randn(2, 16, 32),), every=1)).routed) == 1


class TokensAndImage(nn.Module):
    """Token ids [B, S] and an image [B, 3, H, W] whose channel count happens to equal S."""

    def __init__(self):
        super().__init__()
        self.emb, self.img = nn.Embedding(V, 32), nn.Conv2d(3, 32, 4, 4)
        self.layers = nn.ModuleList([Residual(), Residual()])

    def forward(self, ids, pixels):
        x = self.emb(ids) + self.img(pixels).flatten(2).mean(-1)[:, None]
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_short_example_is_lengthened_along_token_axes_only():
    model = TokensAndImage()
    mod = modfx.transform(model, (ids(2, 3), torch.randn(2, 3, 8, 8)))  # k = 1 at S = 3: lengthened for the capture
    out = mod(ids(2, 3), torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 3, 32)
