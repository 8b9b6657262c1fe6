"""An adapter with NaN/Inf values is refused by every command that uses it (issue 16), in one line that names
the file and the first bad tensor; the library itself still loads it, as PEFT does."""

from __future__ import annotations

import os

import pytest
from safetensors.torch import load_file, save_file

import deltatune

from . import reliability
from .reliability import one_line_error

adapter, own_adapter = reliability.adapter, reliability.own_adapter  # fixtures


# ---- non-finite adapters ------------------------------------------------------------------------------------
@pytest.fixture
def nan_adapter(own_adapter) -> tuple[str, str]:
    """A copy of the adapter with one NaN in one tensor; returns (directory, the bad key)."""
    path = os.path.join(own_adapter, "adapter_model.safetensors")
    state = load_file(path)
    bad = sorted(k for k in state if "lora_B" in k)[1]
    state[bad][0, 0] = float("nan")
    save_file(state, path, metadata={"format": "pt"})
    return own_adapter, bad


def test_eval_merge_generate_refuse_a_nan_adapter(capsys, nan_adapter, data_dir, tmp_path):
    directory, bad = nan_adapter
    file = os.path.join(directory, "adapter_model.safetensors")
    for argv in (["eval", "--adapter", directory, "--data", data_dir / "pc.jsonl", "--eval-samples", 2],
                 ["merge", "--adapter", directory, "--output-dir", tmp_path / "merged"],
                 ["merge", "--adapters", directory, directory, "--output-dir", tmp_path / "combined"],
                 ["generate", "hello", "--adapter", directory, "--max-new-tokens", 2, "--device", "cpu"]):
        line = one_line_error(capsys, *argv)
        assert file in line and bad in line and "NaN" in line, (argv[0], line)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "combined").exists()


def test_the_library_still_loads_a_nan_adapter(llama_dir, nan_adapter):
    """As PEFT does: a user may want to look at the broken tensors."""
    from transformers import AutoModelForCausalLM

    directory, bad = nan_adapter
    model = deltatune.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), directory)
    module, kind = bad.removeprefix("base_model.model.").rsplit(".", 2)[:2]
    weight = model.base_model.model.get_submodule(module).__getattr__(kind)["default"].weight
    assert bool(weight.isnan().any())


