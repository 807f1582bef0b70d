"""Graph snapshots: the rewritten graph of tiny 2-layer models (block 1 routed), rendered by
`modfx.snapshot.render` and compared with tests/snapshots/<name>.txt.

A change to a pass that changes a graph fails here with a diff; review it, and if it is intended,
regenerate every snapshot with

    MODFX_UPDATE_SNAPSHOTS=1 pytest tests/test_snapshots.py

and commit the new .txt files with the change. The snapshots are of the top-k routing graph in eval
mode with the predictor off (predictor=False), so that they stay small and show the routing rewrite.
The node-count tests below pin the routing nodes per block independently of the snapshots.
"""

from __future__ import annotations

import difflib
import os
import pathlib
import re
import warnings

import pytest
import torch

import modfx
from modfx.models import gpt, llama
from modfx.passes.graph_utils import module_paths
from modfx.snapshot import render

SNAPSHOTS = pathlib.Path(__file__).parent / "snapshots"
UPDATE = os.environ.get("MODFX_UPDATE_SNAPSHOTS") == "1"
V, S = 128, 16
# The Hugging Face snapshots are of the transformers release the test extra pins (pyproject.toml); another
# release may build its models with other ops, so there they are skipped, not failed.
SNAPSHOT_TRANSFORMERS = "5.23.0"


def _hf(cls_name, config_name, **kw):
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, cls_name)(getattr(transformers, config_name)(**kw))


MODELS = {
    "llama": lambda: llama.Llama(llama.LlamaConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=V, max_seq_len=64)),
    "gpt": lambda: gpt.GPT(gpt.GPTConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=V, max_seq_len=64)),
    "hf_llama": lambda: _hf("LlamaForCausalLM", "LlamaConfig", vocab_size=V, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                            max_position_embeddings=64, use_cache=False),
    "hf_gpt2": lambda: _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                           use_cache=False, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                           attn_pdrop=0.0),
}

# Side inputs the routed block gathers (token axes of each), per model.
SIDE = {"llama": [(1,), (1,)], "gpt": [], "hf_llama": [(1,), (1,), (2, 3)], "hf_gpt2": [(2, 3)]}


@pytest.fixture(scope="module", params=list(MODELS))
def transformed(request):
    torch.manual_seed(0)
    model = MODELS[request.param]().eval()
    mod = modfx.transform(model, (torch.randint(0, V, (2, S)),), predictor=False)
    return request.param, mod


def test_graph_matches_snapshot(transformed):
    name, mod = transformed
    if name.startswith("hf_"):
        import transformers

        if transformers.__version__ != SNAPSHOT_TRANSFORMERS and not UPDATE:
            pytest.skip(f"snapshot of transformers {SNAPSHOT_TRANSFORMERS}, {transformers.__version__} installed")
    text = render(mod.modfx_graphs[("topk", False)])
    path = SNAPSHOTS / f"{name}.txt"
    if UPDATE:
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"no snapshot {path}; create it with MODFX_UPDATE_SNAPSHOTS=1 pytest tests/test_snapshots.py"
    want = path.read_text()
    if text != want:
        diff = "".join(list(difflib.unified_diff(want.splitlines(True), text.splitlines(True), f"{name}.txt (snapshot)",
                                                 f"{name}.txt (now)"))[:200])
        pytest.fail(f"graph of {name} differs from its snapshot; if intended, regenerate with "
                    f"MODFX_UPDATE_SNAPSHOTS=1 pytest tests/test_snapshots.py\n{diff}")


def test_routing_nodes_per_block(transformed):
    name, mod = transformed
    graph = mod.modfx_graphs[("topk", False)]
    p = modfx.plan(mod)
    assert [b.routed for b in p.blocks] == [False, True]
    for b in p.blocks:
        tagged = [n for n in graph.nodes if "modfx_role" in n.meta and b.name in module_paths(n)]
        roles = [n.meta["modfx_role"] for n in tagged]
        if not b.routed:
            assert roles == [], b.name
            continue
        assert sorted(s.seq_axes for s in b.side_inputs) == SIDE[name]
        gathers = 1 + sum(len(s.seq_axes) for s in b.side_inputs)  # x and the side inputs' token axes
        counts = {r: roles.count(r) for r in set(roles) - {"topk"}}
        # router: the score over S, its detach (ranking only) and the re-score of the k chosen tokens;
        # one top-k over the tokens' keys (built by elementwise "topk" nodes), one sort into causal order
        assert counts == {"router": 3, "sort": 1, "gather": gathers, "scatter": 1}, b.name
        assert [n.target for n in tagged if n.target in (torch.ops.aten.topk.default, torch.ops.aten.sort.stable)] == [
            torch.ops.aten.topk.default], b.name


def test_render_is_normalised(transformed):
    _, mod = transformed
    text = render(mod.modfx_graphs[("topk", False)])
    assert "/" not in text.replace("//", "")  # no file paths (// is floor division in sizes)
    assert not re.search(r"\bs\d+\b", text)  # export's symbols (s72) are renamed B, S, k
    assert "[B, k, " in text and "[B, S, " in text
    lines = [ln for ln in text.splitlines() if " = " in ln]
    assert len(lines) == len({ln.split(" = ")[0] for ln in lines})  # one line per node, unique names
