"""``deltatune train --method adaption_prompt`` on a tiny Llama directory: the options reach
``AdaptionPromptConfig`` (the CLI fills ``adapter_len``/``adapter_layers``, which PEFT leaves unset) and peft loads
the adapter written with the same logits."""

import json

import peft
import torch
from support import tinymodels
from transformers import AutoModelForCausalLM

from deltatune import PeftModel
from deltatune.cli import main

FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "4", "--eval-batch-size", "4", "--max-steps", "2"]


def test_train_adaption_prompt_from_the_cli(capsys, tmp_path):
    llama = tinymodels.make_llama(str(tmp_path / "llama"))
    tinymodels.write_jsonl(str(tmp_path / "pc.jsonl"), tinymodels.prompt_records(16))
    out = tmp_path / "out"
    code = main([str(a) for a in ("train", "--model", llama, "--data", tmp_path / "pc.jsonl", "--output-dir", out,
                                  "--method", "adaption_prompt", "--adapter-len", "4", *FAST)])
    assert code == 0, capsys.readouterr().err
    with open(out / "adapter_config.json") as fh:
        cfg = json.load(fh)
    # adapter_layers filled with the model's 2 blocks; target_modules from the architecture, not the recipe
    assert (cfg["peft_type"], cfg["adapter_len"], cfg["adapter_layers"]) == ("ADAPTION_PROMPT", 4, 2)
    assert cfg["target_modules"] == "self_attn"
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), out).eval()
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-6, rtol=1e-5)
