"""Real models: Hugging Face Llama, Mistral, Qwen2, Qwen3, Mixtral, Gemma, Phi-3, OLMo 2, StableLM, Falcon,
OPT, GPT-2, GPT-Neo, GPT-NeoX, BERT, RoBERTa, ViT and the T5 encoder, and torch.nn.TransformerEncoder, from
tiny configs with random weights (nothing is downloaded).

For each: the default transform runs and keeps the output type; capacity 1.0 with weighting "none"
reproduces the model; the routed block equals an eager reference (the layer module called on the
gathered tokens of each sequence, its side inputs gathered the same way); torch.compile(fullgraph=True)
matches eager; routers get gradients; `modfx.plan` names the blocks and the gathered side inputs.
Unsupported cases must fail with a ModfxError that names the block and the node.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable

import pytest
import sympy
import torch
from torch import nn
from torch.utils import _pytree as pytree

import modfx
from modfx.flops import torch_count
from modfx.passes.flops import ROUTING, Names
from reference import widest_middle_gap

transformers = pytest.importorskip("transformers")

B, S, V = 2, 12, 128  # S differs from every other size of the tiny configs (head dims 16 / 4 / 8)
TEXT = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64)
ROPE_MASK = [(1,), (1,), (2, 3)]  # cos, sin [1, S, hd] along the tokens; the mask [B, 1, S, S] along both


def ids_of(batch=B, seq=S):
    return {"input_ids": torch.randint(0, V, (batch, seq))}


def padded(batch=B, seq=S):
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, : seq // 3] = 0  # left padding
    mask[-1, -2:] = 0  # right padding
    return {**ids_of(batch, seq), "attention_mask": mask}


def pixels(batch=B, seq=None):
    return {"pixel_values": torch.randn(batch, 3, 16, 16)}  # 16 patches of 4x4 + CLS: S = 17, static


def seq2seq(batch=B, seq=S):
    """Encoder tokens and decoder tokens of other lengths: the decoder's are the routed ones."""
    return {"input_ids": torch.randint(0, V, (batch, seq + 3)), "decoder_input_ids": torch.randint(0, V, (batch, seq))}


def hidden(batch=B, seq=S):
    return {"x": torch.randn(batch, seq, 32)}


def hf(cls_name, config_name, attn="sdpa", **kw):
    def build():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = getattr(transformers, config_name)(**kw, attn_implementation=attn)
            return getattr(transformers, cls_name)(config)
    return build


class Encoder(nn.Module):
    """nn.TransformerEncoder (batch_first); mask: None, "causal" ([S, S] float mask with is_causal=True,
    which attention turns into is_causal) or "mask" (the same mask with is_causal=False: a batch-less
    [S, S] side input)."""

    def __init__(self, norm_first: bool, mask: str | None):
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.mask = mask

    def forward(self, x):
        if self.mask is None:
            return self.enc(x)
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.enc(x, mask=causal, is_causal=self.mask == "causal")


@dataclasses.dataclass
class Case:
    build: Callable[[], nn.Module]
    inputs: Callable[..., dict]
    out: str | None  # the output attribute holding [B, S, ...] (None: the output is the tensor)
    side: list  # token axes of the routed block's gathered side inputs, sorted
    positional: bool = False  # transform(model, (ids,)) instead of example_kwargs=
    compile: bool = True  # with Inductor (else the aot_eager backend: full-graph capture, no codegen)
    blocks: tuple[str, ...] = ()
    # The model's code reads the dtype of a value inside a block (RMSNorm's `.to(input_dtype)` on the bf16 q, k
    # projections of Qwen3 and OLMo2). Under autocast that dtype is bf16 at run time but was float32 at
    # capture, so any captured program (plain torch.export too) runs float32 there: compare with that.
    reads_dtypes: bool = False
    token_input: str | None = None  # MoDConfig.token_input: route the stack over this input's tokens


CASES = {
    "llama": Case(hf("LlamaForCausalLM", "LlamaConfig", **TEXT, num_key_value_heads=2, use_cache=False),
                  ids_of, "logits", ROPE_MASK, positional=True, blocks=("model.layers.0", "model.layers.1")),
    "llama-eager": Case(hf("LlamaForCausalLM", "LlamaConfig", "eager", **TEXT, num_key_value_heads=2, use_cache=False),
                        ids_of, "logits", ROPE_MASK, compile=False),
    "llama-padded": Case(hf("LlamaForCausalLM", "LlamaConfig", **TEXT, num_key_value_heads=2, use_cache=False),
                         padded, "logits", ROPE_MASK, compile=False),
    "mistral": Case(hf("MistralForCausalLM", "MistralConfig", **TEXT, num_key_value_heads=2, use_cache=False),
                    ids_of, "logits", ROPE_MASK, positional=True, compile=False),
    "qwen2": Case(hf("Qwen2ForCausalLM", "Qwen2Config", **TEXT, num_key_value_heads=2, use_cache=False),
                  ids_of, "logits", ROPE_MASK, compile=False),
    "gpt2": Case(hf("GPT2LMHeadModel", "GPT2Config", vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                    use_cache=False, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
                 ids_of, "logits", [(2, 3)], positional=True, compile=False, blocks=("transformer.h.0", "transformer.h.1")),
    "neox": Case(hf("GPTNeoXForCausalLM", "GPTNeoXConfig", **TEXT, use_cache=False),
                 ids_of, "logits", ROPE_MASK, compile=False),
    "bert": Case(hf("BertModel", "BertConfig", **TEXT), padded, "last_hidden_state", [(2, 3)],  # dropout 0.1:
                 blocks=("encoder.layer.0", "encoder.layer.1")),  # train and eval captures differ
    "bert-eager": Case(hf("BertModel", "BertConfig", "eager", **TEXT, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0), ids_of, "last_hidden_state", [(2, 3)], compile=False),
    "vit": Case(hf("ViTModel", "ViTConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=128, image_size=16, patch_size=4, num_channels=3),
                pixels, "last_hidden_state", [(2, 3)], blocks=("layers.0", "layers.1")),
    "mixtral": Case(hf("MixtralForCausalLM", "MixtralConfig", **TEXT, num_key_value_heads=2, use_cache=False,
                       num_local_experts=4, num_experts_per_tok=2), ids_of, "logits", ROPE_MASK, compile=False),
    "t5": Case(hf("T5EncoderModel", "T5Config", vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_heads=4,
                  dropout_rate=0.0), ids_of, "last_hidden_state", [(2, 3), (2, 3)], compile=False,
               blocks=("encoder.block.1", "encoder.block.2")),  # block 0 makes the shared position bias
    "gemma": Case(hf("GemmaForCausalLM", "GemmaConfig", **TEXT, num_key_value_heads=2, head_dim=16, use_cache=False),
                  ids_of, "logits", ROPE_MASK, compile=False),
    "phi3": Case(hf("Phi3ForCausalLM", "Phi3Config", **TEXT, num_key_value_heads=2, pad_token_id=0, use_cache=False),
                 ids_of, "logits", ROPE_MASK, compile=False),
    "qwen3": Case(hf("Qwen3ForCausalLM", "Qwen3Config", **TEXT, num_key_value_heads=2, head_dim=16, use_cache=False),
                  ids_of, "logits", ROPE_MASK, compile=False, reads_dtypes=True),
    "olmo2": Case(hf("Olmo2ForCausalLM", "Olmo2Config", **TEXT, num_key_value_heads=2, pad_token_id=0, use_cache=False),
                  ids_of, "logits", ROPE_MASK, compile=False, reads_dtypes=True),
    "stablelm": Case(hf("StableLmForCausalLM", "StableLmConfig", **TEXT, num_key_value_heads=2, use_cache=False),
                     ids_of, "logits", ROPE_MASK, compile=False),
    "falcon": Case(hf("FalconForCausalLM", "FalconConfig", vocab_size=V, hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=4, use_cache=False), ids_of, "logits", ROPE_MASK, compile=False),
    "opt": Case(hf("OPTForCausalLM", "OPTConfig", vocab_size=V, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                   num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64, use_cache=False,
                   pad_token_id=1, dropout=0.0), padded, "logits", [(2, 3)], compile=False),
    "gpt-neo": Case(hf("GPTNeoForCausalLM", "GPTNeoConfig", "eager", vocab_size=V, hidden_size=64, num_layers=2, num_heads=4,
                       max_position_embeddings=64, attention_types=[[["global", "local"], 1]], use_cache=False,
                       bos_token_id=0, eos_token_id=0), ids_of, "logits", [(2, 3)], compile=False),
    "roberta": Case(hf("RobertaModel", "RobertaConfig", **TEXT, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       pad_token_id=1), padded, "last_hidden_state", [(2, 3)], compile=False),
    "bart-decoder": Case(hf("BartForConditionalGeneration", "BartConfig", vocab_size=V, d_model=64, encoder_layers=2,
                            decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                            decoder_ffn_dim=128, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                            activation_dropout=0.0, use_cache=False), seq2seq, "logits", [(2,), (2, 3)], compile=False,
                         blocks=("model.decoder.layers.0", "model.decoder.layers.1"), token_input="decoder_input_ids"),
    "t5-decoder": Case(hf("T5ForConditionalGeneration", "T5Config", vocab_size=V, d_model=64, d_kv=16, d_ff=128,
                          num_layers=3, num_heads=4, dropout_rate=0.0, use_cache=False), seq2seq, "logits",
                       [(2,), (2,), (2, 3), (2, 3)], compile=False, blocks=("decoder.block.1", "decoder.block.2"),
                       token_input="decoder_input_ids"),  # block 0 makes the position biases the others read
    "tenc-pre": Case(lambda: Encoder(True, None), hidden, None, [], positional=True, compile=False),
    "tenc-pre-causal": Case(lambda: Encoder(True, "causal"), hidden, None, [], positional=True, compile=False),
    "tenc-post-mask": Case(lambda: Encoder(False, "mask"), hidden, None, [(2, 3)], positional=True,
                           blocks=("enc.layers.0", "enc.layers.1")),
}


def run(case: Case, model, inputs: dict):
    """Call like the capture: positionally for the cases transformed with positional inputs."""
    return model(*inputs.values()) if case.positional else model(**inputs)


def transform(case: Case, model, inputs: dict, **overrides):
    if case.token_input:
        overrides = {"token_input": case.token_input, **overrides}
    if case.positional:
        return modfx.transform(model, tuple(inputs.values()), **overrides)
    return modfx.transform(model, example_kwargs=inputs, **overrides)


def plain_export(case: Case, model, inputs: dict) -> nn.Module:
    """torch.export of the model itself, without modfx, minus export's dtype asserts (as modfx's capture)."""
    args, kwargs = (tuple(inputs.values()), {}) if case.positional else ((), inputs)
    gm = torch.export.export(model, args, kwargs).module()
    for n in list(gm.graph.nodes):
        if n.target is torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(n)
    gm.recompile()
    return gm


def main_output(case: Case, out):
    return out if case.out is None else getattr(out, case.out)


@pytest.fixture(scope="module", params=list(CASES))
def built(request):
    case = CASES[request.param]
    torch.manual_seed(0)
    model = case.build().eval()
    inputs = case.inputs()
    mod = transform(case, model, inputs)  # default settings
    return request.param, case, model, inputs, mod


def test_default_transform_keeps_the_output_structure(built):
    _, case, model, inputs, mod = built
    got, want = run(case, mod, inputs), run(case, model, inputs)
    assert type(got) is type(want)
    if case.out is not None:
        assert list(got.keys()) == list(want.keys())
    assert main_output(case, got).shape == main_output(case, want).shape
    assert torch.isfinite(main_output(case, got)).all()


def test_other_batch_and_sequence_lengths(built):
    name, case, model, inputs, mod = built
    other = case.inputs(batch=3, seq=S + 5)
    assert main_output(case, run(case, mod, other)).shape == main_output(case, run(case, model, other)).shape


@pytest.fixture(scope="module")
def every_token(built):
    """The same model transformed to route every block at capacity 1.0 without weighting."""
    _, case, model, inputs, _ = built
    return transform(case, model, inputs, capacity=1.0, weighting="none", every=1, predictor=False)


def test_capacity_one_without_weighting_reproduces_the_model(built, every_token):
    name, case, model, inputs, _ = built
    assert len(modfx.plan(every_token).routed) == len(modfx.plan(every_token).blocks)
    torch.testing.assert_close(main_output(case, run(case, every_token, inputs)),
                               main_output(case, run(case, model, inputs)), rtol=1e-5, atol=2e-5)


def test_capacity_one_without_weighting_reproduces_the_model_under_bf16_autocast(built, every_token):
    name, case, model, inputs, _ = built
    plain = plain_export(case, model, inputs) if case.reads_dtypes else None  # captured without autocast
    # grad mode stays on: under no_grad nn.TransformerEncoder takes its fused fast path, not the captured code
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = main_output(case, run(case, every_token, inputs)), main_output(case, run(case, model, inputs))
        if case.reads_dtypes:
            eager, want = want, main_output(case, run(case, plain, inputs))
            torch.testing.assert_close(want, eager, rtol=0, atol=1e-2)  # the capture differs by bf16 rounding
            assert not torch.equal(want, eager)  # (else the case needs no reads_dtypes)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_routers_get_gradients_under_bf16_autocast(built):
    name, case, model, inputs, mod = built
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = main_output(case, run(case, mod, inputs))
    out.float().pow(2).mean().backward()
    grads = [p.grad for n, p in mod.named_parameters() if n.endswith("mod_router.weight")]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    mod.zero_grad(set_to_none=True)


def test_routed_block_equals_the_eager_reference(built):
    name, case, model, inputs, mod = built
    p = modfx.plan(mod)
    with torch.no_grad():
        want = main_output(case, reference(model, inputs, mod, [b.name for b in p.routed], p.config.capacity))
        got = main_output(case, run(case, mod, inputs))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_fullgraph_compile_matches_eager(built):
    name, case, model, inputs, mod = built
    # Inductor on a representative subset (its code generation costs ~10 s a model on 2 cores). Every
    # MoDModule shares MoDModule.forward's code object, so dynamo's per-code recompile limit (8) would
    # count the earlier cases' compilations: start afresh.
    torch._dynamo.reset()
    compiled = torch.compile(mod, fullgraph=True, backend="inductor" if case.compile else "aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(main_output(case, run(case, compiled, inputs)), main_output(case, run(case, mod, inputs)),
                                   rtol=1e-5, atol=1e-5)


def test_routers_get_gradients(built):
    name, case, model, inputs, mod = built
    main_output(case, run(case, mod, inputs)).float().pow(2).mean().backward()
    routed = [b.name for b in modfx.plan(mod).routed]
    grads = {n: p.grad for n, p in mod.named_parameters() if n.endswith("mod_router.weight")}
    assert sorted(grads) == sorted(f"{b}.mod_router.weight" for b in routed)
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    mod.zero_grad(set_to_none=True)


def test_plan_reports_blocks_and_gathered_side_inputs(built):
    name, case, model, inputs, mod = built
    p = modfx.plan(mod)
    assert len(p.blocks) == 2
    if case.blocks:
        assert tuple(b.name for b in p.blocks) == case.blocks
    assert [b.routed for b in p.blocks] == [False, True]
    side = p.routed[0].side_inputs
    assert sorted(s.seq_axes for s in side) == case.side
    for s in side:
        if s.seq_axes == (1,):  # RoPE tables: [1, S, hd], broadcast over the batch
            assert len(s.shape) == 3 and s.shape[0] == "1" and s.broadcast_batch
        else:  # masks [B or 1, 1, S, S] and position biases [1, H, S, S]
            assert len(s.shape) == 4 and s.shape[1] in ("1", "4")
    assert p.routed[0].name in str(p)


def reference(model, inputs: dict, mod, routed: list[str], capacity: float):
    """The model with each routed layer replaced by eager Mixture-of-Depths: per sequence, the top-k
    tokens by router score (kept in order) run through the layer module itself, with every tensor
    argument sliced to that sequence and gathered along its token axes (sizes equal to S); the
    result x + r * (layer(x) - x) is scattered back (weighting "raw")."""
    saved = {}
    for name in routed:
        layer = model.get_submodule(name)
        w = mod.get_submodule(f"{name}.mod_router").weight
        saved[name] = layer.forward
        layer.forward = _routed_forward(layer.forward, w, capacity)
    try:
        return model(**inputs)
    finally:
        for name, fwd in saved.items():
            del model.get_submodule(name).forward
            assert model.get_submodule(name).forward == fwd


def _routed_forward(forward, w, capacity):
    def routed(*args, **kwargs):
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        nb, ns, d = x.shape
        r = x @ w.T  # [B, S, 1]
        k = max(1, math.ceil(capacity * ns - 1e-9))
        idx = torch.sort(r[..., 0], dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values
        y = x.clone()
        for b in range(nb):
            def pick(t):
                if not isinstance(t, torch.Tensor) or t.dim() == 0:
                    return t
                if t.shape[0] == nb and t.dim() > 1:
                    t = t[b : b + 1]
                for ax in range(t.dim()):
                    if t.shape[ax] == ns:
                        t = t.index_select(ax, idx[b])
                return t

            a, kw = pytree.tree_map(pick, (args, kwargs))
            out = forward(*a, **kw)
            rest = out[1:] if isinstance(out, tuple) else None  # e.g. attention weights, returned as they come
            out = out[0] if isinstance(out, tuple) else out
            xg = x[b, idx[b]]
            y[b, idx[b]] = xg + r[b, idx[b]] * (out[0] - xg)
        return y if rest is None else (y, *rest)

    return routed


# Failures: what modfx cannot support must be refused with a ModfxError naming the block and node.


class MHABlock(nn.Module):
    """nn.MultiheadAttention with need_weights=True folds heads into the batch ([B*H, S, S] scores),
    so a batch-less [S, S] mask broadcasts against B*H, not against the batch."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x, mask):
        h = self.norm(x)
        return x + self.attn(h, h, h, attn_mask=mask, need_weights=True)[0]


class MHAModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([MHABlock(), MHABlock()])

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        for layer in self.layers:
            x = layer(x, mask)
        return x


def chosen_tokens(mod, inputs: dict) -> list:
    """The top-k indices [B, k] of each routed block in one forward of the top-k eval graph."""
    chosen = []

    class Spy(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.meta.get("modfx_role") == "sort":
                chosen.append(out[0])
            return out

    Spy(torch.fx.GraphModule(mod, mod.modfx_graphs[("topk", False)])).run(*(inputs[k] for k in mod._kw_order))
    return chosen


def test_padding_mask_keeps_padded_tokens_out_of_the_top_k():
    model = CASES["bert"].build().eval()
    ids = torch.randint(0, V, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[0, :20] = 0  # 4 real tokens, k = 3
    mask[1, -5:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    padded = [int((mask.gather(1, idx) == 0).sum())
              for pm in (None, "attention_mask")
              for idx in chosen_tokens(modfx.transform(model, example_kwargs=inputs, capacity=0.125, blocks=(1,),
                                                       padding_mask=pm), inputs)]
    assert padded[0] > 0 and padded[1] == 0  # padding competes for k unless the mask is named


def test_padding_mask_keeps_padded_tokens_unselected_in_predictor_routing():
    model = CASES["bert"].build().eval()
    inputs = padded()
    selected = []
    for pm in (None, "attention_mask"):
        mod = modfx.transform(model, example_kwargs=inputs, blocks=(1,), padding_mask=pm).eval()
        with torch.no_grad():
            mod.get_submodule("encoder.layer.1.mod_predictor")[2].bias.fill_(100.0)  # the predictor selects all
        modfx.set_routing(mod, "predictor")
        mod(**inputs)
        selected.append(modfx.routing_stats(mod)["encoder.layer.1"]["selected"])
    assert selected == [1.0, pytest.approx(inputs["attention_mask"].float().mean().item())]


def test_padding_mask_must_name_an_input_over_the_tokens():
    model = CASES["bert"].build().eval()
    inputs = padded()
    with pytest.raises(modfx.ModfxError, match=r"no input of that name; its inputs are input_ids, attention_mask"):
        modfx.transform(model, example_kwargs=inputs, padding_mask="mask")
    from modfx.models import encoder  # its blocks run over a CLS token and the S input tokens

    cls_model = encoder.Encoder(encoder.EncoderConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=V)).eval()
    real = torch.ones(B, S, dtype=torch.bool)
    with pytest.raises(modfx.ModfxError, match=r"padding_mask input padding_mask has shape .* one entry per token"):
        modfx.transform(cls_model, example_kwargs={"idx": torch.randint(0, V, (B, S)), "padding_mask": real},
                        padding_mask="padding_mask")


def test_batchless_mask_folded_into_heads_is_refused():
    with pytest.raises(modfx.ModfxError, match=r"block layers\.\d: side input \w+ of shape \(s\d+, s\d+\).*no leading batch axis.*baddbmm"):
        modfx.transform(MHAModel().eval(), (torch.randn(B, S, 32),))


def test_static_sequence_length_colliding_with_another_size_is_refused():
    # ViT at S = 17 (16 patches + CLS) with head_dim 17: view(q, [B, 17, -1, 17]) is ambiguous.
    model = hf("ViTModel", "ViTConfig", hidden_size=68, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, image_size=16, patch_size=4, num_channels=3)().eval()
    with pytest.raises(modfx.ModfxError, match=r"block layers\.1: node \w+ .*17"):
        modfx.transform(model, example_kwargs=pixels())


def test_position_table_sliced_inside_the_block_is_refused():
    # MPT slices its ALiBi table [H, 1, max_seq_len] to the last S key positions inside each attention:
    # on k routed tokens it would read the biases of positions S-k..S-1, not those of the chosen tokens.
    model = hf("MptForCausalLM", "MptConfig", "eager", vocab_size=V, d_model=64, n_layers=2, n_heads=4,
               max_seq_len=64, use_cache=False)().eval()
    with pytest.raises(modfx.ModfxError, match=r"block transformer\.blocks\.0: node \w+ slices a position table"):
        modfx.transform(model, example_kwargs=ids_of())


def test_group_members_that_are_no_block_are_left_out_with_a_warning():
    model = CASES["t5"].build().eval()
    with pytest.warns(UserWarning, match=r"uses 2 of the 3 modules encoder\.block\.\* as blocks.*encoder\.block\.0 has 2 values"):
        mod = modfx.transform(model, example_kwargs=ids_of())
    assert [b.name for b in modfx.plan(mod).blocks] == ["encoder.block.1", "encoder.block.2"]


def test_routing_sublayers_of_an_unusable_larger_group_warns():
    model = hf("T5EncoderModel", "T5Config", vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
               dropout_rate=0.0)().eval()
    with pytest.warns(UserWarning, match=r"routes the 2 blocks encoder\.block\.1\.layer\.\*.*the group encoder\.block\.\*"):
        modfx.transform(model, example_kwargs=ids_of())


def test_an_encoder_decoder_routes_its_encoder_and_says_the_decoder_is_not_routed():
    model = hf("T5ForConditionalGeneration", "T5Config", vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=3,
               num_heads=4, dropout_rate=0.0, use_cache=False)().eval()
    inputs = {**ids_of(), "decoder_input_ids": torch.randint(0, V, (B, 7))}  # the decoder runs over 7 tokens
    with pytest.warns(UserWarning, match=r"the 3 modules decoder\.block\.\* are not routed.*another sequence"):
        mod = modfx.transform(model, example_kwargs=inputs, capacity=1.0, weighting="none", every=1, predictor=False)
    assert [b.name for b in modfx.plan(mod).routed] == ["encoder.block.1", "encoder.block.2"]
    torch.testing.assert_close(mod(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=2e-5)


def test_token_input_routes_the_decoder_whose_body_then_scales_with_its_own_k():
    case = CASES["bart-decoder"]
    model, inputs = case.build().eval(), seq2seq()
    mod = transform(case, model, inputs, capacity=0.25, every=2)
    report = modfx.flops(mod)
    rows = {r.name: r.expr for r in (*report.blocks, *report.kinds)}
    routing = sum(rows.get(kind, 0) for kind in ("router", "sort", "topk", "gather", "scatter", "predictor"))
    body = sympy.expand(rows["model.decoder.layers.1"] - routing)  # one routed block: all the routing is its
    assert {str(s) for s in body.free_symbols} == {"B", "k", "S_input_ids"}  # k decoder tokens, every encoder token
    assert report.at == {"B": B, "S": S, "S_input_ids": S + 3, "k": 3}


def test_flops_of_a_routed_decoder_agree_with_flop_counter_mode():
    case = CASES["bart-decoder"]
    model, inputs = case.build().eval(), seq2seq()
    mod = transform(case, model, inputs, capacity=0.25, every=2)
    report = modfx.flops(mod)
    counted = torch_count(mod, (), example_kwargs=inputs, backward=True)
    data = sum(r.fwd for r in report.kinds if r.name in ("sort", "topk", "gather", "scatter"))
    assert report.train_at - data == sum(counted.values())


def test_predictor_routing_of_a_decoder_leaves_cross_attention_over_every_encoder_token():
    case = CASES["bart-decoder"]
    model, inputs = case.build().eval(), seq2seq()
    mod = transform(case, model, inputs, capacity=0.25, every=1, weighting="none").eval()
    with torch.no_grad():
        for b in modfx.plan(mod).routed:
            mod.get_submodule(f"{b.name}.mod_predictor")[2].bias.fill_(100.0)  # the predictor selects every token
    modfx.set_routing(mod, "predictor")
    with torch.no_grad():  # every token through every block, self-attention unrestricted: the model itself
        torch.testing.assert_close(mod(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=2e-5)


def test_predictor_routing_of_a_decoder_is_causal_in_the_decoder_tokens():
    case = CASES["t5-decoder"]
    model, inputs = case.build().eval(), seq2seq()
    mod = modfx.set_routing(transform(case, model, inputs), "predictor").eval()
    later = dict(inputs, decoder_input_ids=inputs["decoder_input_ids"].clone())
    later["decoder_input_ids"][:, 7:] = (later["decoder_input_ids"][:, 7:] + 1) % V
    with torch.no_grad():
        a, b = mod(**inputs).logits, mod(**later).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_token_input_must_name_an_input_with_a_token_axis():
    case = CASES["bart-decoder"]
    model, inputs = case.build().eval(), seq2seq()
    with pytest.raises(modfx.ModfxError, match=r"token_input='labels'.*no input of that name; its inputs are input_ids, decoder_input_ids"):
        modfx.transform(model, example_kwargs=inputs, token_input="labels")
    vit = CASES["vit"]
    with pytest.raises(modfx.ModfxError, match=r"token_input='pixel_values'.*no dynamic token axis"):
        modfx.transform(vit.build().eval(), example_kwargs=pixels(), token_input="pixel_values")


def test_generate_refuses_a_module_routed_over_another_input():
    case = CASES["bart-decoder"]
    model, inputs = case.build().eval(), seq2seq()
    mod = transform(case, model, inputs)
    with pytest.raises(modfx.ModfxError, match=r"generate samples decoder-only models.*'decoder_input_ids'"):
        modfx.generate(mod, inputs["input_ids"], max_new_tokens=2)


def test_an_input_axis_the_model_fixes_stays_static():
    """Whisper's mel features [B, mels, frames]: export is told axes 0 and 1 are dynamic, the model's
    convolution fixes the mel count. It is static in the transformed module, not "fixed after the transform"."""
    model = hf("WhisperForConditionalGeneration", "WhisperConfig", vocab_size=V, d_model=64, encoder_layers=2,
               decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
               decoder_ffn_dim=128, num_mel_bins=8, max_source_positions=16, max_target_positions=64, use_cache=False,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)().eval()
    inputs = {"input_features": torch.randn(B, 8, 32), "decoder_input_ids": torch.randint(0, V, (B, S))}
    mod = modfx.transform(model, example_kwargs=inputs, capacity=1.0, weighting="none", every=1, predictor=False)
    assert [b.name for b in modfx.plan(mod).routed] == ["model.decoder.layers.0", "model.decoder.layers.1"]
    torch.testing.assert_close(mod(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=2e-5)
    with pytest.raises(modfx.ModfxError, match=r"input kwargs\['input_features'\] has shape \[2, 6, 32\].*\[\*, 8, 32\]"):
        mod(**dict(inputs, input_features=torch.randn(B, 6, 32)))
    with pytest.raises(modfx.ModfxError, match=r"generate samples decoder-only models.*'decoder_input_ids'"):
        modfx.generate(mod, inputs["decoder_input_ids"], max_new_tokens=2, dense=True)  # the routed tokens are not the first input's


def test_a_short_decoder_given_by_position_is_lengthened_for_the_capture():
    model = CASES["t5-decoder"].build().eval()
    enc, dec = torch.randint(0, V, (B, 12)), torch.randint(0, V, (B, 3))  # k = 1 at capacity 0.25: too short
    mod = modfx.transform(model, (enc, None, dec), capacity=0.25, token_input="decoder_input_ids")
    assert mod(enc, None, dec).logits.shape == (B, 3, V)
    assert mod(enc, None, torch.randint(0, V, (B, 9))).logits.shape == (B, 9, V)


@pytest.mark.parametrize("token_input", ["tgt", ("src", "tgt")], ids=["decoder", "both stacks"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["sequence-first", "batch-first"])
def test_token_input_routes_the_decoder_of_nn_transformer(batch_first, token_input):
    torch.manual_seed(0)
    model = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
                           dropout=0.0, batch_first=batch_first).eval()
    src, tgt = torch.randn(15, B, 32), torch.randn(S, B, 32)
    if batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    mod = modfx.transform(model, (src, tgt), capacity=1.0, weighting="none", every=1, predictor=False,
                          token_input=token_input)
    encoder = ["encoder.layers.0", "encoder.layers.1"] if token_input != "tgt" else []
    assert [b.name for b in modfx.plan(mod).routed] == encoder + ["decoder.layers.0", "decoder.layers.1"]
    torch.testing.assert_close(mod(src, tgt), model(src, tgt), rtol=1e-5, atol=2e-5)


BOTH = ("input_ids", "decoder_input_ids")


def test_a_tuple_of_token_inputs_routes_both_stacks_each_at_its_own_k():
    case = CASES["bart-decoder"]
    model, inputs = case.build().eval(), seq2seq()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "the decoder is not routed" warning
        mod = modfx.transform(model, example_kwargs=inputs, token_input=BOTH, capacity=0.25)
    p = modfx.plan(mod)
    assert [b.name for b in p.routed] == ["model.encoder.layers.1", "model.decoder.layers.1"]  # every=2 over all 4
    with torch.no_grad():
        want = reference(model, inputs, mod, [b.name for b in p.routed], 0.25)
        torch.testing.assert_close(mod(**inputs).logits, want.logits, rtol=1e-5, atol=2e-5)
    report = modfx.flops(mod)
    assert report.at == {"B": B, "S_input_ids": S + 3, "S_decoder_input_ids": S, "k_input_ids": 4, "k_decoder_input_ids": 3}
    names = Names.of(mod.modfx_graphs[("topk", False)], [b.name for b in p.blocks], mod.modfx_capture.seq_exprs)
    for block, (seq, k) in {"model.encoder.layers.1": ("S_input_ids", "k_input_ids"),
                            "model.decoder.layers.1": ("S_decoder_input_ids", "k_decoder_input_ids")}.items():
        body = names.pretty(sum(c.fwd for c in report.costs if c.block == block and c.kind not in ROUTING))
        assert k in {str(x) for x in body.free_symbols} and seq not in {str(x) for x in body.free_symbols}
    counted = torch_count(mod, (), example_kwargs=inputs, backward=True)
    data = sum(r.fwd for r in report.kinds if r.name in ("sort", "topk", "gather", "scatter"))
    assert report.train_at - data == sum(counted.values())


def test_both_stacks_routed_at_capacity_one_without_weighting_reproduce_the_model():
    case = CASES["bart-decoder"]
    model, inputs = case.build().eval(), seq2seq()
    mod = modfx.transform(model, example_kwargs=inputs, token_input=BOTH, capacity=1.0, weighting="none", every=1,
                          predictor=False)
    assert len(modfx.plan(mod).routed) == 4
    torch.testing.assert_close(mod(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=2e-5)


def test_a_padding_mask_with_both_stacks_routed_applies_to_the_stack_over_its_tokens():
    case = CASES["bart-decoder"]
    model, inputs = case.build().eval(), seq2seq()
    mask = torch.ones_like(inputs["input_ids"])
    mask[0, 4:] = 0  # 4 real encoder tokens of 15; k = 4
    inputs = dict(inputs, attention_mask=mask)
    mod = modfx.transform(model, example_kwargs=inputs, token_input=BOTH, capacity=0.25, padding_mask="attention_mask")
    encoder_chosen, decoder_chosen = chosen_tokens(mod, inputs)
    assert encoder_chosen[0].tolist() == [0, 1, 2, 3]  # padded encoder tokens never take a slot
    assert decoder_chosen.shape == (B, 3)  # the decoder's 12 tokens, not masked by the encoder's mask


def test_generate_refuses_a_module_with_two_routed_stacks():
    case = CASES["bart-decoder"]
    model, inputs = case.build().eval(), seq2seq()
    mod = modfx.transform(model, example_kwargs=inputs, token_input=BOTH)
    with pytest.raises(modfx.ModfxError, match="routes 2 stacks"):
        modfx.generate(mod, inputs["input_ids"], 2)


def test_a_batch_broadcast_side_input_the_block_repeats_by_its_literal_size_is_explained():
    """GPT-J's blocks repeat a [1, S] position table by its batch size, which export saw as the constant 1;
    routed, the table is [B, k]. The error says so, and position ids with a full batch axis work."""
    model = hf("GPTJForCausalLM", "GPTJConfig", "eager", vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
               rotary_dim=8, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0,
               eos_token_id=0)().eval()
    inputs = ids_of()
    with pytest.raises(modfx.ModfxError, match=r"size-1 batch axis.*pass the input with a full batch axis"):
        modfx.transform(model, example_kwargs=inputs)
    inputs["position_ids"] = torch.arange(S).expand(B, S)
    mod = modfx.transform(model, example_kwargs=inputs, capacity=1.0, weighting="none", every=1, predictor=False)
    torch.testing.assert_close(mod(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=2e-5)


# More architectures, one check each: capacity 1.0 without weighting reproduces the model, and the default
# transform runs at another batch and length. (The CASES above run the full set of checks.)
NODROP = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
MORE = {
    "gemma2": hf("Gemma2ForCausalLM", "Gemma2Config", "eager", **TEXT, num_key_value_heads=2, head_dim=16, use_cache=False),
    "gemma3": hf("Gemma3ForCausalLM", "Gemma3TextConfig", **{**TEXT, "num_hidden_layers": 4}, num_key_value_heads=2,
                 head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2, use_cache=False),
    "cohere": hf("CohereForCausalLM", "CohereConfig", **TEXT, num_key_value_heads=2, use_cache=False),
    "starcoder2": hf("Starcoder2ForCausalLM", "Starcoder2Config", **TEXT, num_key_value_heads=2, residual_dropout=0.0,
                     embedding_dropout=0.0, attention_dropout=0.0, use_cache=False),
    "codegen": hf("CodeGenForCausalLM", "CodeGenConfig", "eager", vocab_size=V, n_embd=64, n_layer=2, n_head=4,
                  n_positions=64, n_ctx=64, rotary_dim=8, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                  use_cache=False, bos_token_id=0, eos_token_id=0),
    "persimmon": hf("PersimmonForCausalLM", "PersimmonConfig", **TEXT, hidden_dropout=0.0, attention_dropout=0.0,
                    use_cache=False),
    "phi": hf("PhiForCausalLM", "PhiConfig", **TEXT, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
              partial_rotary_factor=0.5, use_cache=False),
    "qwen2-moe": hf("Qwen2MoeForCausalLM", "Qwen2MoeConfig", **TEXT, num_key_value_heads=2, num_experts=4,
                    num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=128, use_cache=False),
    "granite": hf("GraniteForCausalLM", "GraniteConfig", **TEXT, num_key_value_heads=2, residual_multiplier=0.5,
                  embedding_multiplier=2.0, attention_multiplier=0.25, logits_scaling=2.0, use_cache=False),
    "nemotron": hf("NemotronForCausalLM", "NemotronConfig", **TEXT, num_key_value_heads=2, partial_rotary_factor=0.5,
                   use_cache=False),
    "olmo": hf("OlmoForCausalLM", "OlmoConfig", **TEXT, num_key_value_heads=2, pad_token_id=0, clip_qkv=8.0, use_cache=False),
    "glm4": hf("Glm4ForCausalLM", "Glm4Config", **TEXT, num_key_value_heads=2, head_dim=16, pad_token_id=0, use_cache=False),
    "distilbert": hf("DistilBertModel", "DistilBertConfig", vocab_size=V, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                     max_position_embeddings=64, dropout=0.0, attention_dropout=0.0),
    "deberta-v2": hf("DebertaV2Model", "DebertaV2Config", "eager", **TEXT, **NODROP),
    "electra": hf("ElectraModel", "ElectraConfig", **TEXT, embedding_size=32, **NODROP),
    "modernbert": hf("ModernBertModel", "ModernBertConfig", **{**TEXT, "num_hidden_layers": 3}, local_attention=8,
                     global_attn_every_n_layers=3, pad_token_id=0),
    "clip-text": hf("CLIPTextModel", "CLIPTextConfig", vocab_size=V, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64),
    "deit": hf("DeiTModel", "DeiTConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128, image_size=16, patch_size=4, num_channels=3),
    "beit": hf("BeitModel", "BeitConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128, image_size=16, patch_size=4, num_channels=3, drop_path_rate=0.0),
    "gpt-bigcode": hf("GPTBigCodeForCausalLM", "GPTBigCodeConfig", vocab_size=V, n_embd=64, n_layer=2, n_head=4,
                      n_positions=64, multi_query=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      use_cache=False),
    "xglm": hf("XGLMForCausalLM", "XGLMConfig", "eager", vocab_size=V, d_model=64, num_layers=2, attention_heads=4,
               ffn_dim=128, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
               use_cache=False),
    "biogpt": hf("BioGptForCausalLM", "BioGptConfig", **TEXT, **NODROP, use_cache=False),
    "olmoe": hf("OlmoeForCausalLM", "OlmoeConfig", **TEXT, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                pad_token_id=0, use_cache=False),
    "deepseek-v3": hf("DeepseekV3ForCausalLM", "DeepseekV3Config", **TEXT, num_key_value_heads=4, n_routed_experts=4,
                      num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=64, first_k_dense_replace=1,
                      kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                      use_cache=False),
    "helium": hf("HeliumForCausalLM", "HeliumConfig", **TEXT, num_key_value_heads=2, head_dim=16, use_cache=False),
    "roformer": hf("RoFormerModel", "RoFormerConfig", "eager", **TEXT, **NODROP),
    "xlm-roberta": hf("XLMRobertaModel", "XLMRobertaConfig", **TEXT, **NODROP, pad_token_id=0),
    "mpnet": hf("MPNetModel", "MPNetConfig", "eager", **TEXT, **NODROP, pad_token_id=0),
    "esm": hf("EsmModel", "EsmConfig", **TEXT, **NODROP, position_embedding_type="rotary", pad_token_id=0),
    "dinov2": hf("Dinov2Model", "Dinov2Config", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 mlp_ratio=2, image_size=16, patch_size=4, num_channels=3),
    # 16 patches, no CLS: the head dim must not also be 16 (a static length colliding with another size)
    "siglip-vision": hf("SiglipVisionModel", "SiglipVisionConfig", hidden_size=48, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128, image_size=16, patch_size=4, num_channels=3),
}
IMAGES = ("deit", "beit", "dinov2", "siglip-vision")


@pytest.mark.parametrize("name", list(MORE))
def test_more_architectures_reproduce_at_capacity_one_and_run_routed(name):
    torch.manual_seed(0)
    model = MORE[name]().eval()
    make = pixels if name in IMAGES else ids_of
    inputs, other = make(), make(batch=3, seq=S + 5)
    dense = modfx.transform(model, example_kwargs=inputs, capacity=1.0, weighting="none", every=1, predictor=False)
    with torch.no_grad():
        torch.testing.assert_close(dense(**inputs)[0], model(**inputs)[0], rtol=1e-5, atol=2e-5)
        mod = modfx.transform(model, example_kwargs=inputs)
        assert modfx.plan(mod).routed
        assert mod(**other)[0].shape == model(**other)[0].shape


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_predictor_routing_limits_written_out_attention_as_it_limits_sdpa(name):
    """The eager attention implementation (matmul + softmax) gets the same key restriction as SDPA: the two
    implementations of one model, with the same routers and predictors, agree in predictor routing."""
    sdpa_case, eager_case = CASES[name], CASES[f"{name}-eager"]
    torch.manual_seed(0)
    sdpa = sdpa_case.build().eval()
    eager = eager_case.build().eval()
    eager.load_state_dict(sdpa.state_dict())
    inputs = ids_of()
    mods = [modfx.set_routing(transform(c, m, inputs), "predictor").eval() for c, m in ((sdpa_case, sdpa), (eager_case, eager))]
    (routed,) = [b.name for b in modfx.plan(mods[0]).routed]
    seen = []
    hook = sdpa.get_submodule(routed).register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0] if args else
                                                                   next(iter(kwargs.values()))), with_kwargs=True)
    with torch.no_grad():
        sdpa(**inputs)  # the routed block's input x; its predictor is shifted to select about half of the tokens
        hook.remove()
        pred = mods[0].get_submodule(f"{routed}.mod_predictor")
        pred[2].bias -= widest_middle_gap(pred(seen[0]))  # no token within rounding of the threshold
    mods[1].load_state_dict(mods[0].state_dict())
    with torch.no_grad():
        got, want = (main_output(c, run(c, m, inputs)) for c, m in zip((eager_case, sdpa_case), mods[::-1]))
    selected = modfx.routing_stats(mods[0])
    assert all(0 < s["selected"] < 1 for s in selected.values())  # some keys are masked, some not
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    plain = main_output(sdpa_case, run(sdpa_case, sdpa, inputs))
    assert not torch.allclose(got, plain, atol=1e-3)  # and routing changed the output


def test_generate_refuses_written_out_attention_its_caches_cannot_hold():
    model = CASES["llama-eager"].build().eval()
    mod = modfx.transform(model, (ids_of()["input_ids"],))
    with pytest.raises(modfx.ModfxError, match=r"softmax\(q @ k\^T\).*attn_implementation='sdpa'"):
        modfx.generate(mod, ids_of()["input_ids"], 2, dense=True)
