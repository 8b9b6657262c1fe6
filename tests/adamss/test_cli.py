"""``deltatune train --method adamss --use-asa`` on the tiny Llama: the flags come from ``AdamssConfig``
(registry), the CLI's loop drives ASA, and the adapter loads back."""

from __future__ import annotations

import json

from support import tinymodels
from transformers import AutoModelForCausalLM

import deltatune
from deltatune.cli import main

FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "4", "--eval-batch-size", "4", "--max-steps", "2",
        "--no-eval-before", "--eval-samples", "4", "--forgetting-tokens", "0"]


def test_train_with_method_adamss_and_asa(capsys, tmp_path):
    model_dir = tinymodels.make_llama(str(tmp_path / "llama"))
    tinymodels.write_jsonl(str(tmp_path / "pc.jsonl"), tinymodels.prompt_records(24))
    out = tmp_path / "run"
    code = main([str(a) for a in ("train", "--model", model_dir, "--data", tmp_path / "pc.jsonl", "--output-dir", out,
                                  "--method", "adamss", "--r", "8", "--num-subspaces", "3", "--use-asa",
                                  "--asa-target-subspaces", "2", "--init-warmup", "0", "--final-warmup", "2",
                                  "--mask-interval", "2", *FAST)])
    assert code == 0, capsys.readouterr().err
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["num_subspaces"], cfg["use_asa"]) == ("ADAMSS", 8, 3, True)
    model = deltatune.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
    assert isinstance(model.peft_config["default"], deltatune.AdamssConfig)
