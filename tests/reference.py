"""A hand-written eager Mixture-of-Depths reference for the models in modfx/models/: gather the top-k
tokens, call the block modules directly on them, scatter x + w * f(x) back. No FX, no modfx passes."""

import math

import torch

from modfx.models import encoder, gpt, llama, moe
from modfx.models.common import rope_at


def embed(model, ids):
    """Hidden state before the first block and the per-token side inputs as (tensor, token axes)."""
    B, S = ids.shape
    if isinstance(model, gpt.GPT):
        x = model.tok_emb(ids) + model.pos_emb(torch.arange(S))
        return model.drop(x), []
    if isinstance(model, (llama.Llama, moe.MoE)):
        cos, sin = rope_at(model.cos, model.sin, S)
        return model.tok_emb(ids), [(cos, (1,)), (sin, (1,))]
    if isinstance(model, encoder.Encoder):
        x = torch.cat([model.cls.expand(B, 1, -1), model.tok_emb(ids)], dim=1)
        x = model.drop(x + model.pos_emb(torch.arange(S + 1)))
        mask = torch.ones(B, 1, 1, S + 1, dtype=torch.bool)
        return x, [(mask, (3,))]
    raise TypeError(type(model))


def gather_tokens(t, idx, axes):
    B = idx.shape[0]
    t = t.expand(B, *t.shape[1:])
    for ax in axes:
        shape = [1] * t.dim()
        shape[0], shape[ax] = B, idx.shape[1]
        index = idx.view(shape).expand(*[s if i != ax else idx.shape[1] for i, s in enumerate(t.shape)])
        t = t.gather(ax, index)
    return t


def mod_forward(model, ids, routers: dict, capacity: float, weighting: str = "raw", positions: str = "original"):
    """routers: block index -> router weight [1, D]. positions="compacted" reproduces the peers' bug
    (gathered tokens given positions 0..k-1), for the test that must tell the two apart."""
    x, side = embed(model, ids)
    B, S, D = x.shape
    for i, layer in enumerate(model.layers):
        args = [t for t, _ in side]
        if i not in routers:
            x = layer(x, *args)
            continue
        r = x @ routers[i].T  # [B, S, 1]
        k = max(1, math.ceil(capacity * S - 1e-9))
        order = torch.sort(r[..., 0], dim=1, descending=True, stable=True).indices
        idx = order[:, :k].sort(dim=1).values  # [B, k]
        xg = x.gather(1, idx[..., None].expand(B, k, D))
        if positions == "original":
            sg = [gather_tokens(t, idx, axes) for t, axes in side]
        else:
            sg = [t[:, :k] if axes == (1,) else t for t, axes in side]
        f = layer(xg, *sg) - xg
        w = {"raw": r, "sigmoid": torch.sigmoid(r), "none": torch.ones_like(r)}[weighting].gather(1, idx[..., None])
        x = x.scatter(1, idx[..., None].expand(B, k, D), xg + w * f)
    return model.head(model.norm(x))


def routers_of(mod, model) -> dict:
    return {
        i: mod.get_submodule(f"layers.{i}.mod_router").weight.detach()
        for i in range(len(model.layers))
        if hasattr(mod.get_submodule(f"layers.{i}"), "mod_router")
    }


def widest_middle_gap(logits: torch.Tensor) -> torch.Tensor:
    """A threshold that splits `logits` about in half at the widest gap between neighbouring values in
    the middle half, so no logit sits within rounding of it (the graph and an eager oracle may round a
    logit differently)."""
    v = logits.flatten().sort().values
    lo, hi = len(v) // 4, 3 * len(v) // 4
    i = lo + int((v[lo + 1 : hi + 1] - v[lo:hi]).argmax())
    return (v[i] + v[i + 1]) / 2
