"""PiSSA / OLoRA adapters saved as plain LoRA for the original base (``path_initial_model_for_weight_conversion``)."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from support.models import make_inputs, output, perturb_trainable, tiny_llama

import deltatune as dt
from deltatune.errors import AdapterLoadError, ConfigError

CASES = {
    "pissa": dict(init_lora_weights="pissa"),
    "olora": dict(init_lora_weights="olora"),
    "pissa-rslora": dict(init_lora_weights="pissa", use_rslora=True),
    "pissa-patterns": dict(init_lora_weights="pissa", rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 6}),
    # peft refuses this one ("not supported when using rank_pattern or alpha_pattern ... use_rslora"); every
    # layer keeps alpha_l / sqrt(r_l) = sqrt(2) alpha_l / sqrt(2 r_l), so we convert it.
    "pissa-rslora-patterns": dict(init_lora_weights="pissa", use_rslora=True, rank_pattern={"q_proj": 2},
                                  alpha_pattern={"v_proj": 6}),
}


def config(lib, case: str):
    return lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **CASES[case])


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_adapter_runs_on_the_original_base_in_both_libraries(tmp_path, case):
    inputs = make_inputs("llama")
    original = output(tiny_llama(), inputs)
    model = dt.get_peft_model(tiny_llama(), config(dt, case))
    model.eval()
    torch.testing.assert_close(output(model, inputs), original, atol=1e-4, rtol=0)  # residual + B0 A0 = W
    model.save_pretrained(tmp_path / "init")
    perturb_trainable(model, seed=3, std=0.05)  # stands in for training
    trained = output(model, inputs)
    assert (trained - original).abs().max() > 1e-3
    model.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")

    saved = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain LoRA now: no "expects the residual base" warning
        ours = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "plain").eval()
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "plain")).eval()
    torch.testing.assert_close(output(ours, inputs), trained, atol=1e-5, rtol=0)
    torch.testing.assert_close(output(theirs, inputs), trained, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", sorted(set(CASES) - {"pissa-rslora-patterns"}))
def test_converted_config_is_the_one_peft_writes(tmp_path, case):
    """peft converting its own PiSSA/OLoRA adapter writes the same rank, alpha and patterns as we do."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), config(peft, case))
        theirs.save_pretrained(str(tmp_path / "p_init"))
        theirs.save_pretrained(str(tmp_path / "p_plain"),
                               path_initial_model_for_weight_conversion=str(tmp_path / "p_init"))
    ours = dt.get_peft_model(tiny_llama(), config(dt, case))
    ours.save_pretrained(tmp_path / "d_init")
    ours.save_pretrained(tmp_path / "d_plain", path_initial_model_for_weight_conversion=tmp_path / "d_init")
    keys = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights", "use_rslora")
    p, d = (json.loads((tmp_path / f"{x}_plain" / "adapter_config.json").read_text()) for x in ("p", "d"))
    assert {k: p[k] for k in keys} == {k: d[k] for k in keys}


def test_peft_recipe_init_lora_weights_true_before_saving_the_initial_adapter(tmp_path):
    """PEFT's documented recipe sets ``init_lora_weights = True`` on the model's config before saving the initial
    adapter (so that loading it does not subtract the factors again); the conversion must still happen."""
    inputs = make_inputs("llama")
    original = output(tiny_llama(), inputs)
    model = dt.get_peft_model(tiny_llama(), config(dt, "pissa"))
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp_path / "init")
    perturb_trainable(model, seed=3, std=0.05)
    trained = output(model.eval(), inputs)
    assert (trained - original).abs().max() > 1e-3
    model.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["r"] == 8
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "plain")).eval()
    torch.testing.assert_close(output(theirs, inputs), trained, atol=1e-5, rtol=0)


def test_conversion_refuses_what_it_cannot_convert(tmp_path):
    plain = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    plain.save_pretrained(tmp_path / "init")
    with pytest.warns(UserWarning, match="only works for converting a PiSSA/CorDA/OLoRA/LoRA-GA adapter"):
        plain.save_pretrained(tmp_path / "x", path_initial_model_for_weight_conversion=tmp_path / "init")
    ia3 = dt.get_peft_model(tiny_llama(), dt.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    ia3.save_pretrained(tmp_path / "ia3_init")
    with pytest.raises(ConfigError, match="not LoRA adapters"):
        ia3.save_pretrained(tmp_path / "w", path_initial_model_for_weight_conversion=tmp_path / "ia3_init")
    pissa = dt.get_peft_model(tiny_llama(), config(dt, "pissa"))
    with pytest.raises(AdapterLoadError, match="does not hold this adapter's initial state"):
        pissa.save_pretrained(tmp_path / "y", path_initial_model_for_weight_conversion=tmp_path / "init")
    dora = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa",
                                                         use_dora=True))
    dora.save_pretrained(tmp_path / "dora_init")
    with pytest.raises(ConfigError, match="not defined with use_dora"):
        dora.save_pretrained(tmp_path / "z", path_initial_model_for_weight_conversion=tmp_path / "dora_init")
