"""Smoke test of ``bench/loftq_error.py`` on a tiny random Llama: it measures every projection, its QLoRA row is
the NF4 error computed here independently, LoftQ's rows are below it, and the table prints the ratios."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "loftq_error.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("loftq_error_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_tiny_run_reports_loftq_below_qlora(bench, tmp_path, capsys):
    import bitsandbytes as bnb

    out = tmp_path / "loftq.json"
    bench.main(["--model", "llama-tiny", "--r", "8", "--iters", "1", "3", "--json", str(out)])
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert list(runs) == ["qlora", "loftq_iter1", "loftq_iter3"]
    assert all(len(run["layers"]) == 14 for run in runs.values())  # 7 projections x 2 blocks
    model, _ = bench.load("llama-tiny")
    w = model.model.layers[1].mlp.down_proj.weight.detach()
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    expected = ((w - bnb.functional.dequantize_4bit(packed, state)).norm() / w.norm()).item()
    assert runs["qlora"]["layers"]["model.layers.1.mlp.down_proj"] == pytest.approx(expected, rel=1e-5)
    for key in ("loftq_iter1", "loftq_iter3"):
        assert runs[key]["weight_rel_error"] < 0.9 * runs["qlora"]["weight_rel_error"]
        assert runs[key]["logit_rel_error"] < runs["qlora"]["logit_rel_error"]
    assert runs["loftq_iter3"]["weight_rel_error"] <= runs["loftq_iter1"]["weight_rel_error"]
    printed = capsys.readouterr().out
    assert "| (b) LoftQ, loftq_iter=3 |" in printed and "| down_proj |" in printed
    assert torch.isfinite(torch.tensor([r["kl_nats"] for r in runs.values()])).all()
