"""``deltatune train --method gralora`` on the tiny Llama: the CLI's flags come from ``GraloraConfig`` (registry)."""

from __future__ import annotations

import json

from support import tinymodels

import deltatune
from deltatune.cli import main

FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "4", "--eval-batch-size", "4", "--max-steps", "1",
        "--no-eval-before", "--eval-samples", "4", "--forgetting-tokens", "0"]


def test_train_with_method_gralora_writes_peft_files(capsys, tmp_path):
    model_dir = tinymodels.make_llama(str(tmp_path / "llama"))
    tinymodels.write_jsonl(str(tmp_path / "pc.jsonl"), tinymodels.prompt_records(24))
    out = tmp_path / "run"
    code = main([str(a) for a in ("train", "--model", model_dir, "--data", tmp_path / "pc.jsonl", "--output-dir", out,
                                  "--method", "gralora", "--r", "4", "--gralora-k", "2", "--hybrid-r", "2",
                                  "--alpha", "12", *FAST)])
    assert code == 0, capsys.readouterr().err
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["gralora_k"], cfg["hybrid_r"], cfg["alpha"]) == ("GRALORA", 4, 2, 2, 12)
    with open(out / "summary.json") as fh:
        assert json.load(fh)["trainable_params"] > 0
    assert isinstance(deltatune.PeftConfig.from_pretrained(out), deltatune.GraloraConfig)


def test_inspect_size_line_names_blocks_hybrid_rank_and_scale():
    from deltatune.gralora import inspect_size

    assert inspect_size({"r": 4, "gralora_k": 2, "hybrid_r": 2, "alpha": 12}, {}) == \
        "r=4 as 2x2 blocks of rank 2, hybrid_r=2, scaling alpha/(r+hybrid_r)=2"
    assert inspect_size({"r": 32, "gralora_k": 4, "hybrid_r": 0, "alpha": 64}, {}) == \
        "r=32 as 4x4 blocks of rank 8, scaling alpha/(r+hybrid_r)=2"
