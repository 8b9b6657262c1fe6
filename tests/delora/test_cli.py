"""``deltatune train --method delora`` on the tiny Llama: the CLI's flags come from ``DeloraConfig`` (registry)."""

from __future__ import annotations

import json

from support import tinymodels

import deltatune
from deltatune.cli import main

FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "4", "--eval-batch-size", "4", "--max-steps", "1",
        "--no-eval-before", "--eval-samples", "4", "--forgetting-tokens", "0"]


def test_train_with_method_delora_writes_peft_files(capsys, tmp_path):
    model_dir = tinymodels.make_llama(str(tmp_path / "llama"))
    tinymodels.write_jsonl(str(tmp_path / "pc.jsonl"), tinymodels.prompt_records(24))
    out = tmp_path / "run"
    code = main([str(a) for a in ("train", "--model", model_dir, "--data", tmp_path / "pc.jsonl", "--output-dir", out,
                                  "--method", "delora", "--r", "4", "--delora-lambda", "5", "--module-dropout", "0.1",
                                  *FAST)])
    assert code == 0, capsys.readouterr().err
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["delora_lambda"], cfg["module_dropout"]) == ("DELORA", 4, 5, 0.1)
    with open(out / "summary.json") as fh:
        assert json.load(fh)["trainable_params"] > 0
    assert isinstance(deltatune.PeftConfig.from_pretrained(out), deltatune.DeloraConfig)
