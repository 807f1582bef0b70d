"""The transformed module under torch.distributed wrappers, in one process (a world of one, gloo): DDP and
FSDP2's fully_shard of the whole module train as the module alone does; fully_shard of a block is refused."""

import copy

import pytest
import torch
import torch.distributed as dist

import modfx
from modfx.models import llama

if not dist.is_available():
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)

from torch.distributed.fsdp import fully_shard  # noqa: E402


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def transformed():
    model = llama.Llama(llama.LlamaConfig(n_layers=2, d_model=32, n_heads=2, vocab_size=64))
    ids = torch.randint(0, 64, (2, 16))
    return modfx.transform(model, (ids,), capacity=0.25), ids


def grads_of_one_step(module, ids, named_like) -> dict:
    module(ids).logits.pow(2).mean().backward()
    grads = {n: p.grad for n, p in named_like.named_parameters()}
    return {n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in grads.items()}


def shard_whole(mod):
    fully_shard(mod)  # in place: the module's class becomes an FSDP one
    return mod


@pytest.mark.parametrize("wrap", [torch.nn.parallel.DistributedDataParallel, shard_whole], ids=["ddp", "fully_shard"])
def test_wrapped_module_gives_the_gradients_of_the_module_alone(world_of_one, transformed, wrap):
    mod, ids = transformed
    alone = copy.deepcopy(mod)
    got, want = grads_of_one_step(wrap(mod), ids, mod), grads_of_one_step(alone, ids, alone)
    assert want["layers.1.mod_predictor.0.weight"].abs().sum() > 0
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, msg=n)


def test_fully_shard_of_a_block_is_refused_with_what_to_do(world_of_one, transformed):
    mod, ids = transformed
    fully_shard(mod.get_submodule("layers.1"))
    fully_shard(mod)
    with pytest.raises(modfx.ModfxError, match=r"layers\.1\..* still sharded .* fully_shard\(mod\), not its blocks"):
        mod(ids)
