"""``deltatune train --init-lora-weights corda``: the adapter is created from the first training batches
(``deltatune.lora.init.get_peft_model_with_data``), and, as for PiSSA/OLoRA, the saved adapter is converted to a
plain LoRA (rank 2r) for the original base: ``eval`` and ``peft`` reproduce the loss training reported."""

import json
import warnings

import pytest

from .reliability import assert_peft_loads_it_equal, read_json, run

FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "4", "--eval-batch-size", "4"]


def test_corda_run_saves_a_lora_for_the_original_base(capsys, llama_dir, data_dir, tmp_path):


    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Using default CorDA config" (PEFT's warning)
        code, stdout, err = run(capsys, "train", "--model", llama_dir, "--data", data_dir / "pc.jsonl",
                                "--output-dir", out, "--max-steps", 3, "--lr", 1e-2, "--r", 4,
                                "--target-modules", "q_proj,v_proj,down_proj", "--init-lora-weights", "corda", *FAST)
    assert code == 0, err
    assert "corda: initialising the adapter from" in stdout
    initial = read_json(out / "initial_adapter" / "adapter_config.json")
    assert initial["init_lora_weights"] == "corda" and initial["corda_config"]["corda_method"] == "ipm"
    config = read_json(out / "adapter_config.json")
    assert config["init_lora_weights"] is True and config["r"] == 8
    summary = read_json(out / "summary.json")
    assert summary["eval_after"]["loss"] != summary["eval_before"]["loss"]

    code, stdout, err = run(capsys, "eval", "--adapter", out, "--precision", "fp32", "--json", "--batch-size", 4)
    assert code == 0 and "residual" not in err, err
    assert json.loads(stdout)["loss"] == pytest.approx(summary["eval_after"]["loss"], rel=1e-5)
    # "before" is the untrained CorDA adapter on the residual base: the original model's loss
    code, stdout, _ = run(capsys, "eval", "--model", llama_dir, "--data", data_dir / "pc.jsonl", "--precision",
                          "fp32", "--json", "--batch-size", 4, "--eval-samples", 8)
    assert json.loads(stdout)["loss"] == pytest.approx(summary["eval_before"]["loss"], rel=1e-4)

    assert_peft_loads_it_equal(llama_dir, out)
