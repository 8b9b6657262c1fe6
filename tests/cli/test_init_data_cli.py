"""Data-driven initialisations from the command line: ``deltatune train --init-lora-weights eva`` creates the adapter
from the training batches, writes one PEFT loads, and an init that cannot be computed fails in one line (exit 2)
before the output directory exists; ``compare`` takes ``METHOD+INIT`` rows."""

import json
import os
import warnings

import torch

from deltatune.cli import main
from deltatune.cli.compare import child_settings, row_flags

FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "4", "--eval-batch-size", "4", "--no-eval-before"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_with_eva_writes_an_adapter_peft_loads(capsys, llama_dir, data_dir, tmp_path):
    from peft import PeftModel as HFPeftModel
    from transformers import AutoModelForCausalLM

    from deltatune import PeftModel

    out = tmp_path / "eva"
    code, stdout, err = run(capsys, "train", "--method", "lora", "--model", llama_dir, "--data",
                            data_dir / "pc.jsonl", "--output-dir", out, "--max-steps", 2, "--lr", 1e-2,
                            "--init-lora-weights", "eva", "--target-modules", "q_proj,v_proj,down_proj", *FAST)
    assert code == 0, err
    assert "eva: initialising the adapter from " in stdout and "6 layers initialised" in stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "eva" and config["eva_config"]["rho"] == 2.0
    assert config["rank_pattern"]  # the redistribution moved ranks between layers (r=8 on 32/64 features)
    assert sum(config["rank_pattern"].get(t, config["r"]) for t in config["target_modules"]) == 6 * config["r"]

    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(out)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = HFPeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(out)).eval()
    expected = theirs(input_ids=ids).logits
    torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    with theirs.disable_adapter():
        assert not torch.allclose(theirs(input_ids=ids).logits, expected)  # trained: not the base any more


def test_an_init_that_cannot_be_computed_is_one_line_and_no_output(capsys, llama_dir, data_dir, tmp_path):
    out = tmp_path / "too_big"
    # rho * r = 2 * 24 = 48 components of q_proj's 32 input features: EVA cannot give that
    code, stdout, err = run(capsys, "train", "--method", "lora", "--model", llama_dir, "--data",
                            data_dir / "pc.jsonl", "--output-dir", out, "--max-steps", 1, "--r", 24,
                            "--init-lora-weights", "eva", "--target-modules", "q_proj", *FAST)
    assert code == 2
    assert "input has only 32 features; lower eva_config rho or r" in err
    assert "Traceback" not in err
    assert not os.path.exists(out)
    code, _, err = run(capsys, "train", "--method", "lora", "--model", llama_dir, "--data", data_dir / "pc.jsonl",
                       "--output-dir", out, "--init-lora-weights", "eva", "--eva-config", '{"rho": 0.5}', *FAST)
    assert code == 2 and "rho must be >= 1.0" in err and not os.path.exists(out)


def test_compare_rows_name_an_init():
    assert row_flags("lora") == ["--method", "lora"]
    assert row_flags("lora+eva") == ["--method", "lora", "--init-lora-weights", "eva"]
    assert row_flags("dora+pissa") == ["--method", "dora", "--init-lora-weights", "pissa"]
    assert row_flags("oft+eva") is None  # OFT has no init_lora_weights
    assert row_flags("lora+") is None and row_flags("nonsense") is None
    settings = {"explicit": {"method_options": {"r": 4}}, "data": "x.jsonl"}
    children = child_settings(["lora+eva", "oft"], settings, {"r"})
    assert children["lora+eva"]["r"] == 4 and "r" not in children["oft"]


def test_compare_refuses_an_unknown_row(capsys, llama_dir, data_dir, tmp_path):
    code, _, err = run(capsys, "compare", "--methods", "lora+eva,oft+eva", "--model", llama_dir, "--data",
                       data_dir / "pc.jsonl", "--output-dir", tmp_path / "cmp")
    assert code == 2 and "oft+eva" in err and "METHOD+INIT" in err
