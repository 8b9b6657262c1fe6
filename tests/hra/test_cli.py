"""``deltatune train --method hra`` on a tiny Llama directory: the options reach ``HRAConfig`` and peft loads the
adapter written."""

import json

import peft
import torch
from support import tinymodels
from transformers import AutoModelForCausalLM

from deltatune.cli import main

FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "4", "--eval-batch-size", "4", "--max-steps", "2"]


def test_train_hra_with_gram_schmidt_from_the_cli(capsys, tmp_path):
    llama = tinymodels.make_llama(str(tmp_path / "llama"))
    tinymodels.write_jsonl(str(tmp_path / "pc.jsonl"), tinymodels.prompt_records(24))
    out = tmp_path / "out"
    code = main([str(a) for a in ("train", "--model", llama, "--data", tmp_path / "pc.jsonl", "--output-dir", out,
                                  "--method", "hra", "--r", "4", "--apply-GS", "true", "--init-weights", "false",
                                  *FAST)])
    assert code == 0, capsys.readouterr().err
    with open(out / "adapter_config.json") as fh:
        cfg = json.load(fh)
    assert cfg["peft_type"] == "HRA" and cfg["r"] == 4 and cfg["apply_GS"] is True
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), out)
    us = [p for n, p in theirs.named_parameters() if "hra_u" in n]
    assert us and all(u.shape[1] == 4 for u in us)
    assert all(torch.isfinite(u).all() for u in us)
