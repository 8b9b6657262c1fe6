"""``deltatune merge --adapters`` writes an adapter, so its output has save_pretrained's README.md model card; a
second combine with --overwrite updates that card (and a user's README there) instead of refusing it."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.cli import main


@pytest.fixture(scope="module")
def adapters(llama_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    dirs = []
    for i in range(2):
        torch.manual_seed(200 + i)
        base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
        model = deltatune.get_peft_model(base, deltatune.LoraConfig(r=4, target_modules=["q_proj"],
                                                                    init_lora_weights=False, task_type="CAUSAL_LM"))
        model.save_pretrained(root / f"a{i}")
        dirs.append(str(root / f"a{i}"))
    return dirs


def test_combine_twice_with_overwrite_keeps_the_users_readme(capsys, adapters, tmp_path):
    out = tmp_path / "combined"
    argv = ["merge", "--adapters", *adapters, "--how", "linear", "--output-dir", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert "library_name: peft" in (out / "README.md").read_text()
    text = (out / "README.md").read_text().replace("# LORA adapter", "# My combined adapter\n\nMy notes.")
    (out / "README.md").write_text(text)
    assert main([*argv, "--overwrite"]) == 0, capsys.readouterr().err
    card = (out / "README.md").read_text()
    assert "My notes." in card and card.count(f"- deltatune {deltatune.__version__}") == 1
