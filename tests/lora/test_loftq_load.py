"""Issue 19: a LoftQ adapter saved as created (``init_lora_weights="loftq"``) loads onto the original float model
with PEFT 0.21.2's outputs: both libraries rebuild LoftQ's quantised base ``Q`` from the weights they are given (bit
for bit the same ``Q``), a base that already is ``Q`` stays ``Q``, a quantised base is taken as given (PEFT cannot
load there), and a failed rebuild leaves the base as it was. PEFT's LoftQ runs here as in ``test_loftq.py``."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import test_loftq
import torch
from support.models import tiny_gpt2, tiny_llama

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.lora import loftq
from deltatune.lora.layer import LoraLinear
from deltatune.quantization import dequantize_weight

peft_on_cpu = test_loftq.peft_on_cpu
IDS = test_loftq.IDS
logits = test_loftq.logits


def _trained(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """``model`` with every LoRA factor moved off its LoftQ start (what training does), in eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _bases(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base weight of every LoRA layer, by the layer's name in the user's model."""
    return {name.removeprefix("base_model.model."): m.base_layer.weight.detach().clone()
            for name, m in model.named_modules() if type(m).__name__ in ("Linear", "LoraLinear")
            and hasattr(m, "base_layer")}


def _no_warnings():
    context = warnings.catch_warnings()
    context.__enter__()
    warnings.simplefilter("error")  # a LoftQ load onto the float model is what PEFT does: nothing to warn about
    return context


@pytest.mark.parametrize("bits, iters", [(4, 1), (4, 2), (8, 2)])
def test_peft_loftq_adapter_loads_onto_the_original_model_as_peft(peft_on_cpu, tmp_path, bits, iters):
    trained = _trained(test_loftq.peft_loftq(bits, iters))
    expected = logits(trained)
    trained.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    context = _no_warnings()
    try:
        ours = dt.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    finally:
        context.__exit__(None, None, None)
    torch.testing.assert_close(logits(theirs), expected, rtol=0, atol=0)  # PEFT rebuilds Q deterministically
    torch.testing.assert_close(logits(ours), expected, rtol=0, atol=1e-5)
    ours_bases, theirs_bases = _bases(ours), _bases(theirs)
    assert len(ours_bases) == 2 * len(test_loftq.LINEARS) and sorted(ours_bases) == sorted(theirs_bases)
    original = tiny_llama().state_dict()
    for name, weight in ours_bases.items():
        assert torch.equal(weight, theirs_bases[name]), name  # PEFT's Q, bit for bit
        assert not torch.equal(weight, original[name + ".weight"])  # not the float W
    plain = dt.PeftModel.from_pretrained(tiny_llama(), str(tmp_path), config=dt.LoraConfig(
        r=4, lora_alpha=4, target_modules="all-linear"))  # the same A, B on W: far from the trained model
    assert (logits(plain) - expected).abs().max() > 1e-3


def test_our_loftq_adapter_loads_onto_the_original_model_in_both_libraries(peft_on_cpu, tmp_path):
    trained = _trained(test_loftq.ours_loftq(bits=4, iters=2))
    expected = logits(trained)
    trained.save_pretrained(str(tmp_path))
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))), expected,
                               rtol=0, atol=1e-5)
    reloaded = dt.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=0)
    assert all(torch.equal(w, _bases(trained)[n]) for n, w in _bases(reloaded).items())
    assert reloaded.peft_config["default"].init_lora_weights == "loftq"  # saves back as PEFT's LoftQ adapter


@pytest.mark.parametrize("bits", [4, 8])
def test_a_base_that_already_is_q_stays_q(tmp_path, bits):
    trained = _trained(test_loftq.ours_loftq(bits=bits, iters=2))
    expected = logits(trained)
    trained.save_pretrained(str(tmp_path))
    q_base = tiny_llama()
    q_base.load_state_dict(copy.deepcopy(trained).unload().state_dict())
    before = {k: v.clone() for k, v in q_base.state_dict().items()}
    loaded = dt.PeftModel.from_pretrained(q_base, str(tmp_path))
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)
    for name, weight in _bases(loaded).items():
        assert torch.equal(weight, before[name + ".weight"]), name


def test_a_quantised_base_is_taken_as_given_where_peft_fails(peft_on_cpu, tmp_path):
    trained = _trained(test_loftq.ours_loftq(bits=4, iters=1))
    expected = logits(trained)
    trained.save_pretrained(str(tmp_path))
    q_base = copy.deepcopy(trained).unload()
    # PEFT runs LoftQ on the packed 4-bit storage and then cannot load the factors
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(dt.quantize(copy.deepcopy(q_base), "nf4", double_quant=False), str(tmp_path))
    qmodel = dt.quantize(q_base, "nf4", double_quant=False)
    packed = {n: m.weight.data.clone() for n, m in qmodel.named_modules() if type(m).__name__ == "Linear4bit"}
    with pytest.warns(UserWarning, match="already quantised: loaded onto it as given"):
        loaded = dt.PeftModel.from_pretrained(qmodel, str(tmp_path))
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-4)
    for name, m in loaded.named_modules():
        if isinstance(m, LoraLinear):
            assert torch.equal(m.base_layer.weight.data, packed[name.removeprefix("base_model.model.")])


def test_a_failed_rebuild_restores_the_original_base(tmp_path, monkeypatch):
    _trained(test_loftq.ours_loftq()).save_pretrained(str(tmp_path))
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    real = loftq.loftq_factors

    def fail_on_the_fifth_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(loftq, "loftq_factors", fail_on_the_fifth_layer)
    with pytest.raises(RuntimeError, match="simulated"):
        dt.PeftModel.from_pretrained(model, str(tmp_path))
    assert len(calls) == 5
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert sorted(after) == sorted(before) and all(torch.equal(before[k], v) for k, v in after.items())


def test_load_adapter_rebuilds_only_that_adapters_layers(tmp_path):
    trained = _trained(test_loftq.ours_loftq(r=4, alpha=4, base=None))
    trained.save_pretrained(str(tmp_path))
    other = _trained(dt.get_peft_model(tiny_llama(), dt.LoraConfig(
        r=4, lora_alpha=4, target_modules=["q_proj"], init_lora_weights="loftq", loftq_config=dt.LoftQConfig())))
    other.save_pretrained(str(tmp_path / "q"))
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["k_proj"]))
    model.load_adapter(str(tmp_path / "q"), adapter_name="q")
    original = tiny_llama().state_dict()
    for name, weight in _bases(model).items():
        assert torch.equal(weight, original[name + ".weight"]) != name.endswith("q_proj"), name
    model.set_adapter("q")
    torch.testing.assert_close(logits(model), logits(other), rtol=0, atol=0)


def test_layers_loftq_cannot_rebuild_are_refused_before_the_base_changes(tmp_path):
    # GPT-2's Conv1D projections (fan_in_fan_out): saved as plain LoRA by peft, then said to be LoftQ
    peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)
                        ).save_pretrained(str(tmp_path / "plain"))
    path = tmp_path / "plain" / "adapter_config.json"
    saved = json.loads(path.read_text())
    saved.update(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    path.write_text(json.dumps(saved))
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="nn.Linear layers only"):
        dt.PeftModel.from_pretrained(model, str(tmp_path / "plain"))
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(before[k], v) for k, v in after.items())


def test_quantize_loftq_base_puts_q_in_4_bits_exactly(tmp_path):
    trained = _trained(test_loftq.ours_loftq(iters=2))
    expected = logits(trained)
    trained.save_pretrained(str(tmp_path))
    model = dt.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    dense = _bases(model)
    loftq.quantize_loftq_base(model)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    for name, layer in layers:
        assert layer.quantized and type(layer.base_layer).__name__ == "Linear4bit"
        assert not layer.base_layer.weight.quant_state.nested  # no double quantisation: NF4 of Q is Q
        assert torch.equal(dequantize_weight(layer.base_layer), dense[name.removeprefix("base_model.model.")])
        assert type(layer.lora_A["default"]) is torch.nn.Linear and layer.lora_A["default"].weight.dtype == \
            torch.float32
    assert type(model.base_model.model.lm_head) is torch.nn.Linear  # the output head stays as it was
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-4)
    with pytest.raises(ConfigError, match="NF4"):
        loftq.quantize_loftq_base(model, "int8")
