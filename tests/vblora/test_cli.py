"""``deltatune train --method vblora`` on the tiny Llama: the flags come from ``VBLoRAConfig`` (registry), the CLI's
``vector_length`` divides the model's widths (PEFT's default 256 divides none of them), and ``deltatune inspect``
counts the ranks."""

from __future__ import annotations

import json

from support import tinymodels

import deltatune
from deltatune.cli import main
from deltatune.cli import options as cli_options
from deltatune.cli.inspect import describe

FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "4", "--eval-batch-size", "4", "--max-steps", "1",
        "--no-eval-before", "--eval-samples", "4", "--forgetting-tokens", "0"]


def test_train_with_method_vblora_writes_peft_files(capsys, tmp_path):
    model_dir = tinymodels.make_llama(str(tmp_path / "llama"))
    options = cli_options.fill_method_defaults(deltatune.VBLoRAConfig, {}, total_steps=10, model_path=model_dir)
    assert options["vector_length"] == 16  # the tiny Llama's widths: 32, 64, 32, 16
    given = cli_options.fill_method_defaults(deltatune.VBLoRAConfig, {"vector_length": 8}, total_steps=10,
                                             model_path=model_dir)
    assert given["vector_length"] == 8  # a length the user gave stays
    tinymodels.write_jsonl(str(tmp_path / "pc.jsonl"), tinymodels.prompt_records(24))
    out = tmp_path / "run"
    code = main([str(a) for a in ("train", "--model", model_dir, "--data", tmp_path / "pc.jsonl", "--output-dir", out,
                                  "--method", "vblora", "--r", "2", "--num-vectors", "32", "--topk", "3",
                                  "--save-only-topk-weights", *FAST)])
    assert code == 0, capsys.readouterr().err
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["num_vectors"], cfg["topk"], cfg["vector_length"],
            cfg["save_only_topk_weights"]) == ("VBLORA", 2, 32, 3, 16, True)
    with open(out / "summary.json") as fh:
        assert json.load(fh)["trainable_params"] > 0
    assert isinstance(deltatune.PeftConfig.from_pretrained(out), deltatune.VBLoRAConfig)
    assert describe(str(out))["method"] == "VBLORA"
