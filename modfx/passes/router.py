"""Insert a router: one learned score per token in front of each routed block.

    before:                         after:
        y = block(x, *side)             r = linear(x, block.mod_router.weight)   # [B, S, 1]
                                        y = block(x, *side)

The router is a real `nn.Linear(D, 1, bias=False)` registered at `<block>.mod_router` in the module
that owns the graph, so it trains, shows in `state_dict` and compiles. Created once and shared by
every graph variant (train/eval, top-k/predictor routing).

Contract: requires a `Block` from discovery; ensures a node tagged "router" computing r over all S tokens.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import Graph, Node

from .discover import Block
from .graph_utils import aten, call, get_attr


def get_or_add_module(root: nn.Module, path: str, make) -> nn.Module:
    """`root.get_submodule(path)`, creating it (and empty parents) with `make()` when missing."""
    *parents, leaf = path.split(".")
    owner = root
    for p in parents:
        if not hasattr(owner, p):
            owner.add_module(p, nn.Module())
        owner = getattr(owner, p)
    if not hasattr(owner, leaf):
        owner.add_module(leaf, make())
    return getattr(owner, leaf)


def like(x: Node) -> torch.Tensor:
    return x.meta["val"]


def insert_router(graph: Graph, root: nn.Module, block: Block) -> Node:
    x = like(block.x)
    d = x.shape[-1]
    router = get_or_add_module(root, f"{block.name}.mod_router", lambda: _new_router(d, x.dtype, x.device))
    with graph.inserting_before(block.first):
        w = get_attr(graph, f"{block.name}.mod_router.weight", router.weight, stack=block.stack)
        return call(graph, aten.linear.default, (block.x, w), stack=block.stack, tag="router")  # [B, S, 1]


def _new_router(d: int, dtype: torch.dtype, device: torch.device) -> nn.Linear:
    router = nn.Linear(d, 1, bias=False)
    nn.init.normal_(router.weight, std=d**-0.5)
    return router.to(device=device, dtype=dtype if dtype.is_floating_point else torch.float32)
