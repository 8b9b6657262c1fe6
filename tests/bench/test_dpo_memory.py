"""Smoke test of ``bench/dpo_memory.py`` on a tiny random Llama (SmolLM2's tokenizer): every variant trains in its
own child, the three start from the same loss (DPO's log 2), and the explicit reference copy is the one that holds
a second model; the report carries the ratios."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "dpo_memory.py"


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    spec = importlib.util.spec_from_file_location("dpo_memory_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_every_variant_trains_and_reports(bench, capsys):
    """Each child in this process (the bench runs each in a fresh one; the imports are what costs seconds there)."""
    args = bench.parser().parse_args(["--model", "llama-tiny", "--steps", "1", "--batch-size", "2",
                                      "--max-length", "64", "--threads", "1"])
    results = {}
    for variant in bench.VARIANTS:
        bench.child(variant, args)
        results[variant] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for r in results.values():
        assert r["peak_mib"] > 0 and r["ru_maxrss_mib"] > 0
        assert r["losses"][0] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at step 1
    assert results["deltatune"]["reference"] == "AdapterDisabledReference"
    assert results["peft"]["reference"] == "adapter disabled (peft)"
    assert results["deltatune-ref-copy"]["reference"] == "LlamaForCausalLM"
    lines = bench.report(results, args, "python bench/dpo_memory.py --model llama-tiny")
    assert any(line.startswith("| deltatune-ref-copy | LlamaForCausalLM |") for line in lines)


def test_preference_rows_are_fixed(bench):
    assert bench.preference_rows(3) == bench.preference_rows(3)
    assert set(bench.preference_rows(1)[0]) == {"prompt", "chosen", "rejected"}
