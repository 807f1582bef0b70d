"""`modfx.plan(mod)`: what the transform found and did, one row per block."""

from __future__ import annotations

import dataclasses

from tabulate import tabulate


@dataclasses.dataclass(frozen=True)
class SideInputPlan:
    name: str  # graph node name
    shape: tuple[str, ...]  # with symbols as the graph has them
    seq_axes: tuple[int, ...]  # gathered along these axes
    broadcast_batch: bool

    def __str__(self):
        return f"{self.name}[{', '.join(self.shape)}] axes {self.seq_axes}"


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    name: str
    index: int
    routed: bool
    capacity: float
    residual: str  # "add chain" (f read off the graph) or "difference" (f = block(x) - x)
    side_inputs: tuple[SideInputPlan, ...]


@dataclasses.dataclass(frozen=True)
class Plan:
    blocks: tuple[BlockPlan, ...]
    config: object
    example_inputs: str

    @property
    def routed(self) -> tuple[BlockPlan, ...]:
        return tuple(b for b in self.blocks if b.routed)

    def __str__(self):
        rows = [
            (b.index, b.name, "yes" if b.routed else "-", f"{b.capacity:g}" if b.routed else "1",
             b.residual, "; ".join(map(str, b.side_inputs)) if b.routed else "")
            for b in self.blocks
        ]
        table = tabulate(rows, headers=["#", "block", "routed", "capacity", "residual", "side inputs gathered"])
        return f"modfx plan: {len(self.routed)}/{len(self.blocks)} blocks routed; inputs {self.example_inputs}\n{table}"


def _shape(node) -> tuple[str, ...]:
    return tuple(str(s) for s in node.meta["val"].shape)


def _describe(x) -> str:
    import torch
    from torch.utils import _pytree as pytree

    leaves = pytree.tree_leaves(x)
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" if isinstance(t, torch.Tensor) else repr(t) for t in leaves)


def make_plan(result, config, cap) -> Plan:
    blocks = tuple(
        BlockPlan(
            b.name,
            b.index,
            b.index in result.routed,
            float(config.capacity),
            "add chain" if b.residual_terms is not None else "difference",
            tuple(SideInputPlan(s.node.name, _shape(s.node), s.seq_axes, s.broadcast_batch) for s in b.side_inputs),
        )
        for b in result.blocks
    )
    return Plan(blocks, config, _describe(cap.example_inputs))
