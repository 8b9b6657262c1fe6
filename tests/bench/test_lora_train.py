"""Smoke test of ``bench/lora_train.py`` on a tiny random Llama: every case and variant runs, the checks that make
the comparison fair pass, the report carries the ratios and the arithmetic bound, and a memory child reports."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "lora_train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("lora_train_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_all_cases_run_and_report(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--model", "llama-tiny", "--rounds", "1", "--warmup", "0", "--seq-len", "16", "--threads", "1",
                "--no-memory", "--json", str(out)])
    payload = json.loads(out.read_text())
    assert [r["case"] for r in payload["results"]] == ["lora0", "lora05", "dora"]
    for r in payload["results"]:
        assert set(r["median_s"]) == {"floor", "peft", "deltatune"} and all(t > 0 for t in r["median_s"].values())
        assert len(set(round(loss, 4) for loss in r["initial_loss"].values())) == 1  # the same model three times
    printed = capsys.readouterr().out
    assert "| LoRA, dropout 0.05 |" in printed and "Arithmetic lower bound" in printed


def test_arithmetic_bound_counts_the_model_shapes(bench):
    model = bench.load_base_model("llama-tiny")
    b = bench.arithmetic_bound(model, seq_len=16, r=4)
    cfg = bench.CONFIG_MODELS["llama-tiny"]
    h, i, layers, heads, kv = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                 "num_attention_heads", "num_key_value_heads"))
    kv_out = kv * h // heads
    per_block = [(h, h), (h, kv_out), (h, kv_out), (h, h), (h, i), (h, i), (i, h)]   # q k v o gate up down
    linear = layers * sum(a * o for a, o in per_block) + h * cfg["vocab_size"]
    attention = layers * 3 * 2 * heads * 16 * (h // heads)
    assert b["floor"] == pytest.approx((2 * linear + attention) / 1e6)
    assert b["lora"] == pytest.approx(3 * 4 * layers * sum(a + o for a, o in per_block) / 1e6)


def test_memory_child_reports_a_peak(bench):
    args = bench.parse_args(["--model", "llama-tiny", "--seq-len", "16", "--threads", "1"])
    assert bench.measure_memory("deltatune", "lora05", args) >= 0
