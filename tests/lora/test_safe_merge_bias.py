"""``safe_merge=True`` checks every tensor a merge writes, the bias included (issue 18): a non-finite merged
``lora_bias`` is refused with a ``MergeError`` (a ``ValueError``, as PEFT's) before any layer changes."""

from __future__ import annotations

import pytest
import torch
from support.models import assert_same_state, params_snapshot
from torch import nn

import deltatune as dt
from deltatune.errors import MergeError


def _assert_unchanged(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Bit-identical state, NaN equal to NaN (the broken adapter's own tensor holds one)."""
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True, msg=key)


def _biased(bad: float, layers: int = 2) -> dt.PeftModel:
    net = nn.Sequential(*[nn.Linear(6, 6) for _ in range(layers)])
    model = dt.get_peft_model(net, dt.LoraConfig(r=2, target_modules=[str(i) for i in range(layers)],
                                                 lora_bias=True, init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model[layers - 1].lora_B["default"].bias[0] = bad  # the last layer's: checked last
    return model


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload", "layer.merge"])
def test_safe_merge_refuses_a_non_finite_lora_bias_and_changes_nothing(bad, how):
    model = _biased(bad)
    base = model.get_base_model()
    before = params_snapshot(base)
    with pytest.raises(MergeError, match="NaN/Inf") as err:
        if how == "merge_adapter":
            model.merge_adapter(safe_merge=True)
        elif how == "merge_and_unload":
            model.merge_and_unload(safe_merge=True)
        else:
            base[1].merge(safe_merge=True)
    assert isinstance(err.value, ValueError)  # PEFT raises ValueError here
    _assert_unchanged(before, base)
    assert not any(layer.merged for layer in base)


def test_safe_merge_checks_the_bias_that_overflows_only_when_added():
    """Both biases finite, the sum is not: the merged bias is what is checked."""
    model = _biased(3e38, layers=1)
    with torch.no_grad():
        model.base_model.model[0].base_layer.bias[0] = 3e38
    before = params_snapshot(model.get_base_model())
    with pytest.raises(MergeError, match="bias"):
        model.merge_adapter(safe_merge=True)
    assert_same_state(before, model.get_base_model())


def test_safe_merge_with_finite_lora_bias_still_merges():
    model = _biased(0.5)
    x = torch.randn(3, 6)
    expected = model(x)
    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["ia3", "bitfit"])
def test_safe_merge_checks_the_merged_bias_of_every_method_that_merges_one(method):
    """IA³ (``b ⊙ l``) and BitFit (``b + Δb``) write the bias on merge too: finite tensors whose merged bias
    overflows are refused, and the base is left as it was."""
    net = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    with torch.no_grad():
        net[1].bias[0] = 3e38
    if method == "ia3":
        model = dt.get_peft_model(net, dt.IA3Config(target_modules=["0", "1"], feedforward_modules=[]))
        trained = model.base_model.model[1].ia3_l["default"]
    else:
        model = dt.get_peft_model(net, dt.BitFitConfig(target_modules=["0", "1"]))
        trained = model.base_model.model[1].bitfit_bias["default"]
    with torch.no_grad():
        trained.fill_(2.0 if method == "ia3" else 3e38)  # finite; 3e38 * 2 and 3e38 + 3e38 are not
    before = params_snapshot(model.get_base_model())
    with pytest.raises(MergeError, match="NaN/Inf in the bias"):
        model.merge_adapter(safe_merge=True)
    assert_same_state(before, model.get_base_model())
