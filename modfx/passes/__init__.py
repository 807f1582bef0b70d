"""The modfx pipeline, in one place:

    capture (torch.export)            modfx/capture.py
    -> discover blocks                passes/discover.py
    -> insert routers                 passes/router.py
    -> route: top-k, gather, block on k tokens, scatter      passes/route_topk.py
    -> re-score the chosen tokens (router grad on k only)    passes/rescore.py
    -> predictor branch (BCE aux loss, stats)                passes/predictor.py
    -> router aux loss (optional BCE on r itself)            passes/predictor.py
    -> one GEMM for the ranking score and the predictor      passes/fuse_scores.py
    -> FLOP budget check                                     passes/flops.py (run by modfx.transform)

`modfx.generate` builds its decode step from a capture of a few new tokens:

    capture -> token positions from an input (models that number their tokens with arange)
                                                             passes/decode_positions.py
    -> discover blocks -> KV caches, skipped blocks run nothing              passes/kv_cache.py

`run_pipeline` rewrites one captured graph in place for one routing mode; `modfx.transform` runs it for
every graph variant (train/eval capture x top-k/predictor routing), sharing the routers' parameters.
"""

from __future__ import annotations

import dataclasses

import sympy
import torch
from torch import nn
from torch.fx import Graph, Node

from ..config import MoDConfig
from ..errors import ModfxError
from .discover import Block, find_blocks
from .fuse_scores import fuse_router_predictor
from .predictor import add_predictor_loss, add_router_loss, route_predictor
from .rescore import rescore_chosen
from .graph_utils import aten, call, expr, input_named
from .route_topk import route_topk
from .router import insert_router


@dataclasses.dataclass
class PipelineResult:
    blocks: list[Block]
    routed: tuple[int, ...]
    stats: list  # extra graph outputs (predictor loss / accuracy per routed block), in order
    outputs: dict  # routed block index -> its new (merged) output node
    aux: Node | None = None  # aux_in_backward=False: the weighted sum of the aux losses (0 without any), a scalar


def run_pipeline(graph: Graph, root: nn.Module, config: MoDConfig, seq_expr: sympy.Expr | tuple | None,
                 mode: str = "topk") -> PipelineResult:
    """`seq_expr`: the routed stack's token-axis length, or a tuple of them, one per routed stack."""
    blocks = find_blocks(graph, seq_expr)
    routed = config.routed(len(blocks))
    if not routed:
        raise ModfxError(
            f"the configuration routes none of the {len(blocks)} blocks found ({', '.join(b.name for b in blocks)}): "
            f"every={config.every} routes blocks 1, {1 + config.every}, ... (counting from 0); "
            "use every=1 (CLI: --every 1) or name the blocks to route with blocks=(...)"
        )
    real = input_named(graph, config.padding_mask, "padding_mask") if config.padding_mask else None  # [B, S], 0 = padding
    masked = set(routed)  # the blocks the mask applies to: with several stacks, the one over its tokens (if
    if real is not None:  # none is, every routed block, and the first refuses the mask, with the shapes)
        v = real.meta.get("val")
        tokens = expr(v.shape[-1]) if isinstance(v, torch.Tensor) and v.dim() == 2 else None
        masked = {i for i in routed if blocks[i].seq_expr == tokens} or masked
    stats = []
    terms = None if config.aux_in_backward else []  # weight * aux of each aux loss, summed into one output
    rerouted = {}  # a block's old output -> its merged output, for the next block's residual input
    outputs = {}
    for block in blocks:
        block.x = rerouted.get(block.x, block.x)
        if block.index not in routed:
            continue
        old_out = block.out
        r = insert_router(graph, root, block)
        if mode == "topk":
            mask = real if block.index in masked else None
            routed_block = route_topk(graph, block, r, config.capacity_fraction, config.weighting, mask)
            new_out = routed_block.out
            if not config.router_aux_weight:  # the router aux loss needs r's gradient on all S tokens
                rescore_chosen(graph, block, r, routed_block)
            if config.predictor:
                new_out, block_stats = add_predictor_loss(graph, root, block, routed_block,
                                                          config.predictor_hidden, config.aux_loss_weight, terms)
                stats.append(block_stats)
            if config.router_aux_weight:
                new_out = add_router_loss(graph, block, routed_block, r, new_out, config.router_aux_weight, terms)
            elif config.predictor:  # r only ranks: one GEMM over x for it and the predictor
                fuse_router_predictor(graph, root, block, r)
        elif mode == "predictor":
            mask = real if block.index in masked else None
            new_out, block_stats = route_predictor(graph, root, block, r, config.predictor_hidden, config.weighting,
                                                   mask)
            stats.append(block_stats)
        else:
            raise ValueError(mode)
        rerouted[old_out] = new_out
        outputs[block.index] = new_out
    aux = None if terms is None else _sum_of(graph, terms, blocks[routed[0]])
    graph.lint()
    return PipelineResult(blocks, routed, stats, outputs, aux)


def _sum_of(graph: Graph, terms: list[Node], block: Block) -> Node:
    """One scalar node: the sum of the terms, or a float32 zero without any (predictor routing)."""
    with graph.inserting_before(graph.output_node()):
        if not terms:
            device = block.x.meta["val"].device
            return call(graph, aten.zeros.default, ([],), {"dtype": torch.float32, "device": device}, stack=block.stack)
        total = terms[0]
        for t in terms[1:]:
            total = call(graph, aten.add.Tensor, (total, t), stack=block.stack)
        return total
