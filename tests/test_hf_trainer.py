"""A transformed Hugging Face causal LM trains in the Hugging Face Trainer, routers and predictors included."""

import pytest
import torch

import modfx

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n, seq, vocab):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_updates_routers_predictors_and_weights(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, use_cache=False)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (2, 16))
    mod = modfx.transform(model, example_kwargs={"input_ids": ids, "labels": ids}, capacity=0.25)
    assert mod(input_ids=ids, labels=ids).loss.ndim == 0  # the usual HF loss
    before = {n: p.detach().clone() for n, p in mod.named_parameters()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_steps=1, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=mod, args=args, train_dataset=RandomTokens(8, 16, 64))
    trainer.train()
    for name in ("model.layers.1.mod_router.weight", "model.layers.1.mod_predictor.0.weight",
                 "model.layers.1.self_attn.q_proj.weight"):
        assert not torch.equal(before[name], mod.get_parameter(name)), name
