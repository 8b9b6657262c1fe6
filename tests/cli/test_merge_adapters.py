"""``deltatune merge --adapters ...``: combine adapters from the command line (tiny random Llama, in-process)."""

from __future__ import annotations

import json
import os
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import deltatune
from deltatune.cli import main

X = torch.tensor([[5, 17, 42, 9, 100, 3]])


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _base(llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_dir).eval()


@pytest.fixture(scope="module")
def adapters(llama_dir, tmp_path_factory):
    """Two saved LoRA adapters (r=4, random factors) on the tiny Llama, plus one of rank 2."""
    root = tmp_path_factory.mktemp("adapters")
    dirs = []
    for i, (r, alpha, targets) in enumerate([(4, 8, ["q_proj", "v_proj"]), (4, 16, ["q_proj", "o_proj"]),
                                             (2, 2, ["q_proj"])]):
        torch.manual_seed(100 + i)
        model = deltatune.get_peft_model(_base(llama_dir), deltatune.LoraConfig(
            r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.mul_(3.0)
        d = root / f"adapter{i}"
        model.save_pretrained(d)
        dirs.append(str(d))
    return dirs


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=X).logits


def _peft_combined(llama_dir, dirs, weights, how, **kwargs):
    model = peft.PeftModel.from_pretrained(_base(llama_dir), dirs[0], adapter_name="s0")
    for i, d in enumerate(dirs[1:], start=1):
        model.load_adapter(d, adapter_name=f"s{i}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter([f"s{i}" for i in range(len(dirs))], weights, "m", combination_type=how, **kwargs)
    model.set_adapter("m")
    return model


def test_ties_writes_an_adapter_peft_loads_equal_to_peft_combining_itself(capsys, llama_dir, adapters, tmp_path):
    out = tmp_path / "ties"
    code, stdout, err = run(capsys, "merge", "--adapters", adapters[0], adapters[1], "--weights", 0.5, 0.5,
                            "--how", "ties", "--density", 0.5, "--majority-sign-method", "total", "--output-dir", out)
    assert code == 0, err
    assert "combined 2 adapters (ties" in stdout and "r=4" in stdout
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4 and set(config["target_modules"]) == {"q_proj", "v_proj",
                                                                                                   "o_proj"}
    loaded = peft.PeftModel.from_pretrained(_base(llama_dir), str(out)).eval()
    reference = _peft_combined(llama_dir, adapters[:2], [0.5, 0.5], "ties", density=0.5)
    torch.testing.assert_close(_logits(loaded), _logits(reference), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(_logits(loaded), _logits(_base(llama_dir)), atol=1e-3)


def test_dare_is_reproducible_under_the_seed(capsys, adapters, tmp_path):
    files = []
    for i, seed in enumerate([3, 3, 4]):
        out = tmp_path / f"dare{i}"
        code, _, err = run(capsys, "merge", "--adapters", *adapters[:2], "--how", "dare_ties", "--density", 0.4,
                           "--seed", seed, "--output-dir", out)
        assert code == 0, err
        files.append(load_file(out / "adapter_model.safetensors"))
    assert all(torch.equal(files[0][k], files[1][k]) for k in files[0])
    assert any(not torch.equal(files[0][k], files[2][k]) for k in files[0] if "lora_A" in k)


def test_cat_of_different_ranks_merged_into_base(capsys, llama_dir, adapters, tmp_path):
    """--merge-into-base: a plain transformers model equal to base + Σ w_i ΔW_i (cat is exact)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    code, stdout, err = run(capsys, "merge", "--adapters", adapters[0], adapters[2], "--weights", 1.0, -0.5,
                            "--how", "cat", "--merge-into-base", "--output-dir", out)
    assert code == 0, err
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    both = deltatune.PeftModel.from_pretrained(_base(llama_dir), adapters[0], adapter_name="a")
    both.load_adapter(adapters[2], adapter_name="b")
    with torch.no_grad():  # fold 1.0 · ΔW_a - 0.5 · ΔW_b in by hand
        for _, layer in both.base_model.adapter_layers():
            delta = sum(w * layer.get_delta_weight(n) for n, w in (("a", 1.0), ("b", -0.5)) if n in layer.r)
            layer.base_layer.weight += delta
    reference = both.unload()
    torch.testing.assert_close(_logits(merged), _logits(reference), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extra", [[], ["--svd-from-factors"]])
def test_default_weights_average_and_default_how_is_svd(capsys, llama_dir, adapters, tmp_path, extra):
    out = tmp_path / "svd"
    code, _, err = run(capsys, "merge", "--adapters", *adapters[:2], *extra, "--output-dir", out)
    assert code == 0, err
    loaded = deltatune.PeftModel.from_pretrained(_base(llama_dir), str(out))
    reference = _peft_combined(llama_dir, adapters[:2], [0.5, 0.5], "svd")
    torch.testing.assert_close(_logits(loaded), _logits(reference), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--weights", "1"], "--weights has 1 values for 2 --adapters"),
    (["--how", "ties"], "pass density"),
    (["--how", "mean"], "invalid choice"),
])
def test_bad_combinations_are_one_line_and_write_nothing(capsys, adapters, tmp_path, extra, message):
    out = tmp_path / "never"
    code, _, err = run(capsys, "merge", "--adapters", *adapters[:2], *extra, "--output-dir", out)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-merge")]


def test_linear_needs_equal_ranks_and_flags_need_adapters(capsys, adapters, tmp_path):
    code, _, err = run(capsys, "merge", "--adapters", adapters[0], adapters[2], "--how", "linear",
                       "--output-dir", tmp_path / "x")
    assert code == 2 and "same rank" in err
    code, _, err = run(capsys, "merge", "--adapter", adapters[0], "--weights", 1, "--output-dir", tmp_path / "y")
    assert code == 2 and "use --adapters" in err
    code, _, err = run(capsys, "merge", "--adapter", adapters[0], "--adapters", adapters[1], "--output-dir",
                       tmp_path / "z")
    assert code == 2 and "not allowed with" in err


def test_adapters_saved_on_their_own_rewritten_base_are_not_combined(capsys, llama_dir, adapters, tmp_path):
    """A PiSSA adapter saved as created rewrites the base when loaded; loading a second source onto that base (or a
    second such adapter) would stack the rewrites, so combining refuses it and names the conversion."""
    pissa = deltatune.get_peft_model(_base(llama_dir), deltatune.LoraConfig(r=4, target_modules=["q_proj"],
                                                                            init_lora_weights="pissa"))
    pissa.save_pretrained(tmp_path / "pissa")
    out = tmp_path / "never"
    code, _, err = run(capsys, "merge", "--adapters", adapters[0], tmp_path / "pissa", "--output-dir", out)
    assert code == 2 and "path_initial_model_for_weight_conversion" in err and err.count("\n") == 1
    assert not out.exists()


def test_combining_keeps_no_base_rewriting_init_in_the_new_config(llama_dir):
    """add_weighted_adapter overwrites the new adapter's factors, so its config must not re-run an init that
    rewrites the base or needs data (LoftQ would quantise the base, CorDA would ask for preprocess_corda)."""
    base_model = _base(llama_dir)
    before = {k: v.clone() for k, v in base_model.state_dict().items()}
    model = deltatune.get_peft_model(base_model, deltatune.LoraConfig(r=4, target_modules=["q_proj"],
                                                                      init_lora_weights=False), adapter_name="a")
    model.peft_config["a"].init_lora_weights = "loftq"  # as a loaded LoftQ adapter's config reads
    model.peft_config["a"].loftq_config = {"loftq_bits": 4, "loftq_iter": 1}
    model.add_weighted_adapter(["a"], [1.0], "m", combination_type="svd")
    assert model.peft_config["m"].init_lora_weights is True
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in model.state_dict().items()
            if "lora_" not in k}
    assert all(torch.equal(before[k], base[k]) for k in before)  # the base was not rewritten
