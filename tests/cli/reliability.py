"""What the CLI tests share: ``run`` (``main(argv)`` with its exit code and captured output), ``read_json``, a
saved tiny LoRA adapter and the one-line-error check of the reliability tests (test_merge_output_dir,
test_non_finite_adapters, test_bad_adapter_files)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import deltatune
from deltatune.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def read_json(path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def assert_peft_loads_it_equal(base_dir, adapter_dir, atol: float = 1e-5) -> None:
    """deltatune and peft load the adapter onto fresh copies of the base in ``base_dir``: equal logits."""
    import warnings

    from peft import PeftModel as HFPeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 9, 13, 17, 21]])
    ours = deltatune.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = HFPeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=atol, rtol=atol)


def one_line_error(capsys, *argv) -> str:
    """Run the CLI, check it failed with exit 2 and one ``deltatune: error:`` line; return that line."""
    code, _, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("deltatune: error: "), err
    return lines[0]


def tree(path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes: what a refused command must leave untouched."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out


@pytest.fixture(scope="module")
def adapter(llama_dir, tmp_path_factory) -> str:
    """A saved LoRA adapter (r=4, random factors) on the tiny Llama; it names the Llama as its base."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = deltatune.get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), deltatune.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    d = tmp_path_factory.mktemp("adapters") / "a"
    model.save_pretrained(d)
    return str(d)


@pytest.fixture
def own_adapter(adapter, tmp_path) -> str:
    """A private copy of :func:`adapter`, which a test may break or that a buggy merge may delete."""
    d = tmp_path / "adapter"
    shutil.copytree(adapter, d)
    return str(d)




