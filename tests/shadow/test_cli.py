"""``deltatune train --method shadow`` on the tiny Llama: the CLI's flags come from ``ShadowConfig`` (registry); the
trainer's loss carries the auxiliary shadow term, and the run's adapter loads in peft."""

from __future__ import annotations

import json
import warnings

import peft
from support import tinymodels

import deltatune
from deltatune.cli import main

FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "4", "--eval-batch-size", "4", "--max-steps", "1",
        "--no-eval-before", "--eval-samples", "4", "--forgetting-tokens", "0"]


def test_train_with_method_shadow_writes_peft_files(capsys, tmp_path):
    model_dir = tinymodels.make_llama(str(tmp_path / "llama"))
    tinymodels.write_jsonl(str(tmp_path / "pc.jsonl"), tinymodels.prompt_records(24))
    out = tmp_path / "run"
    code = main([str(a) for a in ("train", "--model", model_dir, "--data", tmp_path / "pc.jsonl", "--output-dir", out,
                                  "--method", "shadow", "--r", "4", "--shadow-alpha", "0.5",
                                  "--auxiliary-loss-weight", "0.1", *FAST)])
    assert code == 0, capsys.readouterr().err
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["shadow_alpha"], cfg["auxiliary_loss_weight"]) == ("SHADOW", 4, 0.5, 0.1)
    assert isinstance(deltatune.PeftConfig.from_pretrained(out), deltatune.ShadowConfig)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert isinstance(peft.PeftConfig.from_pretrained(out), peft.ShadowConfig)
