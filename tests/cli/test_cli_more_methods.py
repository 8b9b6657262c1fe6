"""``deltatune train`` / ``compare`` with LN tuning, BitFit, trainable tokens and bottleneck adapters (tiny Llama)."""

import csv
import json
import os

import pytest

from deltatune.cli import main

FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "4", "--eval-batch-size", "4", "--max-steps", "2"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("method, options, expect", [
    ("ln_tuning", [], {"peft_type": "LN_TUNING"}),
    ("bitfit", ["--target-modules", "q_proj,v_proj"], {"peft_type": "BITFIT"}),
    ("trainable_tokens", ["--token-indices", "5,6,7"], {"peft_type": "TRAINABLE_TOKENS", "token_indices": [5, 6, 7]}),
    ("bottleneck", ["--reduction-factor", "4", "--non-linearity", "gelu", "--locations", "attn,ffn", "--parallel"],
     {"peft_type": "BOTTLENECK", "reduction_factor": 4, "non_linearity": "gelu", "parallel": True}),
    ("lora", ["--trainable-token-indices", "5,6", "--r", "4"],
     {"peft_type": "LORA", "trainable_token_indices": [5, 6]}),
], ids=["ln_tuning", "bitfit", "trainable_tokens", "bottleneck", "lora-tokens"])
def test_train_each_method_with_options(capsys, llama_dir, data_dir, tmp_path, method, options, expect):
    out = tmp_path / method
    code, _, err = run(capsys, "train", "--model", llama_dir, "--data", data_dir / "pc.jsonl", "--output-dir", out,
                       "--method", method, *options, *FAST)
    assert code == 0, err
    with open(out / "adapter_config.json") as fh:
        cfg = json.load(fh)
    for key, value in expect.items():
        assert cfg[key] == value, key
    with open(out / "summary.json") as fh:
        assert json.load(fh)["trainable_params"] > 0


def test_compare_the_new_methods(capsys, llama_dir, data_dir, tmp_path):
    out = tmp_path / "cmp"
    methods = ["trainable_tokens", "bottleneck"]  # (two: each runs in its own process)
    code, _, err = run(capsys, "compare", "--methods", ",".join(methods), "--model", llama_dir, "--data",
                       data_dir / "pc.jsonl", "--output-dir", out, *FAST)
    assert code == 0, err
    with open(out / "compare.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == methods
    assert all(int(r["trainable_params"]) > 0 for r in rows)
    with open(out / "trainable_tokens" / "adapter_config.json") as fh:  # filled from the data's frequent tokens
        assert len(json.load(fh)["token_indices"]) > 0
    assert os.path.isfile(out / "bottleneck" / "adapter_model.safetensors")
