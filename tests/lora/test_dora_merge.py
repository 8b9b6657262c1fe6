"""Merging several active DoRA adapters, or LoRA + DoRA, gives the unmerged forward (issue 18), as in PEFT.

DoRA's row norm is that of the base weight *without* the adapters merged before it (what ``forward`` uses), so the
merged weight matches the unmerged output, ``unmerge`` restores the base, and PEFT merges to the same weights.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from support.models import make_inputs, output, params_snapshot, tiny_gpt2, tiny_llama
from torch import nn

import deltatune as dt


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


MERGE_CASES = {
    "dora+dora": (dict(use_dora=True), dict(use_dora=True)),
    "lora+dora": (dict(), dict(use_dora=True)),
    "dora+lora": (dict(use_dora=True), dict()),
}


def _two_adapters(lib, first: dict, second: dict, factory=tiny_llama, targets=("q_proj", "v_proj", "down_proj")):
    """A model with adapters "a" and "b" (random, non-identity factors), both active."""
    kw = dict(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False,
              fan_in_fan_out=factory is tiny_gpt2)
    torch.manual_seed(11)
    model = _quiet(lib.get_peft_model, factory(), lib.LoraConfig(**kw, **first), adapter_name="a")
    _quiet(model.add_adapter, "b", lib.LoraConfig(**kw, **second))
    with torch.no_grad():  # magnitudes away from the row norms, so DoRA's rescaling matters
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.linspace(0.5, 1.5, p.numel()).view(p.shape))
    model.base_model.set_adapter(["a", "b"])
    return model.eval()


@pytest.mark.parametrize("case", sorted(MERGE_CASES))
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1D"])
def test_merging_several_active_dora_adapters_gives_the_unmerged_output(case, factory):
    kind = "llama" if factory is tiny_llama else "gpt2"
    targets = ("q_proj", "v_proj", "down_proj") if factory is tiny_llama else ("c_attn", "c_fc")
    inputs = make_inputs(kind)
    model = _two_adapters(dt, *MERGE_CASES[case], factory=factory, targets=targets)
    unmerged = output(model, inputs)
    base = output(factory(), inputs)
    assert (unmerged - base).abs().max() > 1e-2
    before = params_snapshot(model.get_base_model())

    model.merge_adapter()
    torch.testing.assert_close(output(model, inputs), unmerged, atol=1e-4, rtol=1e-4)
    model.unmerge_adapter()
    after = model.get_base_model().state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=1e-5, rtol=1e-5, msg=key)
    torch.testing.assert_close(output(model, inputs), unmerged, atol=1e-5, rtol=1e-5)

    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(output(model, inputs), unmerged, atol=1e-4, rtol=1e-4)
    model.unmerge_adapter()
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(output(merged, inputs), unmerged, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", sorted(MERGE_CASES))
def test_merging_several_dora_adapters_on_a_conv_gives_the_unmerged_output(case):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1))
    x = torch.randn(2, 3, 8, 8)
    first, second = MERGE_CASES[case]
    kw = dict(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
    model = dt.get_peft_model(net, dt.LoraConfig(**kw, **first), adapter_name="a")
    model.add_adapter("b", dt.LoraConfig(**kw, **second))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.linspace(0.5, 1.5, p.numel()).view(p.shape))
    model.base_model.set_adapter(["a", "b"])
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), unmerged, atol=1e-4, rtol=1e-4)
        model.unmerge_adapter()
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", sorted(MERGE_CASES))
def test_several_dora_adapters_merged_match_peft(case):
    inputs = make_inputs("llama")
    ours = _two_adapters(dt, *MERGE_CASES[case])
    theirs = _two_adapters(peft, *MERGE_CASES[case])
    theirs.load_state_dict(ours.state_dict())  # the same tensors under the same keys
    torch.testing.assert_close(output(theirs, inputs), output(ours, inputs), atol=1e-5, rtol=1e-5)
    ours.merge_adapter()
    _quiet(theirs.merge_adapter)
    torch.testing.assert_close(output(ours, inputs), output(theirs, inputs), atol=1e-4, rtol=1e-4)
    for key, value in theirs.get_base_model().state_dict().items():
        if "base_layer" in key:
            torch.testing.assert_close(ours.get_base_model().state_dict()[key], value, atol=1e-5, rtol=1e-4,
                                       msg=key)

