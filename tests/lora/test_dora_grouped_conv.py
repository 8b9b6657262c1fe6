"""LoRA and DoRA on grouped convolutions (``groups > 1``), as ``peft`` 0.21.2 defines them: ``A`` reads every input
channel, ``B`` is a grouped 1x1 conv; the adapter trains and crosses with equal logits both ways, merging is refused
(``NotImplementedError``, as PEFT), and a rank that the groups do not divide is refused before the model changes."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from torch import nn

import deltatune as dt


class GroupedConv(nn.Module):
    def __init__(self, out_channels: int = 32, groups: int = 2, kernel: int = 3) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(16, out_channels, kernel, padding=kernel // 2, groups=groups)
        self.lin = nn.Linear(out_channels * 5 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.relu(self.conv2d(x)).flatten(1))


SHAPES = {"groups2": dict(out_channels=32, groups=2), "groups8": dict(out_channels=16, groups=8),
          "groups4_1x1": dict(out_channels=8, groups=4, kernel=1)}
X = torch.randn(2, 16, 5, 5, generator=torch.Generator().manual_seed(0))


def _base(shape: str) -> GroupedConv:
    torch.manual_seed(0)
    return GroupedConv(**SHAPES[shape])


def _config(lib, **kw):
    kw = {"target_modules": ["conv2d"], "use_dora": True, "init_lora_weights": False, "r": 8, "lora_alpha": 8, **kw}
    return lib.LoraConfig(**kw)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _perturb_magnitude(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.5 * torch.rand_like(p))


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("use_dora", [True, False])
@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
def test_crosses_with_peft_equal_logits(tmp_path, shape, use_dora, direction):
    src, dst = (peft, dt) if direction == "peft->deltatune" else (dt, peft)
    torch.manual_seed(1)
    model = _quiet(src.get_peft_model, _base(shape), _config(src, use_dora=use_dora)).eval()
    _perturb_magnitude(model)
    expected = model(X)
    model.save_pretrained(tmp_path)
    loaded = _quiet(dst.PeftModel.from_pretrained, _base(shape), tmp_path).eval()
    torch.testing.assert_close(loaded(X), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_dora_magnitude_and_init_equal_peft(shape):
    """The magnitude starts as PEFT's row norm of ``W + s·ΔW`` (PEFT's layout of ``B A`` for a grouped weight),
    and with ``B = 0`` the adapter is the identity."""
    ours = _quiet(dt.get_peft_model, _base(shape), _config(dt))
    theirs = _quiet(peft.get_peft_model, _base(shape), _config(peft))
    theirs.load_state_dict(ours.state_dict(), strict=False)  # same A, B; magnitude re-derived below
    layer = theirs.base_model.model.conv2d
    layer.lora_magnitude_vector["default"].update_layer(
        base_layer=layer.base_layer, lora_A=layer.lora_A["default"].weight, lora_B=layer.lora_B["default"].weight,
        scaling=layer.scaling["default"])
    torch.testing.assert_close(ours.base_model.model.conv2d.lora_magnitude_vector["default"].weight,
                               layer.lora_magnitude_vector["default"].weight)
    fresh = _quiet(dt.get_peft_model, _base(shape), _config(dt, init_lora_weights=True))
    torch.testing.assert_close(fresh(X), _base(shape)(X))


def test_training_step_matches_peft_gradients():
    ours = _quiet(dt.get_peft_model, _base("groups2"), _config(dt))
    theirs = _quiet(peft.get_peft_model, _base("groups2"), _config(peft))
    theirs.load_state_dict(ours.state_dict())
    ours(X).square().sum().backward()
    theirs(X).square().sum().backward()
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert sorted(ours_grads) == sorted(theirs_grads)
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, theirs_grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("use_dora", [True, False])
def test_merge_refused_like_peft_and_nothing_changes(use_dora):
    model = _quiet(dt.get_peft_model, _base("groups2"), _config(dt, use_dora=use_dora)).eval()
    layer = model.base_model.model.conv2d
    w0, y0 = layer.base_layer.weight.detach().clone(), model(X)
    for safe in (False, True):
        with pytest.raises(NotImplementedError, match="grouped convolution"):
            model.merge_adapter(safe_merge=safe)
        with pytest.raises(dt.errors.MergeError):
            model.merge_adapter(safe_merge=safe)
    assert layer.merged_adapters == []
    assert torch.equal(layer.base_layer.weight, w0)
    torch.testing.assert_close(model(X), y0)


def test_warning_on_creation_like_peft():
    for lib in (dt, peft):
        with pytest.warns(UserWarning, match="LoRA adapter added to ConvNd layer with groups > 1. Merging is not "
                                             "supported."):
            lib.get_peft_model(_base("groups2"), _config(lib))


@pytest.mark.parametrize("use_dora", [True, False])
def test_rank_not_divisible_by_groups_refused_like_peft(use_dora):
    base = _base("groups8")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    message = ("Targeting a Conv2d with groups=8 and rank 4. Currently, support is limited to conv layers where the "
               "rank is divisible by groups.")
    for lib in (peft, dt):
        with pytest.raises(ValueError, match=message):
            lib.get_peft_model(_base("groups8"), _config(lib, r=4, use_dora=use_dora))
    with pytest.raises(dt.errors.ConfigError):
        dt.get_peft_model(base, _config(dt, r=4, use_dora=use_dora))
    assert type(base.conv2d) is nn.Conv2d  # nothing was injected
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
