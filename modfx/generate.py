"""`modfx.generate`: autoregressive sampling with per-block KV caches that hold only routed tokens.

Prefill runs the prompt through the predictor-routing graph (causal routing) and keeps, per block, the
keys and values of the tokens that entered it; each decode step runs a one-token capture rewritten by
`passes/kv_cache.py`, where a routed block the predictor skips executes nothing (torch.cond).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings

import torch
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from .capture import capture
from .errors import ModfxError
from .module import MoDModule, program
from .passes import run_pipeline
from .passes.discover import find_blocks
from .passes.graph_utils import input_over, module_paths, op_arg
from .passes.decode_positions import positions_from_input
from .passes.kv_cache import DecodeSignature, expose_prefill, rewrite_decode
from .passes.predictor import _ATTENTION


@dataclasses.dataclass
class Decoder:
    prefill: object  # program(mod, ids) -> user outputs, stats, (k, v) per attention op, sel per routed block
    decode: object  # program(mod, ids, pos, *caches) -> user outputs, (k, v) per attention op, sel per routed
    sig: DecodeSignature
    n_stats: int
    pos_name: str | None  # None: the model numbers its tokens itself, and the rows share positions
    out_spec: object  # output structure of both programs' user outputs
    prompt_graph: GraphModule  # the captured prompt graph, unrewritten: probed for its attention masks
    causal_upto: int = 0  # the length up to which every attention mask was found plainly causal


def _copy(graph):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(graph)


def _position_params(model) -> tuple[list[str], list[str]]:
    """(forward parameters that take absolute token positions, e.g. `input_pos` or `position_ids`; those
    that take one int offset, e.g. Meta Llama's `start_pos`)."""
    params = [p for p in inspect.signature(model.forward).parameters.values() if "pos" in p.name]
    offsets = [p.name for p in params if p.annotation in (int, "int") or type(p.default) is int]
    return [p.name for p in params if p.name not in offsets], offsets


def _no_positions(model) -> ModfxError:
    offsets = _position_params(model)[1]
    offset = f" ({', '.join(offsets)} takes one int offset, not a position per token)" if offsets else ""
    return ModfxError(
        f"generate needs {type(model).__name__}.forward to accept token positions (a parameter such as "
        f"`input_pos` or `position_ids`, a tensor [B, S]){offset}, or to number its tokens with "
        "`torch.arange(S)`, so that a decoded token gets its true position"
    )


def decoder(mod: MoDModule, dense: bool = False) -> Decoder:
    """Build (once) the prefill and decode programs of a transformed module; dense=True builds them
    with no block routed (the dense baseline, with the same KV caches)."""
    decoders = mod.__dict__.setdefault("modfx_decoders", {})
    if dense in decoders:
        return decoders[dense]
    cap, config = mod.modfx_capture, mod.modfx_config
    # generate puts each prompt's real tokens first (`_real_tokens_first`) and captures the ids alone, so the
    # programs never see the padding mask the transform named; the predictor routes token by token
    config = dataclasses.replace(config, padding_mask=None)
    if not config.predictor and not dense:
        raise ModfxError("generate routes with the predictor: transform with predictor=True (the default)")
    if len(cap.seq_exprs) > 1:
        raise ModfxError(f"generate samples decoder-only models; this module routes {len(cap.seq_exprs)} stacks "
                         f"(token_input={config.token_input!r}), which generate does not drive")
    twin = cap.twin
    first = next(iter(inspect.signature(twin.forward).parameters), None)
    routed = input_over(next(iter(cap.graphs.values())), cap.seq_expr)  # the input the routed tokens come from
    routed = routed.name if routed is not None else None
    if routed is not None and routed != first:
        raise ModfxError(
            f"generate samples decoder-only models, whose routed blocks run over their first input ({first}); "
            f"this module routes the blocks over the tokens of {routed!r} (e.g. the decoder of an encoder-decoder "
            "model), which generate does not drive"
        )
    was_training = twin.training
    twin.eval()
    args, kwargs = cap.example_inputs
    ids = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() == 2
               and not t.is_floating_point())
    try:
        # the prompt alone, in eval mode: the transform's own capture when its example was the ids alone,
        # else a capture of the ids (the example may hold more, e.g. labels)
        alone = len(args) == 1 and args[0] is ids and not kwargs
        pre = cap if alone else capture(twin, (ids,), {}, copy_model=False)
        g = _copy(pre.graphs[False])
        if dense:
            blocks, stats, sel_of = find_blocks(g, pre.seq_expr), [], {}
        else:
            result = run_pipeline(g, mod, config, pre.seq_expr, "predictor")
            blocks, stats = result.blocks, result.stats
            sel_of = {i: n.meta["modfx_sel"] for i, n in result.outputs.items()}
        out = g.output_node()
        out.args = (tuple(out.args[0]) + tuple(stats),)
        expose_prefill(g, blocks, sel_of)
        mod.adopt_attrs(pre.modules[False], g)
        prefill = program(mod, g)

        pos_name = next(iter(_position_params(twin)[0]), None)  # None: see passes/decode_positions.py
        dev = ids.device
        ids = torch.zeros((2, 3), dtype=ids.dtype, device=dev)
        given = {pos_name: torch.arange(3, device=dev).expand(2, 3)} if pos_name else {}
        dec = capture(twin, (ids,), given, copy_model=False)
        dg = _copy(dec.graphs[False])
        if pos_name is None and not positions_from_input(dg, dec.seq_expr):
            raise _no_positions(twin)
        blocks = find_blocks(dg, dec.seq_expr)
        routed = () if dense else config.routed(len(blocks))
        sig = rewrite_decode(dg, mod, blocks, routed, config)
        mod.adopt_attrs(dec.modules[False], dg)
        decode = program(mod, dg)
    finally:
        twin.train(was_training)
    decoders[dense] = Decoder(prefill, decode, sig, len(stats), pos_name, pre.out_spec, pre.modules[False])
    return decoders[dense]


class _AttentionMasks(torch.fx.Interpreter):
    """Runs a captured graph and keeps, per attention op, (its node, attn_mask, is_causal)."""

    def __init__(self, gm: GraphModule):
        super().__init__(gm)
        self.found: list[tuple] = []

    def call_module(self, target, args, kwargs):
        if target == "_guards_fn":  # export's input guards, written for the capture's own call
            return None
        return super().call_module(target, args, kwargs)

    def run_node(self, n):
        out = super().run_node(n)
        if n.op == "call_function" and n.target is _ATTENTION:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.found.append((n, op_arg(n.target, args, kwargs, "attn_mask"),
                               op_arg(n.target, args, kwargs, "is_causal", False)))
        return out


def _plainly_causal(mask, is_causal: bool, length: int) -> bool:
    """True if attention with (mask, is_causal) lets token i see exactly tokens 0..i, with no bias."""
    tril = torch.ones(length, length, dtype=torch.bool).tril()
    if mask is None:
        return bool(is_causal)
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        blocked = mask <= torch.finfo(mask.dtype).min / 2  # -inf or the dtype's min
        if not bool(((mask == 0) | blocked).all()):
            return False  # an additive bias (e.g. ALiBi) on allowed pairs
        allowed = ~blocked
    return bool((allowed.cpu() == tril).all())


def _check_causal_masks(dec: Decoder, length: int, device) -> None:
    """The decode step attends over the cached tokens with `slot < len` and to itself: right only where
    the model's own mask is plainly causal. Probe the prompt graph at `length` tokens (once per length
    above the largest checked) and refuse a sliding window or an attention bias."""
    if length <= dec.causal_upto:
        return
    probe = _AttentionMasks(dec.prompt_graph)
    with torch.no_grad():
        probe.run(torch.zeros(1, length, dtype=torch.long, device=device))
    for node, mask, is_causal in probe.found:
        if not _plainly_causal(mask, is_causal, length):
            where = (module_paths(node) or ["?"])[-1]
            raise ModfxError(
                f"generate cannot decode this model at {length} tokens: the attention in {where} does not use a "
                "plain causal mask there (a sliding window, or an attention bias such as ALiBi?). The KV caches "
                "keep only the routed tokens, not their positions, so a decode step cannot rebuild that mask. "
                "Full-sequence causal routing (modfx.set_routing(mod, 'predictor')) handles it."
            )
    dec.causal_upto = length


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        v = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < v, float("-inf"))
    return torch.multinomial(torch.softmax(logits.float(), -1), 1)[..., 0]


def _logits(user_outputs, out_spec) -> torch.Tensor:
    """The logits [B, S, V] among the model's outputs: its `.logits`, the output itself, or the first
    output of 3 axes (nanoGPT's `(logits, loss)`, a dict of them)."""
    out = pytree.tree_unflatten(list(user_outputs), out_spec)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, torch.Tensor):
        return out
    found = next((t for t in user_outputs if isinstance(t, torch.Tensor) and t.dim() == 3), None)
    if found is None:
        raise ModfxError(f"generate samples from the model's logits [B, S, V]; its outputs ({type(out).__name__}) "
                         "hold no tensor of 3 axes and no `.logits`")
    return found


def _real_tokens_first(input_ids: torch.Tensor, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids with each row's real tokens moved to its front, in order, [B, P]; real-token count [B]).
    A prompt padded anywhere (left, as Hugging Face pads for generation, or right) becomes right-padded:
    causal attention keeps the padding after every real token out of their sight, and the model's own
    positions 0..n-1 are the real tokens' positions."""
    if attention_mask is None:
        return input_ids, torch.full(input_ids.shape[:1], input_ids.shape[1], device=input_ids.device)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        got = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ModfxError(f"attention_mask must be a tensor shaped like input_ids {list(input_ids.shape)} "
                         f"(nonzero = real token, 0 = padding), got {got}")
    real = attention_mask.to(input_ids.device) != 0
    n = real.sum(1)
    if bool((n == 0).any()):
        raise ModfxError(f"attention_mask marks no real token in rows {(n == 0).nonzero()[:, 0].tolist()}: every "
                         "prompt needs at least one")
    return input_ids.gather(1, _firsts(real)), n


def _firsts(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the positions where `mask` [B, P] holds first, in order, then the others: [B, P]."""
    return torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices


@torch.no_grad()
def generate(mod: MoDModule, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask=None,
             temperature: float = 0.0, top_k: int | None = None, compile: bool = False,
             return_logits: bool = False, dense: bool = False):
    """Sample `max_new_tokens` tokens after `input_ids` [B, P], routing with the predictor.

    Every block keeps a KV cache of only the tokens that entered it, at their true positions; at a
    decode step a routed block whose predictor skips every row executes nothing. Returns the ids
    [B, P + max_new_tokens] (and the logits of each new token [B, N, V] with return_logits=True).
    attention_mask [B, P] (nonzero = real token) lets a batch hold prompts of different lengths, padded on
    either side: each row continues its own real tokens, and the new tokens follow the given ids.
    compile=True compiles the decode step with Inductor (one graph); dense=True runs every block on every
    token (the dense model with the same caches, as a baseline).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ModfxError("generate expects input_ids of shape [B, P] with P >= 1")
    prompt, n_real = _real_tokens_first(input_ids, attention_mask)  # [B, P], [B]
    real = torch.arange(input_ids.shape[1], device=input_ids.device) < n_real[:, None]  # [B, P]
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ModfxError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ModfxError(f"top_k must be None (no limit) or an integer >= 1, got {top_k!r}")
    dec = decoder(mod, dense)
    if dec.pos_name is None and bool((n_real != n_real[0]).any()):
        raise ModfxError(
            f"{type(mod.modfx_capture.twin).__name__} numbers its tokens itself (arange), so the rows of a decode "
            f"step share their positions, but these prompts have {sorted(set(n_real.tolist()))} real tokens: "
            "generate prompts of one length together, or give forward a positions parameter (e.g. `input_pos`)"
        )
    _check_causal_masks(dec, input_ids.shape[1] + max_new_tokens, input_ids.device)
    n_out = dec.out_spec.num_leaves
    B, P = input_ids.shape
    L = P + max_new_tokens
    rows = torch.arange(B, device=input_ids.device)
    outs = dec.prefill(mod, prompt)
    logits = _logits(outs[:n_out], dec.out_spec)[rows, n_real - 1]  # [B, V] at each row's last real token
    rest = outs[n_out + dec.n_stats:]
    n_attn = len(dec.sig.attention)
    kv, sels = rest[: 2 * n_attn], dict(zip(dec.sig.routed, rest[2 * n_attn:]))
    lens = {i: torch.full((B,), P, dtype=torch.int64, device=input_ids.device) for i in set(dec.sig.attention)}
    caches = []
    for j, blk in enumerate(dec.sig.attention):
        k, v = kv[2 * j], kv[2 * j + 1]  # [B, H, P, hd]
        keep = sels[blk] & real if blk in sels else real  # padding never enters a cache
        order = _firsts(keep)  # entered tokens first, in order
        K = k.new_zeros(*k.shape[:-2], L, k.shape[-1])
        V = v.new_zeros(*v.shape[:-2], L, v.shape[-1])
        index = order[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
        K[..., :P, :] = k.gather(2, index)
        V[..., :P, :] = v.gather(2, index)
        lens[blk] = keep.sum(1)
        caches.append((K, V))
    step = dec.decode
    if compile:
        step = torch.compile(step, fullgraph=True)
    ids, new_logits = input_ids, []
    for t in range(max_new_tokens):
        new_logits.append(logits)
        tok = _sample(logits, temperature, top_k)[:, None]  # [B, 1]
        ids = torch.cat([ids, tok], 1)
        if t == max_new_tokens - 1:
            break
        pos = (n_real + t)[:, None]  # [B, 1]: each row's next position
        extra = []
        for blk in dict.fromkeys(dec.sig.attention):
            extra.append(lens[blk])
            extra += [c for j, b in enumerate(dec.sig.attention) if b == blk for c in caches[j]]
        outs = step(mod, tok, pos, *extra)
        logits = _logits(outs[:n_out], dec.out_spec)[:, -1]
        rest = outs[n_out:]
        kv, step_sel = rest[: 2 * n_attn], dict(zip(dec.sig.routed, rest[2 * n_attn:]))
        for j, blk in enumerate(dec.sig.attention):
            K, V = caches[j]
            K[rows, :, lens[blk]] = kv[2 * j][:, :, 0]
            V[rows, :, lens[blk]] = kv[2 * j + 1][:, :, 0]
        for blk in lens:
            lens[blk] = lens[blk] + (step_sel[blk].long() if blk in step_sel else 1)
    return (ids, torch.stack(new_logits, 1)) if return_logits else ids
