"""Sampling with KV caches that hold only routed tokens; skipped tokens execute nothing of the block."""

import pytest
import torch

import modfx
from modfx.generate import decoder
from modfx.models import gpt, llama
from modfx.models.common import rope_at

V, P, N = 64, 12, 8


def make(bias=None, **overrides):
    torch.manual_seed(0)
    model = llama.Llama(llama.LlamaConfig(n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=V)).eval()
    ids = torch.randint(0, V, (2, P))
    mod = modfx.transform(model, (ids,), **{"capacity": 0.25, **overrides}).eval()
    if bias is not None:
        for b in modfx.plan(mod).routed:
            with torch.no_grad():
                mod.get_submodule(f"{b.name}.mod_predictor")[2].bias.fill_(bias)
    return model, mod, ids


def half_selecting(mod, model, ids):
    """Shift each predictor so that it selects about half of the prompt's tokens at its block."""
    with torch.no_grad():
        x = model.tok_emb(ids)
        cos, sin = rope_at(model.cos, model.sin, ids.shape[1])
        for i, layer in enumerate(model.layers):
            name = f"layers.{i}"
            if hasattr(mod.get_submodule(name), "mod_predictor"):
                pred = mod.get_submodule(f"{name}.mod_predictor")
                pred[2].bias -= pred(x).median()
            x = layer(x, cos, sin)


def recompute(mod, ids, n):
    """The oracle: re-run the whole sequence in predictor routing at every step, greedy."""
    modfx.set_routing(mod, "predictor")
    logits = []
    for _ in range(n):
        step = mod(ids).logits[:, -1]
        logits.append(step)
        ids = torch.cat([ids, step.argmax(-1, keepdim=True)], 1)
    modfx.set_routing(mod, "topk")
    return ids, torch.stack(logits, 1)


def test_cached_generation_equals_recomputing_the_sequence():
    model, mod, ids = make()
    half_selecting(mod, model, ids)
    got_ids, got_logits = modfx.generate(mod, ids, N, return_logits=True)
    want_ids, want_logits = recompute(mod, ids, N)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-4)


def test_grouped_query_caches_hold_only_the_kv_heads():
    # 4 query heads share 2 kv heads: the prefill hands the caches [B, 2, P, hd], not the repeated 4 heads
    _, mod, ids = make()
    dec = decoder(mod)
    outs = dec.prefill(mod, ids)
    first = dec.out_spec.num_leaves + dec.n_stats
    kv = outs[first:first + 2 * len(dec.sig.attention)]
    assert {tuple(t.shape) for t in kv} == {(2, 2, P, 8)}


def test_cached_generation_of_a_hugging_face_gqa_model_equals_recomputing_the_sequence():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, V, (2, P))
    mod = modfx.transform(model, (ids,), capacity=0.25).eval()
    got_ids, got_logits = modfx.generate(mod, ids, N, return_logits=True)
    want_ids, want_logits = recompute(mod, ids, N)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-4)


def branch_calls(mod, block, kind):
    calls = []
    mod.get_submodule(f"modfx_decode_{block}_{kind}").register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("bias, runs", [(-100.0, False), (100.0, True)])
def test_a_skipped_token_executes_nothing_of_the_block(bias, runs):
    _, mod, ids = make(bias=bias)
    modfx.generate(mod, ids[:, :2], 1)  # builds the decoder
    run, skip = branch_calls(mod, 1, "run"), branch_calls(mod, 1, "skip")
    modfx.generate(mod, ids, N)
    steps = N - 1  # decode steps after the prefill
    assert (len(run), len(skip)) == ((steps, 0) if runs else (0, steps))


def test_selecting_everything_at_capacity_one_generates_like_the_original_model():
    model, mod, ids = make(bias=100.0, capacity=1.0, weighting="none", every=1)
    got = modfx.generate(mod, ids, N)
    want = ids
    with torch.no_grad():
        for _ in range(N):
            want = torch.cat([want, model(want).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(got, want)


def test_compiled_decode_generates_the_same_tokens():
    model, mod, ids = make()
    half_selecting(mod, model, ids)
    assert torch.equal(modfx.generate(mod, ids, 4, compile=True), modfx.generate(mod, ids, 4))


def test_generate_needs_the_predictor():
    _, mod, ids = make(predictor=False)
    with pytest.raises(modfx.ModfxError, match="predictor"):
        modfx.generate(mod, ids, 2)


def test_dense_baseline_generates_like_the_original_model():
    model, mod, ids = make()
    want = ids
    with torch.no_grad():
        for _ in range(N):
            want = torch.cat([want, model(want).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(modfx.generate(mod, ids, N, dense=True), want)


class LogitsAndLoss(torch.nn.Module):
    """nanoGPT's interface: (logits, loss), or the same as a dict."""

    def __init__(self, as_dict: bool):
        super().__init__()
        self.model, self.as_dict = gpt.GPT(gpt.GPTConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=V)), as_dict

    def forward(self, idx, targets=None):
        logits = self.model(idx).logits
        loss = None if targets is None else torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return {"logits": logits, "loss": loss} if self.as_dict else (logits, loss)


@pytest.mark.parametrize("as_dict", [False, True], ids=["tuple", "dict"])
def test_a_model_returning_its_logits_in_a_tuple_or_dict_generates_from_them(as_dict):
    torch.manual_seed(0)
    model = LogitsAndLoss(as_dict).eval()
    ids = torch.randint(0, V, (2, P))
    mod = modfx.transform(model, (ids,)).eval()
    want = ids
    with torch.no_grad():
        for _ in range(N):
            logits = model(want)["logits" if as_dict else 0]
            want = torch.cat([want, logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(modfx.generate(mod, ids, N, dense=True), want)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ({"max_new_tokens": 2, "temperature": 1.0, "top_k": 0}, "top_k must be None"),
    ({"max_new_tokens": 2, "temperature": 1.0, "top_k": -1}, "top_k must be None"),
])
def test_bad_sampling_arguments_are_refused(kwargs, message):
    _, mod, ids = make()
    with pytest.raises(modfx.ModfxError, match=message):
        modfx.generate(mod, ids, **kwargs)


def test_empty_prompt_is_refused():
    _, mod, ids = make()
    with pytest.raises(modfx.ModfxError, match="P >= 1"):
        modfx.generate(mod, ids[:, :0], 2)


def test_generation_after_a_dtype_change_uses_the_converted_model():
    model, mod, ids = make()
    modfx.generate(mod, ids, 2)  # builds and caches the decoder
    mod.double()
    got, logits = modfx.generate(mod, ids, 2, return_logits=True)
    assert logits.dtype == torch.float64
    assert torch.equal(got, modfx.generate(mod, ids, 2))


def _hf(cls_name, config_name, **kw):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(vocab_size=V, hidden_size=32, num_attention_heads=4, use_cache=False, **kw)
    return getattr(transformers, cls_name)._from_config(config, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("build", [
    lambda: _hf("MistralForCausalLM", "MistralConfig", intermediate_size=64, num_hidden_layers=2,
                num_key_value_heads=2, sliding_window=4),
    lambda: _hf("FalconForCausalLM", "FalconConfig", num_hidden_layers=2, alibi=True),
], ids=["sliding-window", "alibi"])
def test_attention_masks_the_caches_cannot_rebuild_are_refused(build):
    ids = torch.randint(0, V, (2, P))
    mod = modfx.transform(build(), (ids,)).eval()
    for dense in (False, True):
        with pytest.raises(modfx.ModfxError, match="does not use a plain causal mask"):
            modfx.generate(mod, ids, 4, dense=dense)


def test_cached_generation_of_a_mixture_of_experts_model_equals_recomputing_the_sequence():
    # the MoE block reads the size B * S * top_k, which no input carries as one axis: inside the cond
    # branch it is rebuilt from the axes that carry B and S
    model = _hf("MixtralForCausalLM", "MixtralConfig", intermediate_size=64, num_hidden_layers=2,
                num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    ids = torch.randint(0, V, (2, P))
    mod = modfx.transform(model, (ids,)).eval()
    with torch.no_grad():
        mod.get_submodule("model.layers.1.mod_predictor")[2].bias.fill_(100.0)  # every token runs the block
    got_ids, got_logits = modfx.generate(mod, ids, 4, return_logits=True)
    want_ids, want_logits = recompute(mod, ids, 4)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("build", [
    lambda: _hf("GPT2LMHeadModel", "GPT2Config", n_layer=2, n_positions=64, bos_token_id=0, eos_token_id=0),
    lambda: _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", intermediate_size=64, num_hidden_layers=2),
    lambda: _hf("GemmaForCausalLM", "GemmaConfig", intermediate_size=64, num_hidden_layers=2, num_key_value_heads=1,
                head_dim=8),
    lambda: _hf("Phi3ForCausalLM", "Phi3Config", intermediate_size=64, num_hidden_layers=2, num_key_value_heads=2,
                pad_token_id=0),
    lambda: _hf("Qwen3ForCausalLM", "Qwen3Config", intermediate_size=64, num_hidden_layers=2, num_key_value_heads=2,
                head_dim=8),
    lambda: _hf("FalconForCausalLM", "FalconConfig", num_hidden_layers=2),
    lambda: _hf("OPTForCausalLM", "OPTConfig", ffn_dim=64, num_hidden_layers=2, word_embed_proj_dim=32, pad_token_id=1),
], ids=["gpt2", "gpt-neox", "gemma", "phi3", "qwen3", "falcon", "opt"])
def test_cached_generation_of_hugging_face_decoders_equals_recomputing_the_sequence(build):
    ids = torch.randint(0, V, (2, P))
    model = build()
    mod = modfx.transform(model, (ids,), capacity=0.5).eval()
    (block,) = modfx.plan(mod).routed
    seen = []  # the routed layer's input in the original model: shift its predictor to select about half
    model.get_submodule(block.name).register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        model(ids)
        pred = mod.get_submodule(f"{block.name}.mod_predictor")
        pred[2].bias -= pred(seen[0]).median()
    got_ids, got_logits = modfx.generate(mod, ids, N, return_logits=True)
    want_ids, want_logits = recompute(mod, ids, N)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-4)
    modfx.set_routing(mod, "predictor")
    mod(want_ids)
    selected = modfx.routing_stats(mod)[block.name]["selected"]
    assert 0.2 < selected < 0.8  # the predictor skips some tokens and runs others: both cache paths are used


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dense", [False, True], ids=["routed", "dense"])
def test_a_padded_batch_generates_what_each_prompt_generates_alone(side, dense):
    model, mod, ids = make()
    half_selecting(mod, model, ids)
    n = 7  # row 1's real tokens; the other 5 are padding
    mask = torch.ones_like(ids)
    padded = ids.clone()
    pad = slice(0, P - n) if side == "left" else slice(n, P)
    mask[1, pad] = 0
    padded[1, pad] = 0
    real1 = padded[1:, mask[1] == 1]
    got_ids, got_logits = modfx.generate(mod, padded, N, attention_mask=mask, return_logits=True, dense=dense)
    for row, prompt in ((0, ids[:1]), (1, real1)):
        want_ids, want_logits = modfx.generate(mod, prompt, N, return_logits=True, dense=dense)
        assert torch.equal(got_ids[row, P:], want_ids[0, prompt.shape[1]:])
        torch.testing.assert_close(got_logits[row], want_logits[0], rtol=0, atol=1e-4)
    assert torch.equal(got_ids[:, :P], padded)  # the prompts come back as given


def test_a_module_transformed_with_a_padding_mask_generates_what_each_prompt_generates_alone():
    model = _hf("LlamaForCausalLM", "LlamaConfig", intermediate_size=64, num_hidden_layers=2, num_key_value_heads=2)
    ids = torch.randint(0, V, (2, P))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mod = modfx.transform(model, example_kwargs={"input_ids": ids, "attention_mask": mask}, every=1,
                          padding_mask="attention_mask").eval()
    got = modfx.generate(mod, ids, 4, attention_mask=mask)
    for row, prompt in ((0, ids[:1]), (1, ids[1:, 5:])):
        assert torch.equal(got[row, P:], modfx.generate(mod, prompt, 4)[0, prompt.shape[1]:])


def test_a_padding_mask_without_real_tokens_or_of_another_shape_is_refused():
    _, mod, ids = make()
    with pytest.raises(modfx.ModfxError, match=r"attention_mask must be a tensor shaped like input_ids \[2, 12\]"):
        modfx.generate(mod, ids, 2, attention_mask=torch.ones(2, 5))
    mask = torch.ones_like(ids)
    mask[1] = 0
    with pytest.raises(modfx.ModfxError, match=r"no real token in rows \[1\]"):
        modfx.generate(mod, ids, 2, attention_mask=mask)


class OffsetPositions(torch.nn.Module):
    """Meta's Llama signature: `start_pos` is one int offset, not a position per token; the model slices
    its position table by it (no arange to number the tokens)."""

    def __init__(self):
        super().__init__()
        self.model = llama.Llama(llama.LlamaConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=64))
        self.register_buffer("positions", torch.arange(64))

    def forward(self, tokens, start_pos: int = 0):
        return self.model(tokens, self.positions[start_pos:start_pos + tokens.shape[1]])


def test_an_int_offset_is_not_taken_for_token_positions():
    mod = modfx.transform(OffsetPositions(), (torch.randint(0, 64, (2, 16)),))
    with pytest.raises(modfx.ModfxError, match=r"start_pos takes one int offset, not a position per token"):
        modfx.generate(mod, torch.randint(0, 64, (1, 4)), 2)


class NumbersItsTokens(torch.nn.Module):
    """nanoGPT's signature: forward(idx) numbers the tokens itself (`pos = arange(S)`, learned positions)."""

    def __init__(self):
        super().__init__()
        self.model = gpt.GPT(gpt.GPTConfig(n_layers=4, d_model=32, n_heads=4, vocab_size=V))

    def forward(self, idx):
        return self.model(idx)


def test_a_model_that_numbers_its_tokens_itself_decodes_them_at_their_true_positions():
    torch.manual_seed(0)
    ids = torch.randint(0, V, (2, P))
    mod = modfx.transform(NumbersItsTokens().eval(), (ids,), capacity=0.25).eval()
    got_ids, got_logits = modfx.generate(mod, ids, N, return_logits=True)
    want_ids, want_logits = recompute(mod, ids, N)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-4)


def test_prompts_of_different_lengths_for_a_model_that_numbers_its_tokens_are_refused():
    mod = modfx.transform(NumbersItsTokens().eval(), (torch.randint(0, V, (2, P)),))
    mask = torch.ones(2, P, dtype=torch.long)
    mask[1, :3] = 0
    with pytest.raises(modfx.ModfxError, match=r"numbers its tokens itself .* \[9, 12\] real tokens"):
        modfx.generate(mod, torch.randint(0, V, (2, P)), 2, attention_mask=mask)


class SkipBlock(llama.Block):
    """Adds the embeddings back as a second output path: x0 read twice makes layer 0 no block."""

    def forward(self, x, x0, cos, sin):
        h = x + self.attn(self.norm1(x), cos, sin)
        return h + self.mlp(self.norm2(h)) + 0.5 * x0


class WithEmbeddingSkips(llama.Llama):
    block = SkipBlock

    def forward(self, idx, input_pos=None):
        x0 = x = self.tok_emb(idx)
        cos, sin = rope_at(self.cos, self.sin, idx.shape[1], input_pos)
        for layer in self.layers:
            x = layer(x, x0, cos, sin)
        return self.head(self.norm(x))


def test_attention_outside_the_blocks_is_refused_not_decoded_without_a_cache():
    torch.manual_seed(0)
    model = WithEmbeddingSkips(llama.LlamaConfig(n_layers=4, d_model=32, n_heads=4, vocab_size=64)).eval()
    ids = torch.randint(0, 64, (2, 12))
    with pytest.warns(UserWarning, match="layers.0"):
        mod = modfx.transform(model, (ids,), capacity=0.25)
    with pytest.raises(modfx.ModfxError, match=r"attention .*layers\.0.* lies outside the blocks found"):
        modfx.generate(mod, ids, 2)
