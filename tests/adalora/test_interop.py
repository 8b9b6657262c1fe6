"""AdaLoRA adapters cross between PEFT and deltatune both ways, before and after allocation.

"After allocation" adapters are trained by both libraries from the same seed on the same data with the
same loop; their training runs coincide (same logits, same rank pattern), so each library's file is checked
against the other's and each is loaded by the other library.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings

import peft
import pytest
import torch
from adalora_helpers import layers
from safetensors.torch import load_file
from support.models import make_inputs, output, tiny_gpt2, tiny_llama
from torch import nn

import deltatune as dt
from deltatune.errors import ConfigError

ATOL, RTOL = 2e-6, 1e-5
STEPS = 12
KW = dict(init_r=6, target_r=3, tinit=2, tfinal=3, total_step=STEPS, lora_alpha=16, task_type="CAUSAL_LM")
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


class ConvNet(nn.Module):
    """``Conv2d(3, 8, 3) -> relu -> mean -> Linear(8, 5)``; ``img: (B, 3, 8, 8) -> (B, 5)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(img)).mean((-1, -2)))


def conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNet().eval()


CASES = {  # name: (factory, inputs, config overrides)
    "llama": (tiny_llama, make_inputs("llama"), dict(target_modules=LLAMA_TARGETS)),
    "gpt2-conv1d": (tiny_gpt2, make_inputs("gpt2"), dict(target_modules=["c_attn", "c_proj"])),
    "conv2d": (conv_net, {"img": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))},
               dict(target_modules=["conv", "head"], task_type=None)),
}


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _make(lib, factory, seed=1, **overrides):
    kw = {**KW, **overrides}
    with _quiet():
        config = (dt.AdaLoraConfig if lib == "dt" else peft.AdaLoraConfig)(**kw)
        torch.manual_seed(seed)
        return (dt.get_peft_model if lib == "dt" else peft.get_peft_model)(factory(), config)


def _train_llama(model, lib: str, steps: int, first: int = 1, opt=None):
    """The same loop for both libraries: labels in, ``outputs.loss`` (with the penalty) backward."""
    model.train()
    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
    for step in range(first, first + steps):
        ids = torch.randint(3, 100, (4, 10), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        (model.update_and_allocate if lib == "dt" else model.base_model.update_and_allocate)(step)
        opt.zero_grad()
    model.eval()
    return opt


def _files(directory):
    with open(os.path.join(directory, "adapter_config.json")) as fh:
        return load_file(os.path.join(directory, "adapter_model.safetensors")), json.load(fh)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both libraries' tiny-Llama adapters after the whole schedule, saved."""
    out = {}
    for lib in ("dt", "peft"):
        model = _make(lib, tiny_llama, target_modules=LLAMA_TARGETS)
        _train_llama(model, lib, STEPS)
        directory = str(tmp_path_factory.mktemp(f"trained-{lib}"))
        with _quiet():
            model.save_pretrained(directory)
        out[lib] = (model, directory)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_before_allocation_both_ways(case, tmp_path):
    factory, inputs, overrides = CASES[case]
    overrides = {**overrides, "init_lora_weights": False}  # random P, Λ, Q: far from the base model
    ours, theirs = _make("dt", factory, **overrides), _make("peft", factory, **overrides)
    ours.eval(), theirs.eval()
    base = output(factory(), inputs)
    ours_out = output(ours, inputs)
    assert not torch.allclose(ours_out, base, atol=1e-3), "the adapter must change the output"
    torch.testing.assert_close(ours_out, output(theirs, inputs), atol=ATOL, rtol=RTOL)  # same seed, same init
    with _quiet():
        ours.save_pretrained(tmp_path / "dt")
        theirs.save_pretrained(tmp_path / "peft")
        peft_loads = peft.PeftModel.from_pretrained(factory(), str(tmp_path / "dt"))
        dt_loads = dt.PeftModel.from_pretrained(factory(), str(tmp_path / "peft"))
    torch.testing.assert_close(output(peft_loads.eval(), inputs), ours_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(output(dt_loads, inputs), output(theirs, inputs), atol=ATOL, rtol=RTOL)
    (ours_t, ours_cfg), (their_t, their_cfg) = _files(tmp_path / "dt"), _files(tmp_path / "peft")
    assert {k: v.shape for k, v in ours_t.items()} == {k: v.shape for k, v in their_t.items()}
    assert not any("ranknum" in k for k in ours_t)
    assert set(ours_cfg) == set(their_cfg)
    assert ours_cfg["rank_pattern"] is None and their_cfg["rank_pattern"] is None


def test_training_matches_peft_step_for_step(trained):
    (ours, _), (theirs, _) = trained["dt"], trained["peft"]
    inputs = make_inputs("llama")
    torch.testing.assert_close(output(ours, inputs), output(theirs, inputs), atol=1e-5, rtol=1e-4)
    their_pattern = {k.replace(".default", ""): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    assert ours.peft_config["default"].rank_pattern == their_pattern
    assert sum(sum(v) for v in their_pattern.values()) == 3 * 6  # target_r · (3 targets x 2 layers)


def test_after_allocation_files_match(trained):
    (ours_t, ours_cfg), (their_t, their_cfg) = _files(trained["dt"][1]), _files(trained["peft"][1])
    assert {k: v.shape for k, v in ours_t.items()} == {k: v.shape for k, v in their_t.items()}
    assert ours_cfg["rank_pattern"] == their_cfg["rank_pattern"]
    for key, keep in ours_cfg["rank_pattern"].items():
        module = "base_model.model." + key.removesuffix(".lora_E")
        assert ours_t[module + ".lora_A"].shape[0] == sum(keep)  # sliced to the kept triplets
        assert ours_t[module + ".lora_B"].shape[1] == sum(keep)
        assert ours_t[module + ".lora_E"].shape == (sum(keep), 1)
    assert len({v.shape for k, v in ours_t.items() if k.endswith("lora_E")}) > 1, "allocation is uniform"
    for k in ours_t:
        torch.testing.assert_close(ours_t[k], their_t[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("direction", ["peft-loads-ours", "we-load-peft"])
def test_after_allocation_both_ways(trained, direction):
    src = "dt" if direction == "peft-loads-ours" else "peft"
    model, directory = trained[src]
    inputs = make_inputs("llama")
    with _quiet():
        loaded = (peft.PeftModel if src == "dt" else dt.PeftModel).from_pretrained(tiny_llama(), directory)
    torch.testing.assert_close(output(loaded.eval(), inputs), output(model, inputs), atol=ATOL, rtol=RTOL)
    if src == "peft":  # our loader built every layer at its kept rank before loading
        pattern = loaded.peft_config["default"].rank_pattern
        for name, layer in layers(loaded):
            assert layer.r["default"] == sum(pattern[f"{name}.lora_E"])
            assert float(layer.ranknum["default"]) == 6.0  # the scaling keeps dividing by init_r


def test_mid_schedule_save_loads_in_both_libraries(tmp_path):
    ours = _make("dt", tiny_llama, target_modules=LLAMA_TARGETS)
    _train_llama(ours, "dt", 5)  # budget phase: some triplets masked, pattern not final
    pattern = ours.peft_config["default"].rank_pattern
    assert 3 * 6 < sum(sum(v) for v in pattern.values()) < 6 * 6
    ours.save_pretrained(tmp_path)
    inputs = make_inputs("llama")
    with _quiet():
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
        back = dt.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(output(theirs.eval(), inputs), output(ours, inputs), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(output(back, inputs), output(ours, inputs), atol=ATOL, rtol=RTOL)


def test_merge_unmerge_and_unload_after_allocation(trained):
    _, directory = trained["peft"]
    inputs = make_inputs("llama")
    model = dt.PeftModel.from_pretrained(tiny_llama(), directory)
    adapted = output(model, inputs)
    with model.disable_adapter():
        torch.testing.assert_close(output(model, inputs), output(tiny_llama(), inputs), atol=0, rtol=0)
    model.merge_adapter()
    torch.testing.assert_close(output(model, inputs), adapted, atol=ATOL, rtol=RTOL)
    model.unmerge_adapter()
    torch.testing.assert_close(output(model, inputs), adapted, atol=ATOL, rtol=RTOL)
    merged = model.merge_and_unload()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(output(merged, inputs), adapted, atol=ATOL, rtol=RTOL)


def _reload_train_save_and_check(directory, first, steps, tmp_path):
    """Load ``directory`` trainable, train ``steps`` more steps from ``first``, save, and have PEFT load it."""
    model = dt.PeftModel.from_pretrained(tiny_llama(), directory, is_trainable=True)
    before = {n: layer.lora_A["default"].detach().clone() for n, layer in layers(model)}
    _train_llama(model, "dt", steps, first=first)
    assert any(not torch.equal(before[n], layer.lora_A["default"]) for n, layer in layers(model)), "no training"
    model.save_pretrained(tmp_path)
    _, config = _files(tmp_path)
    assert all(len(keep) == 6 for keep in config["rank_pattern"].values()), "patterns must keep init_r flags"
    inputs = make_inputs("llama")
    with _quiet():
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(output(theirs.eval(), inputs), output(model, inputs), atol=ATOL, rtol=RTOL)
    return model, config


def test_trainable_reload_of_a_final_adapter_keeps_its_pattern(trained, tmp_path):
    _, directory = trained["dt"]
    _, saved = _files(directory)
    model, config = _reload_train_save_and_check(directory, STEPS + 1, 2, tmp_path)  # the fixed-pattern phase
    assert config["rank_pattern"] == saved["rank_pattern"]
    assert all(torch.all(layer.lora_E["default"] != 0) for _, layer in layers(model))  # only kept triplets left


def test_trainable_reload_mid_schedule_finishes_the_schedule(tmp_path):
    ours = _make("dt", tiny_llama, target_modules=LLAMA_TARGETS)
    _train_llama(ours, "dt", 5)
    ours.save_pretrained(tmp_path / "mid")
    mid = {k: sum(v) for k, v in ours.peft_config["default"].rank_pattern.items()}
    _, config = _reload_train_save_and_check(str(tmp_path / "mid"), 6, STEPS - 5, tmp_path / "end")
    final = {k: sum(v) for k, v in config["rank_pattern"].items()}
    assert sum(final.values()) == 3 * 6 < sum(mid.values())
    assert all(final[k] <= mid[k] for k in mid), "a pruned-away triplet cannot come back after reloading"


def test_mixed_adapter_batch(trained):
    _, directory = trained["dt"]
    inputs = make_inputs("llama", batch=2)
    model = dt.PeftModel.from_pretrained(tiny_llama(), directory)
    adapted = output(model, inputs)
    base = output(tiny_llama(), inputs)
    mixed = output_mixed(model, inputs, ["default", "__base__"])
    torch.testing.assert_close(mixed[0], adapted[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(mixed[1], base[1], atol=ATOL, rtol=RTOL)
    # generate()'s expanded rows (each input row repeated in place) keep their row's adapter
    doubled = {k: v.repeat_interleave(2, dim=0) for k, v in inputs.items()}
    mixed = output_mixed(model, doubled, ["default", "__base__"])
    for row, want in enumerate([adapted[0], adapted[0], base[1], base[1]]):
        torch.testing.assert_close(mixed[row], want, atol=ATOL, rtol=RTOL)
    model.merge_adapter()  # merged weights would apply to every row: refused rather than wrong
    with pytest.raises(ConfigError, match="unmerge_adapter"):
        output_mixed(model, inputs, ["default", "__base__"])


def output_mixed(model, inputs, names):
    with torch.no_grad():
        return model(**inputs, adapter_names=names).logits
