"""Bad input: one clear line on stderr, exit code 2, and nothing written."""

import json
import os

import pytest

from deltatune.cli import main


def check_error(capsys, tmp_path, argv, expected):
    out = tmp_path / "out"
    code = main([str(a) for a in [*argv, "--output-dir", out]] if argv[0] == "train" else [str(a) for a in argv])
    stdout, stderr = capsys.readouterr()
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("deltatune: error: "), stderr
    assert expected in lines[0], lines[0]
    assert not out.exists()  # nothing half-written
    return lines[0]


def train(llama_dir, data, *extra):
    return ["train", "--model", llama_dir, "--data", data, "--max-steps", 1, "--precision", "fp32", "--no-progress",
            *extra]


def test_missing_data_file(capsys, tmp_path, llama_dir):
    check_error(capsys, tmp_path, train(llama_dir, tmp_path / "nope.jsonl"), "nope.jsonl' does not exist")


def test_bad_json_line_gives_its_number(capsys, tmp_path, llama_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n{"prompt": oops}\n')
    check_error(capsys, tmp_path, train(llama_dir, path), "bad.jsonl:3: not valid JSON")


def test_column_that_is_not_there(capsys, tmp_path, llama_dir, data_dir):
    line = check_error(capsys, tmp_path, train(llama_dir, data_dir / "cls.csv", "--label-column", "topic"),
                       "has no column 'topic'")
    assert "text, label" in line


def test_label_never_seen_in_training(capsys, tmp_path, llama_dir, data_dir):
    held = tmp_path / "eval.jsonl"
    held.write_text(json.dumps({"text": "the weather is fine", "label": "weather"}) + "\n")
    check_error(capsys, tmp_path, train(llama_dir, data_dir / "cls.jsonl", "--eval-data", held),
                "label(s) ['weather'] that the training data never shows")


def test_unknown_method(capsys, tmp_path, llama_dir, data_dir):
    line = check_error(capsys, tmp_path, train(llama_dir, data_dir / "pc.jsonl", "--method", "lorax"),
                       "unknown method 'lorax'")
    assert "lora" in line and "dora" in line


def test_unknown_option(capsys, tmp_path, llama_dir, data_dir):
    check_error(capsys, tmp_path, train(llama_dir, data_dir / "pc.jsonl", "--rank", 4),
                "unrecognized arguments: --rank")


def test_option_of_another_method(capsys, tmp_path, llama_dir, data_dir):
    check_error(capsys, tmp_path, train(llama_dir, data_dir / "pc.jsonl", "--method", "ia3", "--lora-alpha", 16),
                "--lora-alpha: not an option of method 'ia3'")


def test_bad_option_value(capsys, tmp_path, llama_dir, data_dir):
    check_error(capsys, tmp_path, train(llama_dir, data_dir / "pc.jsonl", "--r", "abc"), "--r: cannot read 'abc'")
    check_error(capsys, tmp_path, train(llama_dir, data_dir / "pc.jsonl", "--r", 0), "r must be a positive integer")


def test_model_directory_that_is_not_a_model(capsys, tmp_path, data_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    check_error(capsys, tmp_path, train(empty, data_dir / "pc.jsonl"), "has no config.json")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    check_error(capsys, tmp_path, train(broken, data_dir / "pc.jsonl"), "cannot read its config")


def test_model_name_that_is_nothing(capsys, tmp_path, data_dir):
    check_error(capsys, tmp_path, train("no such model", data_dir / "pc.jsonl"), "is not a built-in model")


def test_encoder_with_generative_data(capsys, tmp_path, bert_dir, data_dir):
    check_error(capsys, tmp_path, train(bert_dir, data_dir / "pc.jsonl"), "is an encoder")


def test_bad_config_file_key(capsys, tmp_path, llama_dir, data_dir):
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 0.1\n")
    check_error(capsys, tmp_path, train(llama_dir, data_dir / "pc.jsonl", "--config", config),
                "unknown option(s) ['learning_rate']")


@pytest.mark.parametrize("line, expected", [
    ("lr: fast", "lr: cannot read 'fast' as float"),
    ("data: [1, 2]", "data: [1, 2] is not a string"),
    ("precision: fp8", "precision: 'fp8' is not one of auto, bf16, fp32"),
    ("gradient_checkpointing: maybe", "gradient_checkpointing: 'maybe' is not true or false"),
    ("batch_size: 2.5", "batch_size: 2.5 is not a whole number"),
    ("r: four", "--r: cannot read 'four' as int"),
    ("r: [1, 2]", "--r: [1, 2] is not valid here (expected int)"),
    ("target_modules: 5", "--target-modules: 5 is not valid here (expected list of str or str)"),
    ("use_dora: 1", "--use-dora: 1 is not valid here (expected bool)"),
])
def test_bad_config_file_values(capsys, tmp_path, llama_dir, data_dir, line, expected):
    """A config file's value of the wrong type is refused as its flag would refuse it, in one line."""
    config = tmp_path / "c.yaml"
    config.write_text(line + "\n")
    check_error(capsys, tmp_path, train(llama_dir, data_dir / "pc.jsonl", "--config", config), expected)


def test_config_file_values_are_typed_like_flags(capsys, tmp_path, llama_dir, data_dir):
    """Strings a YAML file leaves as text (``lr: 3e-3`` is a string to YAML 1.1) are read as the flag reads them."""
    config = tmp_path / "c.yaml"
    config.write_text("lr: 3e-3\nbatch_size: '2'\nr: 2\ntarget_modules: [q_proj, v_proj]\nforgetting_tokens: 0\n")
    out = tmp_path / "run"
    code = main([str(a) for a in train(llama_dir, data_dir / "pc.jsonl", "--config", config, "--output-dir", out,
                                       "--eval-samples", 2)])
    assert code == 0, capsys.readouterr().err
    run = json.loads((out / "run_config.json").read_text())
    assert run["lr"] == 3e-3 and run["batch_size"] == 2
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("argv, expected", [
    (["inspect", "/no/such/dir"], "is not a directory"),
    (["eval", "--adapter", "/no/such/dir"], "is not a directory"),
    (["merge", "--adapter", "/no/such/dir", "--output-dir", "/tmp/never-written-by-test"], "is not a directory"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_other_commands(capsys, tmp_path, argv, expected):
    check_error(capsys, tmp_path, argv, expected)
    assert not os.path.exists("/tmp/never-written-by-test")


def test_inspect_a_directory_without_an_adapter(capsys, tmp_path):
    (tmp_path / "x").mkdir()
    check_error(capsys, tmp_path, ["inspect", tmp_path / "x"], "has no adapter_config.json")


def test_targets_that_match_nothing_fail_before_anything_is_evaluated_or_written(capsys, tmp_path, llama_dir,
                                                                                 data_dir):
    out = tmp_path / "out"
    code = main([str(a) for a in train(llama_dir, data_dir / "pc.jsonl", "--target-modules", "c_attn",
                                       "--output-dir", out)])
    stdout, stderr = capsys.readouterr()
    assert code == 2 and "target_modules=['c_attn'] matched no module" in stderr
    assert "evaluating" not in stdout and not out.exists()


def test_an_adapter_on_a_model_it_was_not_trained_on_names_its_base(capsys, tmp_path, llama_dir, data_dir):
    from support import tinymodels

    code = main([str(a) for a in train(llama_dir, data_dir / "pc.jsonl", "--output-dir", tmp_path / "a")])
    assert code == 0
    capsys.readouterr()
    other = tinymodels.make_llama(str(tmp_path / "other"), seed=1)
    # Same architecture, other sizes: the saved A/B do not fit.
    cfg = json.loads((tmp_path / "other" / "config.json").read_text())
    cfg.update(hidden_size=48, intermediate_size=96)
    (tmp_path / "other" / "config.json").write_text(json.dumps(cfg))
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(other)).save_pretrained(other)
    line = check_error(capsys, tmp_path, ["eval", "--adapter", tmp_path / "a", "--model", other,
                                          "--data", data_dir / "pc.jsonl"],
                       f"was trained on {llama_dir}, not on --model {other}")
    assert "drop --model" in line
