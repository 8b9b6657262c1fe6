"""``deltatune train --method waveft`` on the tiny Llama: the flags come from ``WaveFTConfig`` (registry), and the
CLI's ``n_frequency`` fits a model whose layers are smaller than PEFT's default."""

from __future__ import annotations

import json

import pytest
from support import tinymodels
from transformers import AutoModelForCausalLM

import deltatune
from deltatune.cli import main
from deltatune.cli import options as cli_options

FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "4", "--eval-batch-size", "4", "--max-steps", "1",
        "--no-eval-before", "--eval-samples", "4", "--forgetting-tokens", "0"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return tinymodels.make_llama(str(tmp_path_factory.mktemp("models") / "llama"))


def test_train_with_method_waveft_writes_peft_files(capsys, tmp_path, model_dir):
    # PEFT's default n_frequency (2592) exceeds the tiny Llama's 32x16 projections: the CLI fills their size
    options = cli_options.fill_method_defaults(deltatune.WaveFTConfig, {}, total_steps=10, model_path=model_dir)
    assert options["n_frequency"] == 32 * 16
    given = cli_options.fill_method_defaults(deltatune.WaveFTConfig, {"n_frequency": 9}, total_steps=10,
                                             model_path=model_dir)
    assert given["n_frequency"] == 9  # a number the user gave stays
    tinymodels.write_jsonl(str(tmp_path / "pc.jsonl"), tinymodels.prompt_records(24))
    out = tmp_path / "run"
    code = main([str(a) for a in ("train", "--model", model_dir, "--data", tmp_path / "pc.jsonl", "--output-dir", out,
                                  "--method", "waveft", "--wavelet-family", "db2", "--scaling", "5", *FAST)])
    assert code == 0, capsys.readouterr().err
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["wavelet_family"], cfg["scaling"]) == ("WAVEFT", "db2", 5.0)
    assert cfg["n_frequency"] <= 32 * 16
    with open(out / "summary.json") as fh:
        assert json.load(fh)["trainable_params"] > 0
    assert isinstance(deltatune.PeftConfig.from_pretrained(out), deltatune.WaveFTConfig)


def test_inspect_names_the_coefficients_and_the_wavelet(capsys, tmp_path, model_dir):
    adapter = deltatune.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                       deltatune.WaveFTConfig(n_frequency=64, n_frequency_pattern={"q_proj": 100},
                                                              wavelet_family="sym2", task_type="CAUSAL_LM"))
    adapter.save_pretrained(tmp_path / "adapter")
    assert main(["inspect", str(tmp_path / "adapter")]) == 0
    text = capsys.readouterr().out
    assert "n_frequency=64 coefficients per layer, inverse sym2 wavelet transform, scaling 25.0; in the file: 64, " \
           "100 per layer" in text, text
