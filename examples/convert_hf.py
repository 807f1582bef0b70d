"""Convert a Hugging Face causal LM (built from a small config, random weights, nothing downloaded) into
a Mixture-of-Depths model, train only its routers and predictors, and generate.

    python examples/convert_hf.py [--quick]
"""

import argparse

import torch
import transformers

import modfx


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=256, use_cache=False)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 256, (2, 32))
    # weighting="ste": the forward pass is the dense model's at initialisation; routers learn by straight-through
    mod = modfx.transform(model, example_kwargs={"input_ids": ids, "labels": ids}, capacity=0.5, weighting="ste")
    print(modfx.plan(mod))
    opt = torch.optim.AdamW(modfx.trainable_routing_parameters(mod), lr=1e-2)
    for step in range(5 if a.quick else 50):
        x = torch.randint(0, 256, (2, 32))
        out = mod(input_ids=x, labels=x)  # the usual HF loss
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    print(f"loss {out.loss.item():.3f}; routing: {modfx.routing_stats(mod)}")
    print(modfx.flops(mod))
    mod.eval()
    print(modfx.generate(mod, ids[:1, :8], 8))


if __name__ == "__main__":
    main()
