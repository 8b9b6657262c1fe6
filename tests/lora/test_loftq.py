"""LoftQ (issue 19 item 2): ``init_lora_weights="loftq"`` creates PEFT 0.21.2's base and factors, lowers the
quantisation error of plain QLoRA, crosses to and from ``peft`` with equal logits, and refuses what cannot work.

PEFT 0.21.2's ``loftq_init`` computes on ``"cuda"`` (or ``"xpu"``) and its ``LoraConfig`` asks for scipy (which it
no longer uses) when ``init_lora_weights="loftq"``; :func:`peft_on_cpu` sends those device moves to the CPU and
answers the scipy check, so PEFT's own code runs here unchanged otherwise (bitsandbytes quantises on the CPU).
"""

from __future__ import annotations

import copy
import importlib.machinery
import importlib.util
import json
import warnings

import bitsandbytes as bnb
import peft
import pytest
import torch
from support.models import tiny_gpt2, tiny_llama

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.lora.layer import LoraLinear
from deltatune.quantization import dequantize_weight

IDS = torch.tensor([[1, 5, 7, 9, 11, 13], [2, 4, 6, 8, 10, 12]])
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _on_cpu(device: object) -> object:
    if isinstance(device, str) and device.startswith("cuda") or isinstance(device, torch.device) and \
            device.type == "cuda":
        return "cpu"
    return device


@pytest.fixture
def peft_on_cpu(monkeypatch):
    """Run PEFT's LoftQ on this CPU-only machine (see the module docstring)."""
    for cls in (torch.Tensor, bnb.nn.Params4bit, bnb.nn.Int8Params):
        original = cls.to

        def to(self, *args, _original=original, **kwargs):
            args = tuple(_on_cpu(a) for a in args)
            if "device" in kwargs:
                kwargs["device"] = _on_cpu(kwargs["device"])
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "to", to)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: importlib.machinery.ModuleSpec(name, None)
                        if name == "scipy" else find_spec(name, *a, **k))


def peft_loftq(bits: int, iters: int, r: int = 4, alpha: float = 4) -> peft.PeftModel:
    return peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules="all-linear", init_lora_weights="loftq",
        loftq_config=peft.LoftQConfig(loftq_bits=bits, loftq_iter=iters)))


def ours_loftq(bits: int = 4, iters: int = 1, r: int = 4, alpha: float = 4, base=None) -> dt.PeftModel:
    return dt.get_peft_model(base if base is not None else tiny_llama(), dt.LoraConfig(
        r=r, lora_alpha=alpha, target_modules="all-linear", init_lora_weights="loftq",
        loftq_config=dt.LoftQConfig(loftq_bits=bits, loftq_iter=iters)))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("bits, iters", [(4, 1), (4, 3), (8, 2)])
def test_same_base_and_factors_as_peft(peft_on_cpu, bits, iters):
    theirs = peft_loftq(bits, iters).state_dict()
    ours = ours_loftq(bits, iters).state_dict()
    assert sorted(ours) == sorted(theirs)
    assert sum(".lora_A." in k for k in ours) == 2 * len(LINEARS)
    original = tiny_llama().state_dict()
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-6)
        if key.endswith("q_proj.base_layer.weight"):  # the base really is the quantised one, not W
            w = original[key.replace(".base_layer", "").replace("base_model.model.", "")]
            assert (value - w).abs().max() > 1e-4


def _errors(model: dt.PeftModel, original: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Summed over all adapted layers: (||W - (Q + s B A)||^2, ||W - Q||^2) with Q the model's base."""
    loftq = qlora = 0.0
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLinear):
            w = original[name.removeprefix("base_model.model.") + ".weight"]
            q = layer.base_layer.weight
            ba = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            loftq += (w - q - layer.scaling["default"] * ba).norm().item() ** 2
            qlora += (w - q).norm().item() ** 2
    return loftq, qlora


def test_error_is_below_plain_qlora_and_does_not_grow_with_iterations():
    original = tiny_llama().state_dict()
    # plain QLoRA: the NF4 base with B = 0 (bitsandbytes through deltatune.quantize, not the LoftQ code)
    qbase = dt.quantize(tiny_llama(), "nf4", double_quant=False)
    qlora = sum((original[f"{n}.weight"] - dequantize_weight(m)).norm().item() ** 2
                for n, m in qbase.named_modules() if type(m).__name__ == "Linear4bit")
    errors = []
    for iters in (1, 2, 5):
        loftq, first_q = _errors(ours_loftq(iters=iters, r=8, alpha=8), original)
        if iters == 1:
            assert first_q == pytest.approx(qlora, rel=1e-6)  # T = 1 quantises W itself: QLoRA's base
        errors.append(loftq)
    assert errors[0] < 0.9 * qlora  # rank 8 of 32/64 takes out well over 10% of the squared error
    assert errors[1] <= errors[0] * (1 + 1e-6) and errors[2] <= errors[1] * (1 + 1e-6)
    assert errors[2] < errors[0]


def test_the_loftq_base_reloads_in_4_bits_as_itself_with_the_same_logits(tmp_path):
    model = ours_loftq(iters=2)
    expected = logits(model)
    model.save_pretrained(str(tmp_path))
    base = model.unload()  # Q, dense: what LoftQ users save and load in 4 bits
    dense = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith(LINEARS)}
    qbase = dt.quantize(base, "nf4", double_quant=False)
    for name, weight in dense.items():
        assert torch.equal(dequantize_weight(qbase.get_submodule(name)), weight)  # NF4 of Q is Q
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = dt.PeftModel.from_pretrained(qbase, str(tmp_path))
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=1e-4)


def test_peft_loads_ours_and_we_load_peft_with_equal_logits(peft_on_cpu, tmp_path):
    ours = ours_loftq(iters=2)
    ours.save_pretrained(str(tmp_path / "ours"))
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "loftq" and saved["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    theirs = peft_loftq(4, 2)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    assert json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())["loftq_config"] == \
        saved["loftq_config"]
    expected = logits(ours)
    torch.testing.assert_close(logits(theirs), expected, rtol=0, atol=1e-5)
    q_base = copy.deepcopy(ours).unload().state_dict()
    # peft loads our file (its load re-runs LoftQ on the base it is given: Q stays Q) ...
    base = tiny_llama()
    base.load_state_dict(q_base)
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(base, str(tmp_path / "ours"))), expected,
                               rtol=0, atol=1e-5)
    # ... and we load peft's on its LoftQ base (we rebuild LoftQ on it too: Q stays Q; the original float model
    # works as well, tests/lora/test_loftq_load.py)
    base = tiny_llama()
    base.load_state_dict(theirs.unload().state_dict())
    loaded = dt.PeftModel.from_pretrained(base, str(tmp_path / "theirs"))
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-5)


def _unchanged(make, config) -> None:
    base = make()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ConfigError) as info:
        dt.get_peft_model(base, config)
    assert list(base.state_dict()) == list(before)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    return str(info.value)


@pytest.mark.parametrize("loftq_config, match", [
    ({}, "needs loftq_config"),
    ({"loftq_bits": 2, "loftq_iter": 1}, "loftq_bits=2 is not supported"),
    ({"loftq_bits": 4, "loftq_iter": 0}, "loftq_iter=0"),
    ({"loftq_bits": 4, "bits": 1}, "unknown keys"),
])
def test_invalid_loftq_config_is_refused_before_the_model_changes(loftq_config, match):
    message = _unchanged(tiny_llama, dt.LoraConfig(r=4, init_lora_weights="loftq", loftq_config=loftq_config))
    assert match in message


def test_quantised_conv1d_and_embedding_models_are_refused():
    qmodel = lambda: dt.quantize(tiny_llama(), "nf4")  # noqa: E731
    config = dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    assert "replace_lora_weights_loftq" in _unchanged(qmodel, dt.LoraConfig(r=4, **config))
    assert "fan_in_fan_out" in _unchanged(tiny_gpt2, dt.LoraConfig(r=4, fan_in_fan_out=True, **config))
    assert "Linear layers only" in _unchanged(tiny_llama, dt.LoraConfig(r=4, target_modules=["embed_tokens"],
                                                                        **config))


def test_config_as_peft_keeps_it():
    assert dt.LoraConfig(init_lora_weights="loftq", loftq_config=dt.LoftQConfig()).loftq_config == \
        {"loftq_bits": 4, "loftq_iter": 1}
    with pytest.warns(UserWarning, match="ignored when `init_lora_weights` is not 'loftq'"):
        assert dt.LoraConfig(loftq_config=dt.LoftQConfig()).loftq_config == {}


def test_scaling_other_than_one_warns():
    with pytest.warns(UserWarning, match="lora_alpha = r"):
        ours_loftq(r=4, alpha=8)


def test_replace_lora_weights_loftq_equals_peft_and_rolls_back(peft_on_cpu, tmp_path):
    tiny_llama().save_pretrained(str(tmp_path / "model"))
    original = tiny_llama().state_dict()
    qbase = dt.quantize(tiny_llama(), "nf4")  # double-quantised scales: the base need not be LoftQ's NF4
    theirs = peft.get_peft_model(copy.deepcopy(qbase), peft.LoraConfig(r=4, target_modules="all-linear"))
    peft.replace_lora_weights_loftq(theirs, model_path=str(tmp_path / "model"))
    ours = dt.get_peft_model(copy.deepcopy(qbase), dt.LoraConfig(r=4, target_modules="all-linear"))
    untouched = {k: v.clone() for k, v in ours.state_dict().items() if "q_proj.lora_" in k}
    seen = []

    def keep_all_but_q(model, name):
        seen.append(name)
        return not name.endswith("q_proj")

    dt.replace_lora_weights_loftq(ours, model_path=str(tmp_path / "model"), callback=keep_all_but_q)
    assert len(seen) == 2 * len(LINEARS) and seen[0] == "model.layers.0.self_attn.q_proj"
    theirs_state, ours_state = theirs.state_dict(), ours.state_dict()
    for key, value in ours_state.items():
        if key in untouched:
            assert torch.equal(value, untouched[key])  # rolled back
        elif ".lora_" in key:
            torch.testing.assert_close(value, theirs_state[key], rtol=0, atol=1e-6)
    layer = ours.base_model.model.model.layers[1].mlp.up_proj
    w, q = original["model.layers.1.mlp.up_proj.weight"], dequantize_weight(layer.base_layer)
    ba = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert (w - q - ba).norm() < 0.95 * (w - q).norm()


def test_replace_lora_weights_loftq_refusals(tmp_path):
    with pytest.raises(ConfigError, match="4-bit base"):
        dt.replace_lora_weights_loftq(dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4)), model_path=str(tmp_path))
    qmodel = dt.get_peft_model(dt.quantize(tiny_llama(), "nf4"), dt.LoraConfig(r=4))
    with pytest.raises(ConfigError, match="pass model_path="):
        dt.replace_lora_weights_loftq(qmodel)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        dt.replace_lora_weights_loftq(qmodel, model_path=str(tmp_path))
