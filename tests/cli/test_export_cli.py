"""``deltatune export --to lora`` (issue 19 item 6): writes PEFT's LoRA files, prints the per-layer and the logit
error; refuses bad input in one line and writes nothing then."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

import deltatune

from .reliability import one_line_error, run, tree


@pytest.fixture(scope="module")
def loha_adapter(llama_dir, tmp_path_factory) -> str:
    """A LoHa adapter (r=4, random factors) on the tiny Llama, naming it as its base."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = deltatune.get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), deltatune.LoHaConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_weights=False, task_type="CAUSAL_LM"))
    d = tmp_path_factory.mktemp("adapters") / "loha"
    model.save_pretrained(d)
    return str(d)


def _logit_error(stdout: str) -> float:
    return float(re.search(r"max \|logit diff\| ([0-9.e+-]+)", stdout).group(1))


def test_export_full_rank_is_exact_and_loads_in_peft(capsys, loha_adapter, llama_dir, tmp_path):
    out = tmp_path / "lora"
    code, stdout, err = run(capsys, "export", "--to", "lora", "--rank", 32, loha_adapter, out)
    assert code == 0, err
    assert "as LoRA r=32" in stdout and "per-layer relative error" in stdout
    assert _logit_error(stdout) < 1e-4
    with open(out / "adapter_config.json") as fh:
        config = json.load(fh)
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 32
    assert config["base_model_name_or_path"] == llama_dir
    import peft
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(out))(ids).logits
        source = deltatune.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir),
                                                     loha_adapter)(ids).logits
    torch.testing.assert_close(theirs, source, rtol=0, atol=1e-4)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-export-")]


def test_export_error_falls_with_rank_and_energy_works(capsys, loha_adapter, tmp_path):
    errors = []
    for rank in (1, 4):
        code, stdout, err = run(capsys, "export", "--rank", rank, loha_adapter, tmp_path / f"r{rank}")
        assert code == 0, err
        errors.append(_logit_error(stdout))
    assert errors[0] > errors[1] > 0
    code, stdout, err = run(capsys, "export", "--energy", 0.9, loha_adapter, tmp_path / "e")
    assert code == 0, err
    assert float(re.search(r"over \d+ layers: max ([0-9.e+-]+)", stdout).group(1)) <= 0.1 ** 0.5 + 1e-6


@pytest.mark.parametrize("argv, needle", [
    (["--rank", "0"], "--rank must be a positive integer"),
    (["--energy", "2"], "--energy must be in (0, 1]"),
    ([], "one of the arguments --rank --energy is required"),
])
def test_bad_sizes_are_one_line_and_write_nothing(capsys, loha_adapter, tmp_path, argv, needle):
    before = tree(tmp_path)
    line = one_line_error(capsys, "export", *argv, loha_adapter, tmp_path / "out")
    assert needle in line, line
    assert tree(tmp_path) == before and not (tmp_path / "out").exists()


def test_non_empty_output_or_a_prompt_adapter_is_refused(capsys, loha_adapter, llama_dir, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    line = one_line_error(capsys, "export", "--rank", 4, loha_adapter, tmp_path / "full")
    assert "not an empty directory" in line
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep"
    from transformers import AutoModelForCausalLM

    prompt = deltatune.get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), deltatune.PromptTuningConfig(
        num_virtual_tokens=4, task_type="CAUSAL_LM"))
    prompt.save_pretrained(tmp_path / "prompt")
    line = one_line_error(capsys, "export", "--rank", 4, tmp_path / "prompt", tmp_path / "out")
    assert "no weight delta" in line and not (tmp_path / "out").exists()
