"""The modfx pipeline, in one place:

    capture (torch.export)            modfx/capture.py
    -> discover blocks                passes/discover.py
    -> insert routers                 passes/router.py
    -> route: top-k, gather, block on k tokens, scatter      passes/route_topk.py
    -> predictor branch (BCE aux loss, stats)                passes/predictor.py
    -> FLOP budget check                                     passes/flops.py (run by modfx.transform)

`run_pipeline` rewrites one captured graph in place for one routing mode; `modfx.transform` runs it for
every graph variant (train/eval capture x top-k/predictor routing), sharing the routers' parameters.
"""

from __future__ import annotations

import dataclasses

import sympy
from torch import nn
from torch.fx import Graph

from ..config import MoDConfig
from .discover import Block, find_blocks
from .router import insert_router
from .route_topk import route_topk


@dataclasses.dataclass
class PipelineResult:
    blocks: list[Block]
    routed: tuple[int, ...]
    stats: list  # extra graph outputs (predictor loss / accuracy per routed block), in order


def run_pipeline(graph: Graph, root: nn.Module, config: MoDConfig, seq_expr: sympy.Expr | None,
                 mode: str = "topk") -> PipelineResult:
    blocks = find_blocks(graph, seq_expr)
    routed = config.routed(len(blocks))
    stats = []
    for block in blocks:
        if block.index not in routed:
            continue
        r = insert_router(graph, root, block)
        if mode == "topk":
            route_topk(graph, block, r, config.capacity_fraction, config.weighting)
        else:
            raise NotImplementedError(mode)
    graph.lint()
    return PipelineResult(blocks, routed, stats)
