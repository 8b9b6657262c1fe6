"""OFT and BOFT from the command line: train with their options, compare passes each method only the options
it takes (OFT's ``r`` counts blocks, so a LoRA ``--r`` must not reach it), inspect shows their sizes."""

import json
import os

import pytest

from deltatune.cli import options as cli_options

from .reliability import assert_peft_loads_it_equal, read_json, run

FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "4", "--eval-batch-size", "4"]


def test_shared_options_reach_only_the_methods_that_take_them():
    recipe = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "oft_block_size": 16}
    assert cli_options.shared_options_for("lora", recipe) == {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}
    assert cli_options.shared_options_for("oft", recipe) == {"target_modules": "all-linear", "oft_block_size": 16}
    assert cli_options.shared_options_for("boft", recipe) == {"target_modules": "all-linear"}
    assert "use_dora" not in cli_options.shared_options_for("dora", {"use_dora": False, "r": 4})
    assert cli_options.shared_options_for("loha", recipe) == {"r": 8, "target_modules": "all-linear"}


@pytest.mark.parametrize("method,flags,expect", [
    ("oft", ["--oft-block-size", 8, "--use-cayley-neumann", "false", "--bias", "oft_only"],
     {"oft_block_size": 8, "r": 0, "use_cayley_neumann": False, "bias": "oft_only"}),
    ("boft", ["--boft-block-size", 4, "--boft-n-butterfly-factor", 2], {"boft_block_size": 4,
                                                                         "boft_n_butterfly_factor": 2}),
])
def test_train_inspect_and_peft_loads_the_result(capsys, llama_dir, data_dir, tmp_path, method, flags, expect):


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
    assert_peft_loads_it_equal(llama_dir, out)


def _child_settings(*argv):
    """What ``deltatune compare <argv>`` writes into each method's settings file (no child is started)."""
    from deltatune.cli import build_parser
    from deltatune.cli.compare import child_settings
    from deltatune.cli.train import settings_from_args

    args = build_parser().parse_args(["compare", *map(str, argv)])
    methods = vars(args).pop("methods").split(",")
    names = set(cli_options.method_fields())
    return child_settings(methods, settings_from_args(args, names), names)


def test_compare_gives_each_method_only_its_options(data_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lora_alpha: 8\nuse_cayley_neumann: false\nlr: 0.01\n")
    got = _child_settings("--methods", "lora,dora,oft,boft", "--data", data_dir / "pc.jsonl", "--max-steps", 1,
                          "--r", 4, "--oft-block-size", 16, "--boft-block-size", 8, "--use-dora", "false",
                          "--config", config)
    assert all(s["max_steps"] == 1 and s["lr"] == 0.01 for s in got.values())
    method_keys = {m: {k for k in s if k in cli_options.method_fields()} for m, s in got.items()}
    assert method_keys == {"lora": {"r", "lora_alpha", "use_dora"}, "dora": {"r", "lora_alpha"},
                           "oft": {"oft_block_size", "use_cayley_neumann"}, "boft": {"boft_block_size"}}
    assert got["lora"]["r"] == 4 and got["oft"]["oft_block_size"] == 16 and got["boft"]["boft_block_size"] == 8
    # And a child really accepts what it gets: OFT's config builds from it (r stays 0).
    oft = cli_options.build_peft_config("oft", {k: got["oft"][k] for k in method_keys["oft"]}, "CAUSAL_LM")
    assert (oft.r, oft.oft_block_size, oft.use_cayley_neumann) == (0, 16, False)


def test_compare_refuses_an_option_no_chosen_method_takes(capsys, llama_dir, data_dir, tmp_path):
    code, _, err = run(capsys, "compare", "--methods", "lora,boft", "--model", llama_dir, "--data",
                       data_dir / "pc.jsonl", "--output-dir", tmp_path / "cmp", "--oft-block-size", 16, *FAST)
    assert code == 2
    assert "--oft-block-size" in err and "no method" in err
    assert not os.path.exists(tmp_path / "cmp")


@pytest.mark.parametrize("method,expect", [("oft", {"target_modules": "all-linear"}),
                                           ("boft", {"target_modules": "all-linear"}),
                                           ("lora", {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"})])
def test_a_builtin_recipe_gives_each_method_only_its_options(method, expect):
    """bbc-news's recipe holds LoRA options (r=8, lora_alpha=16): `train --method oft` on it must not get them."""
    from deltatune.cli import build_parser
    from deltatune.cli.train import settings_from_args

    args = build_parser().parse_args(["train", "--method", method])
    settings = settings_from_args(args, set(cli_options.method_fields()))
    assert settings["method_options"] == {}
    options = cli_options.shared_options_for(method, settings["recipe_method_options"])
    assert options == expect
    cli_options.build_peft_config(method, options, "CAUSAL_LM")  # builds without a conflict
