"""``deltatune train --method miss`` on a tiny Llama directory (the options reach ``MissConfig`` and peft loads
the adapter written), and ``deltatune inspect``'s size line for a MiSS adapter."""

import json

import peft
import pytest
import torch
from support import tinymodels
from support.models import tiny_llama
from transformers import AutoModelForCausalLM

import deltatune
from deltatune.cli import main

FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "4", "--eval-batch-size", "4", "--max-steps", "2"]


# (balance, the default variant, is what ``deltatune compare`` and the contract suite run already)
@pytest.mark.parametrize("options, init", [(["--r", "4", "--init-weights", "bat"], "bat"),
                                           (["--r", "4", "--init-weights", "mini", "--mini-r", "4"], "mini")],
                         ids=["bat", "mini"])
def test_train_miss_from_the_cli(capsys, tmp_path, options, init):
    llama = tinymodels.make_llama(str(tmp_path / "llama"))
    tinymodels.write_jsonl(str(tmp_path / "pc.jsonl"), tinymodels.prompt_records(24))
    out = tmp_path / "out"
    code = main([str(a) for a in ("train", "--model", llama, "--data", tmp_path / "pc.jsonl", "--output-dir", out,
                                  "--method", "miss", *options, *FAST)])
    assert code == 0, capsys.readouterr().err
    with open(out / "adapter_config.json") as fh:
        cfg = json.load(fh)
    assert cfg["peft_type"] == "MISS" and cfg["r"] == 4 and cfg["init_weights"] == init
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), out)
    blocks = [p for n, p in theirs.named_parameters() if "miss_block" in n]
    assert blocks and any(torch.count_nonzero(b) > 0 for b in blocks)  # trained: moved off the zero init


def test_inspect_names_the_variant_and_shard_width(capsys, tmp_path):
    config = deltatune.MissConfig(r=4, init_weights="bat", task_type="CAUSAL_LM")
    deltatune.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    size = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("size"))
    assert "bat, shard width r=4" in size and "4 blocks (4x4x4, 8x4x4)" in size, size
