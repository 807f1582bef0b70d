"""Invariants over hypothesis-generated reference-model configs. CI runs a few examples
(MODFX_FUZZ_EXAMPLES, default 6) from a fixed seed; a long random run:
MODFX_FUZZ_EXAMPLES=200 MODFX_FUZZ_RANDOM=1 pytest tests/test_fuzz.py.
MODFX_FUZZ_COMPILE=1 also checks compiled == eager for every example."""

import math
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modfx
from modfx.models import llama

from reference import mod_forward, routers_of

V = 64


@st.composite
def configs(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    kv = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    n_layers = draw(st.integers(1, 6))
    return dict(
        n_layers=n_layers,
        n_heads=heads,
        n_kv_heads=kv,
        d_model=heads * draw(st.sampled_from([8, 16])),
        capacity=draw(st.sampled_from([0.05, 0.125, 0.3, 0.5, 1.0])),
        every=draw(st.integers(1, min(3, n_layers))),  # at least one block routed (else a ModfxError)
        weighting=draw(st.sampled_from(["raw", "sigmoid", "none"])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        seq=draw(st.sampled_from([1, 2, 7, 16, 33])),
        batch=draw(st.integers(1, 3)),
    )


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(configs())
def test_transform_invariants(c):
    torch.manual_seed(0)
    model = llama.Llama(llama.LlamaConfig(n_layers=c["n_layers"], d_model=c["d_model"], n_heads=c["n_heads"],
                                          n_kv_heads=c["n_kv_heads"], vocab_size=V, max_seq_len=64)).eval()
    model = model.to(c["dtype"])
    ids = torch.randint(0, V, (2, 12))  # the example; calls below use other shapes
    mod = modfx.transform(model, (ids,), capacity=c["capacity"], every=c["every"], weighting=c["weighting"]).eval()
    x = torch.randint(0, V, (c["batch"], c["seq"]))
    with torch.no_grad():
        got = mod(x).logits
        want = mod_forward(model, x, {i: w.to(c["dtype"]) for i, w in routers_of(mod, model).items()},
                           c["capacity"], c["weighting"])
        tol = 1e-5 if c["dtype"] == torch.float32 else 5e-2
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        assert torch.equal(got, mod(x).logits)  # deterministic
        if os.environ.get("MODFX_FUZZ_COMPILE"):
            torch.testing.assert_close(torch.compile(mod, fullgraph=True)(x).logits, got, rtol=tol, atol=tol)

        # exactly k tokens per sequence change in a lone routed block (block 0 of a 1-block prefix); fp32
        # only: in bf16 a small r * f(x) can round away, leaving a chosen token bitwise unchanged
        if c["n_layers"] == 1 and c["dtype"] == torch.float32:
            single = modfx.transform(model, (ids,), capacity=c["capacity"], blocks=(0,),
                                     weighting=c["weighting"]).eval()
            skipped = model.head(model.norm(model.tok_emb(x)))
            k = max(1, math.ceil(c["capacity"] * c["seq"] - 1e-9))
            same = (single(x).logits == skipped).all(-1)
            assert same.sum(1).tolist() == [c["seq"] - k] * c["batch"]

        # capacity 1 with no weighting is the model itself
        if c["dtype"] == torch.float32:
            dense = modfx.transform(model, (ids,), capacity=1.0, weighting="none", every=1)
            torch.testing.assert_close(dense(x).logits, model(x).logits, rtol=0, atol=1e-5)
