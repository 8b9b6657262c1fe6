"""PiSSA / OLoRA adapters saved as they are (no conversion) reload onto the original base model (issue 18).

PEFT rebuilds the residual base ``W - s B0 A0`` from the base weights when it loads such an adapter; deltatune does
the same, so the files are interchangeable both ways and a reload gives the saved model's outputs.
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from support.models import assert_same_state, make_inputs, output, params_snapshot, tiny_gpt2, tiny_llama
from torch import nn

import deltatune as dt


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


RELOAD_CASES = {
    "pissa": dict(init_lora_weights="pissa"),
    "olora": dict(init_lora_weights="olora"),
    "pissa-rslora": dict(init_lora_weights="pissa", use_rslora=True),
    "olora-patterns": dict(init_lora_weights="olora", rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 6}),
}


def _train_like(model: nn.Module) -> None:
    """Stand in for training: move every adapter factor away from its PiSSA/OLoRA start."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if ".lora_" in name:
                p.mul_(1.5).add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("case", sorted(RELOAD_CASES))
def test_pissa_olora_saved_as_is_reload_onto_the_original_base(tmp_path, case):
    """Saved without conversion, the adapter gives the saved model's outputs on a fresh original base: the
    residual ``W - s B0 A0`` is rebuilt from the base weights on load, in deltatune and in PEFT alike."""
    inputs = make_inputs("llama")
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **RELOAD_CASES[case])
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(**cfg)).eval()
    _train_like(model)
    saved = output(model, inputs)
    assert (saved - output(tiny_llama(), inputs)).abs().max() > 1e-2  # not the identity: the check means something
    model.save_pretrained(tmp_path / "ours")

    ours = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(output(ours, inputs), saved, atol=1e-4, rtol=0)
    theirs = _quiet(peft.PeftModel.from_pretrained, tiny_llama(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(output(theirs, inputs), saved, atol=1e-4, rtol=0)

    # peft-saved -> deltatune-load
    pmodel = _quiet(peft.get_peft_model, tiny_llama(), peft.LoraConfig(**cfg)).eval()
    _train_like(pmodel)
    p_saved = output(pmodel, inputs)
    pmodel.save_pretrained(str(tmp_path / "theirs"))
    ours = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs").eval()
    torch.testing.assert_close(output(ours, inputs), p_saved, atol=1e-4, rtol=0)


def test_pissa_reload_through_load_adapter_and_gpt2_conv1d(tmp_path):
    """``load_adapter`` rebuilds the residual too, also on GPT-2's transposed ``Conv1D`` weights."""
    inputs = make_inputs("gpt2")
    cfg = dt.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights="pissa", fan_in_fan_out=True)
    model = dt.get_peft_model(tiny_gpt2(), cfg).eval()
    _train_like(model)
    saved = output(model, inputs)
    model.save_pretrained(tmp_path / "a")
    host = dt.get_peft_model(tiny_gpt2(), dt.LoraConfig(r=2, target_modules=["c_fc"])).eval()
    host.load_adapter(tmp_path / "a", adapter_name="pissa")
    host.set_adapter("pissa")
    torch.testing.assert_close(output(host, inputs), saved, atol=1e-4, rtol=0)


def test_pissa_niter_reload_is_exact_for_deltatune_files_and_close_to_peft(tmp_path):
    """``pissa_niter_N`` starts from a randomised SVD. deltatune draws it from a fixed seed, so its own files reload
    exactly; PEFT draws from the global RNG (at training and at load), so across libraries the rebuilt residual is
    only close, and loading says so."""
    inputs = make_inputs("llama")
    kw = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa_niter_8")
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(**kw)).eval()
    _train_like(model)
    saved = output(model, inputs)
    model.save_pretrained(tmp_path / "ours")
    torch.manual_seed(123)  # a different global random state than at creation: must not matter
    with pytest.warns(UserWarning, match="randomised SVD"):
        ours = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(output(ours, inputs), saved, atol=1e-4, rtol=0)
    peft_error = (output(_quiet(peft.PeftModel.from_pretrained, tiny_llama(), str(tmp_path / "ours")).eval(),
                          inputs) - saved).abs().max()
    assert peft_error < 0.5  # PEFT's own random draw: close, not equal (its own files behave the same)


def test_failed_pissa_load_leaves_the_base_unchanged(tmp_path):
    """A PiSSA adapter whose file does not fit is refused and the base weights are not left as a residual."""
    cfg = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    dt.get_peft_model(tiny_llama(), cfg).save_pretrained(tmp_path)
    base = tiny_llama(1)  # same architecture, other weights: loads fine
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "adapter_model.safetensors")
    state.pop(next(k for k in state if "v_proj.lora_B" in k))  # incomplete file
    save_file(state, tmp_path / "adapter_model.safetensors")
    before = params_snapshot(base)
    with pytest.raises(ValueError):
        dt.PeftModel.from_pretrained(base, tmp_path)
    assert_same_state(before, base)
