"""Save, load and export transformed modules.

- `save(mod, path)` / `load(path)`: the private copy of the user's model (pickled, so its classes must be
  importable when loading), the example inputs, the `MoDConfig` and the full state_dict (routers and
  predictors included); `load` transforms again and restores the weights, giving identical outputs.
  Pickling a transformed module (`torch.save(mod)`, multiprocessing) stores and rebuilds the same.
- `export(mod, path)`: a self-contained `torch.export` program of the routed model (`.pt2`, runs without
  the model's Python source), for the current routing mode, in eval mode, with dynamic batch and sequence.
  It takes the example's inputs positionally (its positional inputs, then its keyword inputs in order)
  and returns the model's output leaves as a tuple (e.g. `(logits,)`), so no output class is needed.
- `export_aoti(mod, path)`: an AOTInductor package of the same program, where the installed torch has it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils import _pytree as pytree

from .config import MoDConfig
from .errors import ModfxError
from .module import MoDModule


def _check(mod) -> MoDModule:
    if not isinstance(mod, MoDModule):
        raise ModfxError(f"expected a module returned by modfx.transform, got {type(mod).__name__}")
    return mod


def state(mod: MoDModule) -> dict:
    """What it takes to rebuild `mod`: its model, example inputs, config, mode and weights (no code)."""
    cap = mod.modfx_capture
    return {
        "format": "modfx/1",
        "model": cap.twin,
        "example_inputs": cap.example_inputs,
        "config": mod.modfx_config,
        "routing": mod._routing,
        "training": mod.training,
        "state_dict": mod.state_dict(),
    }


def rebuild(blob: dict) -> MoDModule:
    """Transform `blob["model"]` again and restore the weights, mode and routing of `state(mod)`."""
    from .api import set_routing, transform

    args, kwargs = blob["example_inputs"]
    mod = transform(blob["model"], args, _saved_widths(blob["config"], blob["state_dict"]), example_kwargs=kwargs)
    mod.load_state_dict(blob["state_dict"])
    mod.train(blob["training"])
    return set_routing(mod, blob["routing"])


def _saved_widths(config: MoDConfig, state_dict: dict) -> MoDConfig:
    """The config with the predictor width the saved weights have, where it was left to the default (which
    changed from max(d // 32, 16) to one less on 2026-12-04, commit 843a86c)."""
    widths = {v.shape[0] for k, v in state_dict.items() if k.endswith(".mod_predictor.0.weight")}
    if config.predictor and config.predictor_hidden is None and len(widths) == 1:
        return dataclasses.replace(config, predictor_hidden=widths.pop())
    return config


def save(mod: MoDModule, path) -> None:
    torch.save(state(_check(mod)), path)


def load(path, map_location=None) -> MoDModule:
    blob = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(blob, dict) or blob.get("format") != "modfx/1":
        raise ModfxError(f"{path} is not a file written by modfx.save")
    return rebuild(blob)


class _FlatOutputs(torch.nn.Module):
    """The routed model taking its inputs positionally (the example's positional inputs, then its keyword
    inputs in the example's order: torch.export cannot make keyword-only inputs dynamic here) and
    returning its output leaves as a tuple: an artifact that needs no Python class of the user's (a
    custom output type would have to be importable where the artifact is loaded)."""

    def __init__(self, mod: MoDModule, keywords: tuple[str, ...]):
        super().__init__()
        self.mod = mod
        self.keywords = keywords

    def forward(self, *inputs):
        n = len(inputs) - len(self.keywords)
        out = self.mod(*inputs[:n], **dict(zip(self.keywords, inputs[n:])))
        return tuple(pytree.tree_leaves(out))


def _exported(mod: MoDModule) -> torch.export.ExportedProgram:
    from .capture import dynamic_shapes_for

    args, kwargs = mod.modfx_capture.example_inputs
    dyn_args, dyn_kwargs = dynamic_shapes_for(args, kwargs)
    was = mod.training
    mod.eval()
    try:
        with torch.no_grad():
            return torch.export.export(_FlatOutputs(mod, tuple(kwargs)), (*args, *kwargs.values()), strict=False,
                                       dynamic_shapes={"inputs": (*dyn_args, *dyn_kwargs.values())})
    finally:
        mod.train(was)


def export(mod: MoDModule, path) -> torch.export.ExportedProgram:
    """Write a `.pt2` of the routed program; reload with `torch.export.load(path).module()`."""
    ep = _exported(_check(mod))
    torch.export.save(ep, path)
    return ep


def export_aoti(mod: MoDModule, path) -> str:
    """Compile the routed program ahead of time with AOTInductor into a package at `path`; reload it
    with `torch._inductor.aoti_load_package(path)`."""
    compile_and_package = getattr(torch._inductor, "aoti_compile_and_package", None)
    if compile_and_package is None:
        raise ModfxError(f"this torch ({torch.__version__}) has no AOTInductor packaging")
    return compile_and_package(_exported(_check(mod)), package_path=str(path))
