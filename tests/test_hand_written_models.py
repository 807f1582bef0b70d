"""Models written the way people write them by hand.

Layers written inline in the caller's loop (the vit-pytorch / x-transformers layout):

    self.layers = nn.ModuleList([nn.ModuleList([PreNorm(attn), PreNorm(ff)]) for _ in range(n)])
    for attn, ff in self.layers:
        x = attn(x) + x
        x = ff(x) + x

`layers.0` is never called, so its residual adds carry only the caller's module path; discovery attributes
them to the layer (passes/discover.py, `adopt_loop_bodies`).

minGPT's idioms: the MLP called through a lambda kept as a module attribute, and a float `tril(ones)`
causal mask buffer sliced `[:T, :T]` inside the attention."""

import math

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch import nn

import modfx
from modfx.flops import flops, torch_count

D, H, V, L = 64, 4, 128, 4


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, H, D // H).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, D))


class PreNorm(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(D), fn

    def forward(self, x):
        return self.fn(self.norm(x))


def feed_forward():
    return nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))


class LoopOfPairs(nn.Module):
    """`for attn, ff in self.layers`: pre-norm, residual adds in the loop."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.layers = nn.ModuleList([nn.ModuleList([PreNorm(Attention()), PreNorm(feed_forward())]) for _ in range(L)])
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, V)

    def forward(self, ids):
        x = self.emb(ids)
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.head(self.norm(x))


class ParallelDicts(nn.Module):
    """`self.layers[i]["attn"]`: one norm feeding attention and MLP in parallel, GPT-J style."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.layers = nn.ModuleList(
            [nn.ModuleDict(dict(norm=nn.LayerNorm(D), attn=Attention(), mlp=feed_forward())) for _ in range(L)])
        self.head = nn.Linear(D, V)

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            h = layer["norm"](x)
            x = x + layer["attn"](h) + layer["mlp"](h)
        return self.head(x)


class PostNormDicts(nn.Module):
    """Post-norm with `nn.MultiheadAttention` and a float causal mask, written inline."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.layers = nn.ModuleList([nn.ModuleDict(dict(
            attn=nn.MultiheadAttention(D, H, batch_first=True), norm1=nn.LayerNorm(D), ff=feed_forward(),
            norm2=nn.LayerNorm(D))) for _ in range(L)])
        self.head = nn.Linear(D, V)

    def forward(self, ids):
        x, S = self.emb(ids), ids.shape[1]
        mask = torch.triu(torch.full((S, S), float("-inf")), 1)
        for layer in self.layers:
            x = layer["norm1"](x + layer["attn"](x, x, x, attn_mask=mask, need_weights=False)[0])
            x = layer["norm2"](x + layer["ff"](x))
        return self.head(x)


class ParallelLists(nn.Module):
    """Each layer's modules in parallel lists (`self.attn[i]`, `self.ff[i]`): no one path holds a layer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.attn = nn.ModuleList([PreNorm(Attention()) for _ in range(L)])
        self.ff = nn.ModuleList([PreNorm(feed_forward()) for _ in range(L)])
        self.head = nn.Linear(D, V)

    def forward(self, ids):
        x = self.emb(ids)
        for attn, ff in zip(self.attn, self.ff):
            x = attn(x) + x
            x = ff(x) + x
        return self.head(x)


MODELS = {"loop of pairs": LoopOfPairs, "parallel dicts": ParallelDicts, "post-norm dicts": PostNormDicts}


@pytest.fixture(params=list(MODELS))
def model(request):
    torch.manual_seed(0)
    return MODELS[request.param]().eval()


@pytest.fixture
def ids():
    return torch.randint(0, V, (2, 64), generator=torch.Generator().manual_seed(1))


def eager_mod(x, w, capacity, block, *side):
    """The hand-written Mixture-of-Depths of one block: the top-k tokens of each sequence by r = x @ w.T
    (stable, descending, then kept in order), x + r * (block(x_k, *side_k) - x_k) scattered back."""
    r = x @ w.T  # [B, S, 1]
    k = math.ceil(capacity * x.shape[1])
    idx = torch.sort(r[..., 0], dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values
    at = idx[..., None].expand(-1, -1, x.shape[-1])
    xg = x.gather(1, at)  # [B, k, D]
    return x.scatter(1, at, xg + r.gather(1, idx[..., None]) * (block(xg, *(t.gather(1, at) for t in side)) - xg))


def inline_pair(attn, ff):
    """The layer LoopOfPairs writes inline, as a function of x."""
    def layer(x):
        h = attn(x) + x
        return ff(h) + h
    return layer


def router(mod, name):
    return mod.get_submodule(f"{name}.mod_router").weight


def test_layers_written_inline_are_the_blocks(model, ids):
    p = modfx.plan(modfx.transform(model, (ids,)))
    assert [b.name for b in p.blocks] == [f"layers.{i}" for i in range(L)]
    assert [b.name for b in p.routed] == ["layers.1", "layers.3"]


def test_inline_layers_at_capacity_one_without_weighting_reproduce_the_model(model, ids):
    mod = modfx.transform(model, (ids,), capacity=1.0, weighting="none", predictor=False)
    torch.testing.assert_close(mod(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_the_users_model_is_unchanged(model, ids):
    before = {n: p.clone() for n, p in model.state_dict().items()}
    want = model(ids)
    modfx.transform(model, (ids,))
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    torch.testing.assert_close(model(ids), want, rtol=0, atol=0)


def test_routed_inline_layers_equal_a_hand_written_eager_reference(ids):
    torch.manual_seed(0)
    model = LoopOfPairs().eval()
    mod = modfx.transform(model, (ids,), capacity=0.125)
    with torch.no_grad():
        x = model.emb(ids)
        for i, (attn, ff) in enumerate(model.layers):
            layer = inline_pair(attn, ff)
            x = eager_mod(x, router(mod, f"layers.{i}"), 0.125, layer) if i % 2 else layer(x)
        torch.testing.assert_close(mod(ids), model.head(model.norm(x)), rtol=1e-5, atol=1e-5)


def test_routed_inline_layers_compile_as_one_graph_and_train(ids):
    torch.manual_seed(0)
    mod = modfx.transform(ParallelDicts(), (ids,)).train()
    torch._dynamo.reset()
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(ids), mod(ids), rtol=1e-5, atol=1e-5)
    compiled(ids).float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in mod.named_parameters() if "mod_router" in n}
    assert sorted(grads) == ["layers.1.mod_router.weight", "layers.3.mod_router.weight"]
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_flops_of_routed_inline_layers_follow_k_and_agree_with_flop_counter_mode(ids):
    torch.manual_seed(0)
    mod = modfx.transform(LoopOfPairs(), (ids,), capacity=0.125, blocks=(1,))  # the op kinds' rows are its own
    report = flops(mod, (ids,))
    rows = {r.name: r for r in (*report.blocks, *report.kinds, report.overhead)}
    routing = ("router", "sort", "topk", "gather", "scatter", "predictor")
    body = rows["layers.1"].expr - sum(rows[x].expr for x in routing if x in rows)
    B, k = sympy.symbols("B k", integer=True, positive=True)
    assert sympy.expand(body).free_symbols == {B, k}  # the residual adds too run on the k tokens
    data = sum(r.fwd for r in report.kinds if r.name in ("sort", "topk", "gather", "scatter"))
    assert report.total_at - data == sum(torch_count(mod, (ids,)).values())


def test_predictor_routing_of_inline_layers_is_causal(ids):
    torch.manual_seed(0)
    mod = modfx.transform(LoopOfPairs(), (ids,)).eval()
    modfx.set_routing(mod, "predictor")
    later = ids.clone()
    later[:, 40:] = (later[:, 40:] + 1) % V
    with torch.no_grad():
        torch.testing.assert_close(mod(later)[:, :40], mod(ids)[:, :40], rtol=0, atol=0)


def test_layers_kept_in_parallel_lists_are_refused_with_advice(ids):
    with pytest.raises(modfx.ModfxError, match="parallel lists .* one element of a ModuleList"):
        modfx.transform(ParallelLists(), (ids,))


class LambdaMLPBlock(nn.Module):
    """minGPT's idiom: the MLP called through a lambda over its ModuleDict, kept as a module attribute."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(D, 2 * D), c_proj=nn.Linear(2 * D, D), act=nn.GELU()))
        m = self.mlp
        self.mlpf = lambda x: m.c_proj(m.act(m.c_fc(x)))

    def forward(self, x):
        return x + self.mlpf(self.ln(x))


class LambdaMLPs(nn.Module):
    def __init__(self, block=LambdaMLPBlock):
        super().__init__()
        self.emb, self.h = nn.Embedding(V, D), nn.ModuleList([block() for _ in range(L)])

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.h:
            x = b(x)
        return x


def test_submodules_called_through_a_lambda_attribute_run_the_copys_weights(ids):
    torch.manual_seed(0)
    model = LambdaMLPs()
    mod = modfx.transform(model, (ids,), capacity=1.0, weighting="none", predictor=False)
    mod(ids).pow(2).mean().backward()
    assert mod.get_submodule("h.0.mlp.c_fc").weight.grad is not None and model.h[0].mlp.c_fc.weight.grad is None
    with torch.no_grad():
        before = mod(ids)
        model.h[0].mlp.c_fc.weight.zero_()  # the user's model, after the transform
        torch.testing.assert_close(mod(ids), before, rtol=0, atol=0)


class ListedLambdaBlock(LambdaMLPBlock):
    def __init__(self):
        super().__init__()
        m = self.mlp
        self.mlpf = [lambda x: m.c_proj(m.act(m.c_fc(x)))]  # out of reach: inside a list

    def forward(self, x):
        return x + self.mlpf[0](self.ln(x))


def test_weights_reached_where_the_copy_cannot_follow_are_refused(ids):
    with pytest.raises(modfx.ModfxError, match=r"reaches h\.0\.mlp\.c_fc\.weight.*a constant.*share it with your model"):
        modfx.transform(LambdaMLPs(ListedLambdaBlock), (ids,))


class MinGPTAttention(nn.Module):
    """minGPT / nanoGPT's non-flash path: a float tril(ones) buffer sliced by the length, masked_fill, softmax."""

    def __init__(self, max_len=128):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        return self.c_proj((F.softmax(att, dim=-1) @ v).transpose(1, 2).contiguous().view(B, T, C))


class MinGPTBlock(LambdaMLPBlock):
    def __init__(self):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(D), MinGPTAttention()

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlpf(self.ln(x))


def test_a_float_causal_mask_sliced_by_the_length_routes_like_the_model_on_the_chosen_tokens(ids):
    torch.manual_seed(0)
    model = LambdaMLPs(MinGPTBlock).eval()
    mod = modfx.transform(model, (ids,), capacity=0.25)
    with torch.no_grad():
        x = model.emb(ids)
        for i, block in enumerate(model.h):  # the chosen tokens are causal among themselves, in order
            x = eager_mod(x, router(mod, f"h.{i}"), 0.25, block) if i % 2 else block(x)
        torch.testing.assert_close(mod(ids), x, rtol=1e-5, atol=1e-5)


DISTANCE = torch.arange(128)[None, :] - torch.arange(128)[:, None]  # [N, N]: j - i
TABLES = {  # entries that depend on the positions, not only on causality
    "float distances (ALiBi-like)": DISTANCE.float(),
    "int distances (relative-position ids)": DISTANCE,
    "bool sliding window": (DISTANCE <= 0) & (DISTANCE > -8),
}


@pytest.mark.parametrize("table", list(TABLES))
def test_a_position_table_sliced_by_the_length_is_still_refused(ids, table):
    torch.manual_seed(0)
    model = LambdaMLPs(MinGPTBlock).eval()
    for block in model.h:
        block.attn.bias = TABLES[table].view(1, 1, 128, 128).clone()
    with pytest.raises(modfx.ModfxError, match="slices a position table"):
        modfx.transform(model, (ids,))


class MixerBlock(nn.Module):
    def __init__(self, tokens):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.token_mix, self.channel_mix = nn.Linear(tokens, tokens), feed_forward()

    def forward(self, x):
        x = x + self.token_mix(self.norm1(x).transpose(1, 2)).transpose(1, 2)  # mixes the S tokens of a sequence
        return x + self.channel_mix(self.norm2(x))


def test_a_token_mixing_mlp_is_refused_with_the_reason(ids):
    model = nn.Sequential(nn.Embedding(V, D), *[MixerBlock(ids.shape[1]) for _ in range(L)])
    with pytest.raises(modfx.ModfxError, match=r"block \d: .*a token-mixing layer of S inputs as in MLP-Mixer"):
        modfx.transform(model, (ids,))


class SkipFromTheStart(nn.Module):
    """Each block adds the embeddings back: `x + ff(x) + x0`, a residual term from outside the block."""

    def __init__(self):
        super().__init__()
        self.ff = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D))

    def forward(self, x, x0):
        return x + self.ff(x) + x0


class WithSkipsFromTheStart(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.layers = nn.Embedding(V, D), nn.ModuleList([SkipFromTheStart() for _ in range(L)])

    def forward(self, ids):
        x0 = x = self.emb(ids)
        for layer in self.layers:
            x = layer(x, x0)
        return x


def test_a_residual_term_from_outside_the_block_is_gathered_with_the_tokens(ids):
    torch.manual_seed(0)
    model = WithSkipsFromTheStart().eval()
    mod = modfx.transform(model, (ids,), capacity=0.25)
    with torch.no_grad():
        x0 = x = model.emb(ids)
        for i, layer in enumerate(model.layers):
            x = eager_mod(x, router(mod, f"layers.{i}"), 0.25, layer, x0) if i % 2 else layer(x, x0)
        torch.testing.assert_close(mod(ids), x, rtol=1e-5, atol=1e-5)


class LoopWithGlue(LoopOfPairs):
    """Caller adds that belong to no layer: `x + shift` at the start of every iteration, a bias after the loop."""

    def __init__(self):
        super().__init__()
        self.shift, self.final_bias = nn.Parameter(torch.randn(D)), nn.Parameter(torch.randn(D))

    def forward(self, ids):
        x = self.emb(ids)
        for attn, ff in self.layers:
            x = x + self.shift
            x = attn(x) + x
            x = ff(x) + x
        return self.head(self.norm(x + self.final_bias))


def test_caller_adds_of_no_layer_run_on_every_token(ids):
    torch.manual_seed(0)
    model = LoopWithGlue().eval()
    mod = modfx.transform(model, (ids,), capacity=0.25)
    with torch.no_grad():
        x = model.emb(ids)
        for i, (attn, ff) in enumerate(model.layers):
            layer = inline_pair(attn, ff)
            x = x + model.shift  # on every token
            x = eager_mod(x, router(mod, f"layers.{i}"), 0.25, layer) if i % 2 else layer(x)
        torch.testing.assert_close(mod(ids), model.head(model.norm(x + model.final_bias)), rtol=1e-5, atol=1e-5)


class SharedDropoutPairs(LoopOfPairs):
    """One dropout module of the caller's, shared by every iteration and used again after the loop."""

    def __init__(self, p=0.1):
        super().__init__()
        self.drop = nn.Dropout(p)

    def forward(self, ids):
        x = self.emb(ids)
        for attn, ff in self.layers:
            x = x + self.drop(attn(x))
            x = x + self.drop(ff(x))
        return self.head(self.norm(self.drop(x)))


def test_a_shared_module_called_after_the_loop_runs_on_every_token(ids):
    torch.manual_seed(0)
    model = SharedDropoutPairs(p=1.0).train()  # every dropout zeroes: x stays the embedding, the head sees zeros
    mod = modfx.transform(model, (ids,), capacity=0.25).train()  # the last layer is routed
    torch.testing.assert_close(mod(ids), model(ids), rtol=0, atol=0)


class OneLayerApplied(LoopOfPairs):
    def forward(self, ids):
        x = self.emb(ids)
        attn, ff = self.layers[0]
        for _ in range(L):  # one layer's weights shared across depth, written inline
            x = attn(x) + x
            x = ff(x) + x
        return self.head(self.norm(x))


def test_one_inline_layer_applied_repeatedly_is_refused(ids):
    with pytest.raises(modfx.ModfxError, match=r"layers\.0\.\d runs 4 times"):
        modfx.transform(OneLayerApplied(), (ids,))


class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


class ResidualWrappedPairs(LoopOfPairs):
    """vit-pytorch's early layout: `for attn, ff in self.layers: x = attn(x); x = ff(x)`, adds inside Residual."""

    def __init__(self):
        super().__init__()
        for pair in self.layers:
            pair[0], pair[1] = Residual(pair[0]), Residual(pair[1])

    def forward(self, ids):
        x = self.emb(ids)
        for attn, ff in self.layers:
            x = ff(attn(x))
        return self.head(self.norm(x))


class SharedNormPairs(LoopOfPairs):
    """One norm used twice in each layer: `for norm, attn, ff in self.layers`."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleList([nn.LayerNorm(D), Attention(), feed_forward()]) for _ in range(L)])

    def forward(self, ids):
        x = self.emb(ids)
        for norm, attn, ff in self.layers:
            x = attn(norm(x)) + x
            x = ff(norm(x)) + x
        return self.head(self.norm(x))


@pytest.mark.parametrize("cls", [ResidualWrappedPairs, SharedNormPairs, SharedDropoutPairs])
def test_every_inline_layer_is_a_block_whatever_its_sublayers_and_its_caller_share(cls, ids):
    torch.manual_seed(0)
    model = cls().eval()
    assert [b.name for b in modfx.plan(modfx.transform(model, (ids,))).blocks] == [f"layers.{i}" for i in range(L)]
    one = modfx.transform(model, (ids,), capacity=1.0, weighting="none", predictor=False)
    torch.testing.assert_close(one(ids), model(ids), rtol=1e-5, atol=1e-5)


class ParameterClosureBlock(LambdaMLPBlock):
    def __init__(self):
        super().__init__()
        w, b = self.mlp.c_fc.weight, self.mlp.c_fc.bias
        self.mlpf = lambda x: self.mlp.c_proj(torch.relu(x @ w.T + b))  # parameters, not modules, in the closure


def test_parameters_read_from_a_closure_are_refused_not_frozen(ids):
    with pytest.raises(modfx.ModfxError, match=r"reaches h\.0\.mlp\.c_fc\.weight.* other than as a module's attribute"):
        modfx.transform(LambdaMLPs(ParameterClosureBlock), (ids,))


def test_a_learnable_table_that_starts_causal_is_still_a_position_table(ids):
    torch.manual_seed(0)
    model = LambdaMLPs(MinGPTBlock).eval()
    for block in model.h:  # trained, it stops being causal
        block.attn.bias = nn.Parameter(block.attn.bias.clone())
    with pytest.raises(modfx.ModfxError, match="slices a position table"):
        modfx.transform(model, (ids,))


class PositionAddedPostNormLayer(nn.Module):
    """DETR's post-norm encoder layer: a positional input is added to x for the queries and keys, so two
    [B, S, D] inputs are added inside the layer; only x is added to something computed from it."""

    def __init__(self):
        super().__init__()
        self.attn, self.norm1 = nn.MultiheadAttention(D, H, batch_first=True), nn.LayerNorm(D)
        self.ff, self.norm2 = nn.Sequential(nn.Linear(D, 2 * D), nn.ReLU(), nn.Linear(2 * D, D)), nn.LayerNorm(D)

    def forward(self, x, pos):
        q = k = x + pos
        x = self.norm1(x + self.attn(q, k, x, need_weights=False)[0])
        return self.norm2(x + self.ff(x))


class PositionAddedEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(PositionAddedPostNormLayer() for _ in range(L))

    def forward(self, x, pos):
        for layer in self.layers:
            x = layer(x, pos)
        return x


def test_a_post_norm_layer_that_adds_positions_to_x_passes_x_along_for_skipped_tokens():
    model = PositionAddedEncoder().eval()
    x, pos = torch.randn(2, 16, D), torch.randn(2, 16, D)
    mod = modfx.transform(model, (x, pos), capacity=0.25, blocks=(L - 1,))
    x, pos = torch.randn(3, 20, D), torch.randn(3, 20, D)
    with torch.no_grad():
        h = x
        for layer in model.layers[:-1]:
            h = layer(h, pos)
        unchanged = (mod(x, pos) == h).all(-1).sum(1)
    assert unchanged.tolist() == [20 - 5] * 3  # k = ceil(0.25 * 20) tokens ran the last layer
