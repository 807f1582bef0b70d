"""`MoDModule`: the nn.Module that `modfx.transform` returns.

It owns the captured model's parameters under their original names (plus `<block>.mod_router` and
`<block>.mod_predictor`), and a small table of compiled-to-Python FX programs, one per graph variant:
(routing mode, training flag). `forward` flattens the call like the original signature, runs the program
for the current mode with `self` as the owner of every weight, and rebuilds the original output structure.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import types
import warnings

import torch
from torch import nn
from torch.fx import CodeGen, Graph, GraphModule
from torch.utils import _pytree as pytree

from .errors import ModfxError

ROUTING_MODES = ("topk", "predictor")
_instances = itertools.count()


def _size(t: torch.Tensor, dim: int):
    """`aten.sym_size.int` as the program runs it: `t.size(dim)`, which torch.func.vmap answers with the
    per-sample size (the aten op has no batching rule)."""
    return t.size(dim)


def program(owner: nn.Module, graph: Graph):
    """The Python function an FX graph compiles to, taking the module that owns its weights as `self`
    (so every variant reads the same, current parameters and buffers, also after `.to()`)."""
    graph._codegen = CodeGen()  # flat inputs -> flat outputs; MoDModule does the pytree work
    sizes = list(graph.find_nodes(op="call_function", target=torch.ops.aten.sym_size.int))
    for n in sizes:  # only in the generated code: the graph keeps the aten op
        n.target = _size
    try:
        return type(GraphModule(owner, graph)).forward
    finally:
        for n in sizes:
            n.target = torch.ops.aten.sym_size.int


class MoDModule(nn.Module):
    def __new__(cls, *args, **kwargs):
        # Each transformed module gets a forward with a code object of its own: dynamo keeps compiled
        # code per code object, and all instances sharing one would hit its recompile limit after 8.
        fwd = MoDModule.forward
        code = fwd.__code__.replace(co_name=f"forward_{next(_instances)}")
        own = types.FunctionType(code, fwd.__globals__, fwd.__name__, fwd.__defaults__, fwd.__closure__)
        return super().__new__(type(cls.__name__, (cls,), {"forward": own, "__module__": cls.__module__}))

    def __init__(self, owner_of: GraphModule):
        super().__init__()
        for name, child in owner_of.named_children():
            if name != "_guards_fn":  # export's input guards; see adopt_attrs
                self.add_module(name, child)
        for name, p in owner_of.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in owner_of.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in owner_of._non_persistent_buffers_set)
        self._programs: dict[tuple[str, bool], object] = {}
        self.modfx_graphs: dict[tuple[str, bool], Graph] = {}  # the rewritten graphs, for inspection
        self._routing = "topk"
        self._in_spec = None
        self._out_spec = None
        self._n_outputs = 0
        self._kw_order: tuple[str, ...] = ()
        self._input_sizes: tuple = ()  # per flat input: (name, sizes with None for a dynamic axis) or None
        self._n_args = 0  # positional inputs of the example
        self._model_signature: inspect.Signature | None = None  # the model's forward, to rearrange calls
        self._stats: tuple = ()
        self._aux = None  # aux_in_backward=False: the last forward's weighted aux losses (modfx.aux_loss)
        self.modfx_plan = None

    def adopt_attrs(self, gm: GraphModule, graph: Graph) -> None:
        """Make every attribute the graph reads resolvable on self (constants, extra buffers). Export's
        input-guard call is dropped: it indexes the capture's own flat inputs and misfires on programs
        built from other captures; MoDModule.forward checks the call structure itself."""
        for n in list(graph.nodes):
            if n.op == "call_module" and not n.users:
                graph.erase_node(n)
            elif n.op == "call_module":
                raise ModfxError(f"unexpected module call {n.target} in a captured graph")
            elif n.op == "get_attr":
                top = n.target.split(".")[0]
                if not hasattr(self, top):
                    val = getattr(gm, top)
                    if isinstance(val, nn.Module):
                        self.add_module(top, val)
                    elif isinstance(val, torch.Tensor) and not isinstance(val, nn.Parameter):
                        self.register_buffer(top, val, persistent=False)
                    else:
                        setattr(self, top, val)

    def _apply(self, fn, recurse=True):
        """`.to(dtype)` / `.to(device)` / `.half()` ...: a captured graph has dtypes and devices baked in
        (e.g. `x.float()` in a norm), so when they change, the private twin is converted the same way and
        captured again; routers and predictors (already converted) are reused."""
        before = self._placement()
        super()._apply(fn, recurse)
        if getattr(self, "modfx_capture", None) is not None and self._placement() != before:
            from .api import _recapture

            _recapture(self, fn)
        return self

    def __reduce_ex__(self, protocol):
        """Pickle (`torch.save(mod)`, multiprocessing) as `modfx.save` does: the model, example inputs,
        config and weights; unpickling transforms again. The programs are generated code, not data."""
        from .io import rebuild, state

        return rebuild, (state(self),)

    def __copy__(self):
        """A shallow copy shares everything, parameters included, as for any nn.Module (pickling's path,
        which `copy.copy` would otherwise take, transforms again)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo):
        """A copy in this process keeps the programs (they take their owner as an argument)."""
        new = object.__new__(type(self))
        memo[id(self)] = new
        with warnings.catch_warnings():  # deep-copying pytree specs warns on torch 2.13
            warnings.simplefilter("ignore", FutureWarning)
            new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def _placement(self):
        return {(p.dtype, p.device) for p in self.parameters()}

    def forward(self, *args, **kwargs):
        if len(args) != self._n_args or set(kwargs) != set(self._kw_order):
            args, kwargs = self._as_captured(args, kwargs)
        kwargs = {**{k: kwargs[k] for k in self._kw_order if k in kwargs}, **kwargs}  # captured order
        flat, spec = pytree.tree_flatten((tuple(args), kwargs))
        if spec != self._in_spec:
            raise ModfxError(
                "the transformed module was called with arguments whose structure differs from the example "
                f"inputs it was captured with:\n  got      {spec}\n  expected {self._in_spec}\ncall it like the "
                "example, or transform again with example inputs of the structure you will use"
            )
        self._check_sizes(flat)
        self._check_guards(flat)
        program = self._programs[(self._routing, self.training)]
        if torch.compiler.is_compiling():
            outs = program(self, *flat)
        else:
            try:
                outs = program(self, *flat)
            except RuntimeError:
                self._check_no_sharded_submodules()  # a ModfxError where that is the cause
                raise
        n = self._n_outputs
        stats = tuple(outs[n:])
        if not self.modfx_config.aux_in_backward:  # the last output: the aux losses' weighted sum
            stats, self._aux = stats[:-1], stats[-1]
        if not torch._C._are_functorch_transforms_active():  # (which dynamo reads, also inside a compiled
            self._stats = stats  # torch.func transform: there they are per-sample values that die with the call)
        return pytree.tree_unflatten(list(outs[:n]), self._out_spec)

    @torch.compiler.disable
    def _as_captured(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The call rearranged like the example, positional or keyword input by input, as the model's
        signature binds it (mod(input_ids=ids) for a capture from (ids,), and the reverse); unchanged
        when the signature cannot map it (the structure check then says what differs)."""
        sig = self._model_signature
        params = list(sig.parameters.values()) if sig is not None else []
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if sig is None or self._n_args > len(positional):
            return args, kwargs
        try:
            named = dict(sig.bind(*args, **kwargs).arguments)
        except TypeError:
            return args, kwargs
        for p in params:
            if p.kind is p.VAR_KEYWORD:
                named.update(named.pop(p.name, {}))
            elif p.kind is p.VAR_POSITIONAL and named.pop(p.name, ()):
                return args, kwargs
        wanted = positional[: self._n_args]
        if set(named) != {*wanted, *self._kw_order}:
            return args, kwargs
        return tuple(named[n] for n in wanted), {k: named[k] for k in self._kw_order}

    def _check_guards(self, flat: list) -> None:
        """The conditions on input shapes that the model's code relied on at capture (export's input
        guards: a branch on `S % 8 == 0`, a length bound `S <= max_seq_len`); the graphs bake in the path
        taken, so inputs that break one would silently run the wrong code."""
        guards = getattr(self.modfx_capture.modules[self.training], "_guards_fn", None)
        if guards is None:
            return
        if torch.compiler.is_compiling():
            guards(*flat)  # traced: dynamo turns the conditions into its own guards
            return
        try:
            guards(*flat)
        except AssertionError as e:
            raise ModfxError(
                f"these inputs break a condition on input shapes that the model's code relied on when it was "
                f"captured ({str(e).removeprefix('Guard failed: ')}): the transformed graphs contain only the path "
                "the model took for the example, so they cannot run these inputs. Call it with inputs that meet "
                "the condition, or transform again with an example that takes the path you need"
            ) from None

    def _check_no_sharded_submodules(self) -> None:
        """FSDP's fully_shard on a block leaves its parameters sharded (DTensors) until the block's own forward
        hook gathers them, and that hook never runs: the programs run the whole model's graph, not its
        submodules. (fully_shard on the transformed module itself gathers every parameter, and works.)"""
        if not torch.distributed.is_available():
            return
        from torch.distributed.tensor import DTensor

        sharded = [n for n, p in self.named_parameters() if isinstance(p, DTensor)]
        if sharded:
            shown = ", ".join(sharded[:4]) + (f" and {len(sharded) - 4} more" if len(sharded) > 4 else "")
            raise ModfxError(
                f"parameters {shown} are still sharded (DTensors) when the transformed module runs: a submodule "
                "was sharded on its own (e.g. FSDP's fully_shard on a block), and its hooks never run because the "
                "transformed module runs one captured graph of the whole model. Shard the transformed module as "
                "one unit instead: fully_shard(mod), not its blocks"
            ) from None

    def _check_sizes(self, flat: list) -> None:
        """Static axes of the captured inputs (e.g. an image's height) are baked into the graph."""
        for t, want in zip(flat, self._input_sizes):
            if want is None or not isinstance(t, torch.Tensor):
                continue
            name, sizes = want
            if t.dim() != len(sizes) or any(w is not None and w != d for w, d in zip(sizes, t.shape)):
                shown = ", ".join("*" if w is None else str(w) for w in sizes)
                raise ModfxError(
                    f"input {name} has shape {list(t.shape)}, but the transformed module was captured for "
                    f"[{shown}] (* = any size): only the batch and token axes are dynamic. Transform again "
                    "with an example of the shape you will use"
                )
