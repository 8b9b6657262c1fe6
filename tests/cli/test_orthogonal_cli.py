"""OFT and BOFT from the command line: train with their options, compare passes each method only the options
it takes (OFT's ``r`` counts blocks, so a LoRA ``--r`` must not reach it), inspect shows their sizes."""

import json
import os
import warnings

import pytest
import torch

from deltatune.cli import common, main

FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "4", "--eval-batch-size", "4"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def read_json(path):
    with open(path) as fh:
        return json.load(fh)


def test_shared_options_reach_only_the_methods_that_take_them():
    recipe = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "oft_block_size": 16}
    assert common.shared_options_for("lora", recipe) == {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}
    assert common.shared_options_for("oft", recipe) == {"target_modules": "all-linear", "oft_block_size": 16}
    assert common.shared_options_for("boft", recipe) == {"target_modules": "all-linear"}
    assert "use_dora" not in common.shared_options_for("dora", {"use_dora": False, "r": 4})
    assert common.shared_options_for("loha", recipe) == {"r": 8, "target_modules": "all-linear"}


@pytest.mark.parametrize("method,flags,expect", [
    ("oft", ["--oft-block-size", 8, "--use-cayley-neumann", "false", "--bias", "oft_only"],
     {"oft_block_size": 8, "r": 0, "use_cayley_neumann": False, "bias": "oft_only"}),
    ("boft", ["--boft-block-size", 4, "--boft-n-butterfly-factor", 2], {"boft_block_size": 4,
                                                                         "boft_n_butterfly_factor": 2}),
])
def test_train_inspect_and_peft_loads_the_result(capsys, llama_dir, data_dir, tmp_path, method, flags, expect):
    from peft import PeftModel as HFPeftModel
    from transformers import AutoModelForCausalLM

    from deltatune import PeftModel

    out = tmp_path / method
    code, stdout, err = run(capsys, "train", "--method", method, "--model", llama_dir, "--data", data_dir / "pc.jsonl",
                            "--output-dir", out, "--max-steps", 3, "--lr", 1e-2, "--target-modules", "q_proj,down_proj",
                            *flags, *FAST)
    assert code == 0, err
    config = read_json(out / "adapter_config.json")
    assert config["peft_type"] == method.upper()
    assert {k: config[k] for k in expect} == expect
    summary = read_json(out / "summary.json")
    assert summary["eval_after"]["loss"] != summary["eval_before"]["loss"]

    code, stdout, _ = run(capsys, "inspect", out)
    assert code == 0
    size = next(line for line in stdout.splitlines() if line.startswith("size"))
    assert f"{method}_block_size={expect[f'{method}_block_size']}" in size and "r=0" not in size
    assert "in the file:" in size
    info = json.loads(run(capsys, "inspect", out, "--json")[1])
    assert info["adapted_modules"] == 4 and info["size"] in size

    if method == "boft":  # peft runs several butterfly factors only with its CUDA kernel (tests/boft emulates it)
        return
    ids = torch.tensor([[5, 9, 13, 17, 21]])
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(out)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = HFPeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_compare_gives_each_method_only_its_options(capsys, llama_dir, data_dir, tmp_path):
    out = tmp_path / "cmp"
    code, stdout, err = run(capsys, "compare", "--methods", "lora,oft", "--model", llama_dir, "--data",
                            data_dir / "pc.jsonl", "--output-dir", out, "--max-steps", 1, "--r", 4,
                            "--oft-block-size", 16, "--no-eval-before", "--forgetting-tokens", 0, *FAST)
    assert code == 0, err
    lora, oft = (read_json(out / m / "adapter_config.json") for m in ("lora", "oft"))
    assert lora["r"] == 4
    assert oft["r"] == 0 and oft["oft_block_size"] == 16
    assert "| oft |" in (out / "compare.md").read_text()
    assert os.path.exists(out / "oft" / "adapter_model.safetensors")


def test_compare_refuses_an_option_no_chosen_method_takes(capsys, llama_dir, data_dir, tmp_path):
    code, _, err = run(capsys, "compare", "--methods", "lora,boft", "--model", llama_dir, "--data",
                       data_dir / "pc.jsonl", "--output-dir", tmp_path / "cmp", "--oft-block-size", 16, *FAST)
    assert code == 2
    assert "--oft-block-size" in err and "no method" in err
    assert not os.path.exists(tmp_path / "cmp")
