"""``deltatune train --method fourierft`` on the tiny Llama: the CLI's flags come from ``FourierFTConfig`` (registry),
and PEFT's default ``n_frequency`` (1000) is lowered to what the model's smallest projection holds."""

from __future__ import annotations

import json

from support import tinymodels

import deltatune
from deltatune.cli import main
from deltatune.cli import options as cli_options

FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "4", "--eval-batch-size", "4", "--max-steps", "1",
        "--no-eval-before", "--eval-samples", "4", "--forgetting-tokens", "0"]


def test_train_with_method_fourierft_writes_peft_files(capsys, tmp_path):
    model_dir = tinymodels.make_llama(str(tmp_path / "llama"))
    tinymodels.write_jsonl(str(tmp_path / "pc.jsonl"), tinymodels.prompt_records(24))
    out = tmp_path / "run"
    code = main([str(a) for a in ("train", "--model", model_dir, "--data", tmp_path / "pc.jsonl", "--output-dir", out,
                                  "--method", "fourierft", "--scaling", "30", "--random-loc-seed", "5", *FAST)])
    assert code == 0, capsys.readouterr().err
    cfg = json.loads((out / "adapter_config.json").read_text())
    # hidden 32, key/value 2 heads x 8 = 16: the smallest projection holds 512 weights
    assert (cfg["peft_type"], cfg["n_frequency"], cfg["scaling"], cfg["random_loc_seed"]) == \
        ("FOURIERFT", 512, 30.0, 5)
    with open(out / "summary.json") as fh:
        assert json.load(fh)["trainable_params"] > 0
    assert isinstance(deltatune.PeftConfig.from_pretrained(out), deltatune.FourierFTConfig)
    given = cli_options.fill_method_defaults(deltatune.FourierFTConfig, {"n_frequency": 64}, total_steps=1,
                                             model_path=model_dir)
    assert given["n_frequency"] == 64  # a value the user gave stays


def test_inspect_size_line_names_frequencies_scale_and_seed():
    from deltatune.fourierft import inspect_size

    assert inspect_size({"n_frequency": 64, "scaling": 150.0, "random_loc_seed": 777}, {}) == \
        "n_frequency=64 per layer, scaling=150.0, random_loc_seed=777"
