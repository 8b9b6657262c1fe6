"""Bad adapter directories and files (issue 16): one line naming the problem and the fix, exit code 2."""

from __future__ import annotations

import json
import os

import pytest
import torch
from support.adapters import edit_adapter_config

from . import reliability
from .reliability import one_line_error, run

adapter, own_adapter = reliability.adapter, reliability.own_adapter  # fixtures


# ---- bad adapter directories and files: one line, exit 2 ------------------------------------------------------
def test_eval_of_the_weight_file_instead_of_its_directory(capsys, adapter, data_dir):
    file = os.path.join(adapter, "adapter_model.safetensors")
    line = one_line_error(capsys, "eval", "--adapter", file, "--data", data_dir / "pc.jsonl")
    assert "is a file" in line and f"pass the directory that holds it ({adapter})" in line, line


def test_eval_of_a_missing_adapter_says_it_does_not_exist(capsys, tmp_path):
    line = one_line_error(capsys, "eval", "--adapter", tmp_path / "nope")
    assert f"--adapter {tmp_path / 'nope'} does not exist" in line, line
    assert "bbc" not in line.lower()


def _empty_config(directory: str) -> None:
    with open(os.path.join(directory, "adapter_config.json"), "w") as fh:
        fh.write("{}")


def test_an_empty_adapter_config_is_not_called_missing(capsys, own_adapter, data_dir, tmp_path):
    _empty_config(own_adapter)
    for argv in (["inspect", own_adapter], ["eval", "--adapter", own_adapter, "--data", data_dir / "pc.jsonl"],
                 ["merge", "--adapter", own_adapter, "--output-dir", tmp_path / "m"]):
        line = one_line_error(capsys, *argv)
        assert "adapter_config.json is empty: it names no peft_type" in line, line
        assert "has no adapter_config.json" not in line


def test_an_adapter_config_that_is_not_an_object(capsys, own_adapter):
    with open(os.path.join(own_adapter, "adapter_config.json"), "w") as fh:
        fh.write("[1, 2]")
    line = one_line_error(capsys, "inspect", own_adapter)
    assert "must hold a JSON object" in line, line


def test_inspect_refuses_an_unknown_peft_type(capsys, own_adapter):
    edit_adapter_config(own_adapter, peft_type="SUPERLORA")
    line = one_line_error(capsys, "inspect", own_adapter)
    assert "SUPERLORA" in line, line


@pytest.mark.parametrize("damage", ["truncated", "garbage header", "header of the wrong shape"])
def test_inspect_of_a_broken_safetensors_file(capsys, own_adapter, damage):
    path = os.path.join(own_adapter, "adapter_model.safetensors")
    with open(path, "rb") as fh:
        data = fh.read()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage header":
        data = data[:8] + b"\xff" * (len(data) - 8)
    else:
        header = json.dumps({"x": {"dtype": "F32"}}).encode()
        data = len(header).to_bytes(8, "little") + header
    with open(path, "wb") as fh:
        fh.write(data)
    line = one_line_error(capsys, "inspect", own_adapter)
    assert path in line and "re-save" in line, line


class _Payload:
    """Pickles as a call of ``print``: code a plain ``torch.load`` would run."""

    def __reduce__(self):
        return (print, ("deltatune ran pickled code",))


def test_a_pickled_bin_is_refused_without_suggesting_to_unpickle_it(capsys, own_adapter, data_dir, tmp_path):
    os.remove(os.path.join(own_adapter, "adapter_model.safetensors"))
    torch.save({"w": _Payload()}, os.path.join(own_adapter, "adapter_model.bin"))
    for argv in (["inspect", own_adapter], ["eval", "--adapter", own_adapter, "--data", data_dir / "pc.jsonl"],
                 ["merge", "--adapter", own_adapter, "--output-dir", tmp_path / "m"]):
        code, stdout, err = run(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "weights_only" not in err and "ran pickled code" not in stdout + err, err
        assert "pickled code" in err and "safetensors" in err, err


def test_an_adapter_config_with_a_huge_rank_is_refused_before_building(capsys, own_adapter, data_dir, monkeypatch):
    from deltatune.lora.layer import LoraLayer

    def no_build(*args, **kwargs):
        raise AssertionError("the adapter was built from the config before it was checked against the file")

    monkeypatch.setattr(LoraLayer, "update_layer", no_build)
    edit_adapter_config(own_adapter, r=1_000_000_000)
    line = one_line_error(capsys, "eval", "--adapter", own_adapter, "--data", data_dir / "pc.jsonl")
    assert "r=1000000000" in line and "lora_A.weight has shape (4, 32)" in line, line
