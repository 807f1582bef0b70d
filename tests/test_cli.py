"""The `modfx` command line, in-process on tiny models: bench (table + --json), inspect, flops."""

import json
import re
import subprocess
import sys

import pytest

from modfx import cli

TINY = ["--layers", "2", "--d-model", "32", "--heads", "4", "--seq", "32", "--batch", "2"]
VARIANTS = ["dense eager", "dense compiled", "MoD eager", "MoD compiled"]


def test_bench_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert cli.main(["bench", *TINY, "--repeat", "1", "--warmup", "0", "--cache", "--json", str(path)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    for col in ["variant", "GFLOPs (forward)", "ideal speedup", "median ms", "min-max ms",
                "speedup vs dense compiled", "fraction of ideal", "compile s", "peak MiB", "graph breaks"]:
        assert col in out
    lines = out.splitlines()
    for v in VARIANTS:
        assert sum(line.startswith(v + " ") for line in lines) == 1, v
    assert "compiling" in captured.err  # progress goes to stderr

    res = json.loads(path.read_text())
    assert set(res["versions"]) >= {"python", "torch", "modfx"}
    assert set(res["machine"]) >= {"platform", "cpu_count"}
    assert res["k"] == 4 and res["routed_blocks"] == ["layers.1"] and res["n_blocks"] == 2
    rows = {r["variant"]: r for r in res["rows"]}
    assert list(rows) == VARIANTS
    for r in rows.values():
        assert "error" not in r and len(r["times_ms"]) == 1 and r["median_ms"] > 0 and r["peak_mb"] >= 0
    assert rows["dense compiled"]["speedup"] == 1.0
    assert rows["MoD compiled"]["graph_breaks"] == 0 and rows["dense compiled"]["graph_breaks"] == 0
    assert rows["MoD compiled"]["compile_s"] >= 0
    assert rows["MoD eager"]["flops"] == rows["MoD compiled"]["flops"] < rows["dense eager"]["flops"]
    ideal = rows["dense eager"]["flops"] / rows["MoD compiled"]["flops"]
    assert rows["MoD compiled"]["ideal_speedup"] == pytest.approx(ideal)
    mc = rows["MoD compiled"]
    assert mc["fraction_of_ideal"] == pytest.approx(mc["speedup"] / mc["ideal_speedup"])


def test_inspect(capsys):
    assert cli.main(["inspect", *TINY]) == 0
    out = capsys.readouterr().out
    assert "modfx plan: 1/2 blocks routed" in out
    assert "layers.1" in out and "graph (topk, eval)" in out
    assert "router" in out and "mod_router" in out  # the inserted router shows in the graph
    assert out.rstrip().splitlines()[-1].startswith("return")


def test_flops_hf(capsys):
    pytest.importorskip("transformers")
    assert cli.main(["flops", "--hf", "gpt2", *TINY]) == 0
    out = capsys.readouterr().out
    assert "modfx flops" in out and "routing overhead" in out
    assert "dense GFLOPs" in out and "MoD GFLOPs" in out and "ideal speedup" in out
    fwd = [line for line in out.splitlines() if line.startswith("forward ")][-1]  # the dense vs MoD table
    assert float(fwd.split()[-1].rstrip("x")) > 1.0


def test_python_m_modfx():
    r = subprocess.run([sys.executable, "-m", "modfx", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and all(c in r.stdout for c in ("bench", "inspect", "flops"))


@pytest.mark.parametrize("flags, message", [
    (["--capacity", "0"], "modfx: error: capacity must be in"),
    (["--every", "0"], "modfx: error: every must be"),
    (["--seq", "0"], "--seq: must be a positive integer"),
    (["--heads", "3"], "must be a multiple of --heads 3"),
    (["--d-model", "24", "--heads", "8"], "head dimension .* must be even"),
])
def test_bad_flag_values_end_in_a_one_line_error(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["inspect", *TINY, *flags])
    shown = exit_.value.code if isinstance(exit_.value.code, str) else capsys.readouterr().err
    assert re.search(message, shown) and "Traceback" not in shown


def test_hf_config_builds_the_architecture_a_local_config_describes(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    transformers.Phi3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                            num_key_value_heads=2, pad_token_id=0).save_pretrained(tmp_path)
    # (ids drawn from the default --vocab 256 would index past the config's 96 embeddings)
    assert cli.main(["inspect", "--hf-config", str(tmp_path), "--layers", "2", "--seq", "32"]) == 0
    out = capsys.readouterr().out
    assert "modfx plan: 1/2 blocks routed" in out and "model.layers.1" in out  # --layers replaced the config's 6


def test_hf_config_that_cannot_be_read_ends_in_a_one_line_error(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(SystemExit, match=r"modfx: error: --hf-config .*missing: no such file or directory"):
        cli.main(["flops", "--hf-config", str(tmp_path / "missing")])


def test_token_input_routes_the_decoder_of_an_encoder_decoder_config(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    transformers.BartConfig(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                            dropout=0.0).save_pretrained(tmp_path)
    assert cli.main(["flops", "--hf-config", str(tmp_path), "--seq", "32", "--token-input", "decoder_input_ids"]) == 0
    out = capsys.readouterr().out
    assert "model.decoder.layers.1  yes" in out and "S_input_ids=32" in out  # the encoder's tokens, not routed
    assert cli.main(["flops", "--hf-config", str(tmp_path), "--seq", "32", "--token-input", "input_ids,decoder_input_ids"]) == 0
    out = capsys.readouterr().out
    assert "model.encoder.layers.1  yes" in out and "model.decoder.layers.1  yes" in out and "k_input_ids=4" in out


def test_hf_config_layers_sets_every_stack_and_configs_without_token_inputs_are_refused(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    transformers.BartConfig(vocab_size=96, d_model=32, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                            dropout=0.0).save_pretrained(tmp_path / "bart")
    assert cli.main(["inspect", "--hf-config", str(tmp_path / "bart"), "--layers", "2", "--seq", "16",
                     "--token-input", "decoder_input_ids"]) == 0
    assert "modfx plan: 1/2 blocks routed" in capsys.readouterr().out  # the decoder has 2 layers, not 3
    transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4).save_pretrained(tmp_path / "vit")
    with pytest.raises(SystemExit, match=r"a vit config has no vocab_size; the modfx command builds token-id inputs"):
        cli.main(["flops", "--hf-config", str(tmp_path / "vit")])


FACTORY = '''
import torch
from torch import nn


class Tiny(nn.Module):  # the user's own model: layers written inline in the loop
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(96, 32)
        self.layers = nn.ModuleList([nn.ModuleList([nn.Linear(32, 32), nn.Linear(32, 32)]) for _ in range(4)])
        self.head = nn.Linear(32, 96)

    def forward(self, ids):
        x = self.emb(ids)
        for a, b in self.layers:
            x = x + b(torch.relu(a(x)))
        return self.head(x)


def make():
    return Tiny()


not_a_model = lambda: 3  # noqa: E731
'''


def test_factory_benchmarks_the_users_own_model_from_a_file(tmp_path, capsys):
    (tmp_path / "mine.py").write_text(FACTORY)
    # ids are drawn below the model's own 96 embeddings (the default --vocab 256 would index past them)
    assert cli.main(["bench", "--factory", f"{tmp_path / 'mine.py'}:make", "--seq", "32", "--repeat", "1",
                     "--warmup", "0", "--json", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    assert "MoD compiled" in out and "factory:" in out
    assert json.loads((tmp_path / "out.json").read_text())["config"]["vocab"] == 96


@pytest.mark.parametrize("spec, message", [
    ("mine.py", "give MODULE:CALLABLE"),
    ("missing.py:make", "no such file"),
    ("no_such_module_anywhere:make", "cannot import no_such_module_anywhere"),
    ("mine.py:absent", "has no callable absent"),
    ("mine.py:not_a_model", r"not_a_model\(\) returned a int, not an nn.Module"),
])
def test_factory_errors_end_in_a_one_line_error(tmp_path, monkeypatch, spec, message):
    (tmp_path / "mine.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=f"modfx: error: --factory .*{message}"):
        cli.main(["flops", "--factory", spec])


SIBLING_USER = '''
from __future__ import annotations

import dataclasses

import helpers


@dataclasses.dataclass
class Sizes:  # needs its module in sys.modules
    layers: int = 4


def make():
    return helpers.make()
'''


def test_factory_file_imports_its_siblings_and_defines_dataclasses(tmp_path, monkeypatch, capsys):
    (tmp_path / "helpers.py").write_text(FACTORY)
    (tmp_path / "mine.py").write_text(SIBLING_USER)
    monkeypatch.chdir(tmp_path.parent)  # not the file's folder
    assert cli.main(["flops", "--factory", f"{tmp_path / 'mine.py'}:make", "--seq", "32", "--vocab", "50"]) == 0
    assert "k=4" in capsys.readouterr().out


def test_a_training_step_differentiates_the_first_tensor_of_a_dict_output():
    import torch

    class DictOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return {"logits": self.lin(x), "loss": None}

    m = DictOut()
    cli.make_step(m, ((torch.randn(2, 4),), {}), backward=True)()
    assert m.lin.weight.grad is None  # zeroed after the step, which ran forward and backward without error
