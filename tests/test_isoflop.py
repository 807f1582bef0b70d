"""benchmarks/isoflop.py and benchmarks/convert.py end to end at --quick sizes (in-process, ~30-60 s)."""

import json
import math
import pathlib
import sys

import pytest
import torch

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    sys.path.insert(0, str(BENCH))
    threads = torch.get_num_threads()
    try:
        import convert
        import isoflop

        out = tmp_path_factory.mktemp("isoflop")
        iso = isoflop.main(["--quick", "--out", str(out / "iso")])
        conv = convert.main(["--quick", "--ckpt", str(out / "iso" / "dense_seed0.pt"), "--out", str(out / "conv")])
        yield out, iso, conv
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(BENCH))


def test_isoflop_runs_and_losses_fall(bench):
    out, iso, _ = bench
    names = [r["name"] for r in iso["runs"]]
    assert names.count("dense") >= 2 and names.count("mod") >= 2
    assert {"mod_deep", "ctrl1", "ctrl2"} <= set(names)
    for r in iso["runs"]:
        first, last = r["train_loss"][:5], r["train_loss"][-5:]
        assert sum(last) / 5 < sum(first) / 5 - 0.5, (r["name"], first, last)
        assert all(math.isfinite(p["val_bpb"]) for p in r["curve"])
        assert r["curve"][-1]["step"] == r["steps"]
    assert json.loads((out / "iso" / "isoflop.json").read_text())["summary"]


def test_isoflop_flop_matching(bench):
    _, iso, _ = bench
    by = {r["name"]: r for r in iso["runs"] if r["seed"] == 0}
    budget = iso["budget_train_flops"]
    dense, mod = by["dense"]["flops_per_step"], by["mod"]["flops_per_step"]
    assert mod < 0.8 * dense and by["mod"]["steps"] > by["dense"]["steps"]
    for name in ("dense", "mod", "mod_deep", "ctrl2"):  # equal training FLOPs, up to rounding of the steps
        assert abs(by[name]["train_flops"] / budget - 1) < 0.05, name
    assert abs(by["mod_deep"]["flops_per_step"] / dense - 1) < 0.2
    assert abs(by["ctrl1"]["flops_per_step"] / mod - 1) < 0.2 and by["ctrl1"]["steps"] == by["mod"]["steps"]


def test_isoflop_mod_figures(bench):
    _, iso, _ = bench
    for r in iso["runs"]:
        if r["name"] in ("mod", "mod_deep"):
            m = r["mod"]
            for k in ("predictor_accuracy", "predictor_precision", "predictor_recall", "predictor_selected"):
                assert 0.0 <= m[k] <= 1.0, k
            assert m["always_skip_accuracy"] == 1 - 0.125
            assert math.isfinite(m["bpb_predictor"]) and math.isfinite(m["bpb_routed_removed"])
            assert m["bpb_topk"] == r["val_bpb"]
    rows = {row["run"]: row for row in iso["summary"]}
    assert rows["mod"]["fwd_fraction"] < 1 and rows["dense"]["vs_dense"] == "-"


def test_convert_trains_only_routers(bench):
    _, _, conv = bench
    assert conv["trainable"] and all(".mod_router." in n or ".mod_predictor." in n for n in conv["trainable"])
    assert conv["fwd_flop_ratio"] < 1
    assert math.isfinite(conv["after"]["bpb_topk"]) and math.isfinite(conv["dense_bpb"])
