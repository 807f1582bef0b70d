"""`MoDConfig`: what to route and how."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

from .errors import ModfxError

WEIGHTINGS = ("raw", "sigmoid", "none", "ste")


def predictor_width(d_model: int) -> int:
    """Default hidden width of the predictor MLP. Its FLOPs over all S tokens, 2*S*d*h, are h / (1.5 d) of a
    routed block's ~24*k*d^2 at k = S/8: about d // 32 keeps that near 2% (d // 8 cost 7.4% of the block's
    time). One less than a multiple of 16, so that the router's column and the predictor's first layer form
    one GEMM of 16n columns (passes/fuse_scores.py): a CPU's 16-lane tile, where 17 columns cost ~0.2 ms more."""
    return max(d_model // 32, 16) - 1


@dataclasses.dataclass(frozen=True)
class MoDConfig:
    """Configuration of the Mixture-of-Depths transform.

    capacity: fraction of the sequence a routed block processes; k = ceil(capacity * S), at least 1.
    every: route every `every`-th block, starting with the second (blocks 1, 3, 5, ... for every=2;
        1, 4, 7, ... for every=3; all blocks for every=1).
    blocks: explicit block indices to route; overrides `every`.
    weighting: how the router score r scales the block's contribution f(x) for a chosen token:
        "raw" x + r * f(x) (the paper), "sigmoid" x + sigmoid(r) * f(x), "none" x + f(x) (select only),
        "ste" x + (1 + r - stopgrad(r)) * f(x) (forward unchanged, router learns by straight-through).
    predictor: add the causal predictor branch (a small MLP on stopgrad(x), BCE vs top-k membership).
    predictor_hidden: hidden width of the predictor MLP (default `predictor_width(d_model)`:
        max(d_model // 32, 16) - 1, about 2% of a routed block's FLOPs at capacity 0.125).
    aux_loss_weight: weight of the predictor's BCE loss, injected into the backward pass.
    router_aux_weight: weight of a BCE loss on the router's own score against top-k membership (the
        paper's other option for causal sampling): it pushes chosen tokens' r above 0 and the others'
        below, so that the top-k decision becomes predictable from a token alone. Off (0) by default.
    aux_in_backward: True: those aux losses ride along in `backward()` at their weights, whatever scale the
        loss you differentiate has. False: they are left out of backward, and `modfx.aux_loss(mod)` returns
        their weighted sum from the last forward, to add to your loss; needed when the loss is scaled
        (torch.amp.GradScaler, or loss / n per micro-batch in gradient accumulation), which the injected
        gradient cannot see.
    padding_mask: name of a model input that marks real tokens (nonzero / True) and padding (0 / False),
        shaped [B, S] over the routed blocks' tokens (e.g. Hugging Face's "attention_mask"): padded tokens
        rank below every real token in the top-k, so they take a routed slot only when a sequence has fewer
        than k real tokens, and predictor routing never selects them. None: every token competes.
    token_input: name of the model input whose token axis the routed blocks run over. None: the first
        input's axis 1 (e.g. input_ids), or axis 0 of a sequence-first model. In an encoder-decoder model
        this picks the stack: "decoder_input_ids" routes the decoder (the encoder then runs dense). A tuple
        of names routes one stack per name, e.g. ("input_ids", "decoder_input_ids") both stacks, each at
        its own k; `every` and `blocks` then count the blocks of all stacks together, in graph order.
    check_flops: run the FLOP budget check after the rewrite.
    """

    capacity: float = 0.125
    every: int = 2
    blocks: tuple[int, ...] | None = None
    weighting: str = "raw"
    predictor: bool = True
    predictor_hidden: int | None = None
    aux_loss_weight: float = 0.01
    router_aux_weight: float = 0.0
    aux_in_backward: bool = True
    padding_mask: str | None = None
    token_input: str | tuple[str, ...] | None = None
    check_flops: bool = True

    def __post_init__(self):
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, (int, float)):
            raise ModfxError(f"capacity must be a number in (0, 1], got {self.capacity!r}")
        if not 0.0 < float(self.capacity) <= 1.0:
            raise ModfxError(
                f"capacity must be in (0, 1] (the fraction of tokens a routed block processes), "
                f"got {self.capacity}; e.g. capacity=0.125 routes 12.5% of the tokens"
            )
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ModfxError(f"every must be an integer >= 1 (route every n-th block), got {self.every!r}")
        if self.blocks is not None:
            blocks = tuple(self.blocks)
            if not blocks:
                raise ModfxError("blocks is empty: give at least one block index to route, or blocks=None to use `every`")
            if any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in blocks):
                raise ModfxError(f"blocks must be non-negative integer block indices, got {self.blocks!r}")
            if len(set(blocks)) != len(blocks):
                raise ModfxError(f"blocks has repeated indices: {self.blocks!r}")
            object.__setattr__(self, "blocks", tuple(sorted(blocks)))
        if self.weighting not in WEIGHTINGS:
            raise ModfxError(f"unknown weighting {self.weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        if self.predictor_hidden is not None and (not isinstance(self.predictor_hidden, int) or self.predictor_hidden < 1):
            raise ModfxError(f"predictor_hidden must be a positive integer or None, got {self.predictor_hidden!r}")
        if not float(self.aux_loss_weight) >= 0.0:
            raise ModfxError(f"aux_loss_weight must be >= 0, got {self.aux_loss_weight!r}")
        if self.padding_mask is not None and not isinstance(self.padding_mask, str):
            raise ModfxError(f"padding_mask must be the name of a model input (a str) or None, got {self.padding_mask!r}")
        if isinstance(self.token_input, (tuple, list)):
            names = tuple(self.token_input)
            if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
                raise ModfxError(f"token_input must name distinct model inputs, got {self.token_input!r}")
            object.__setattr__(self, "token_input", names[0] if len(names) == 1 else names)
        elif self.token_input is not None and not isinstance(self.token_input, str):
            raise ModfxError(f"token_input must be the name of a model input (a str), a tuple of names, or None, "
                             f"got {self.token_input!r}")
        if not float(self.router_aux_weight) >= 0.0:
            raise ModfxError(f"router_aux_weight must be >= 0, got {self.router_aux_weight!r}")

    def __setstate__(self, state: dict) -> None:
        """Unpickling (modfx.load): fields added since the save take their defaults."""
        self.__dict__.update({f.name: f.default for f in dataclasses.fields(self)}, **state)

    @property
    def token_inputs(self) -> tuple[str | None, ...]:
        """The inputs whose stacks are routed, one per stack: (None,) for the default."""
        return self.token_input if isinstance(self.token_input, tuple) else (self.token_input,)

    @property
    def capacity_fraction(self) -> Fraction:
        """capacity as an exact fraction, so k = ceil(num * S / den) stays in integer arithmetic."""
        return Fraction(self.capacity).limit_denominator(1 << 16)

    def k(self, seq_len: int) -> int:
        """Tokens a routed block processes at sequence length `seq_len`: ceil(capacity * S), at least 1."""
        c = self.capacity_fraction
        return max(1, -(-seq_len * c.numerator // c.denominator))

    def routed(self, n_blocks: int) -> tuple[int, ...]:
        """Indices of the blocks to route among `n_blocks` found."""
        if self.blocks is not None:
            bad = [b for b in self.blocks if b >= n_blocks]
            if bad:
                raise ModfxError(
                    f"blocks {bad} out of range: the model has {n_blocks} blocks (indices 0..{n_blocks - 1})"
                )
            return self.blocks
        return tuple(i for i in range(n_blocks) if i % self.every == 1 % self.every)
