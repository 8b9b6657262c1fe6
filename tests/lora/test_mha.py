"""LoRA on ``nn.MultiheadAttention`` (PEFT's ``lora.MultiheadAttention``): the packed q/k/v projection and
``out_proj`` both adapted, against reference math; merged == unmerged; unload/delete give the plain module back;
files cross with PEFT both ways (same keys, equal outputs)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.errors import ConfigError, TargetModuleError
from deltatune.lora import LoraMultiheadAttention

E = 8


class Net(nn.Module):
    def __init__(self, batch_first: bool = True, **mha) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(E, 2, batch_first=batch_first, **mha)
        self.lin = nn.Linear(E, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.mha(x, x, x, need_weights=False)[0])


def _x() -> torch.Tensor:
    return torch.randn(2, 5, E, generator=torch.Generator().manual_seed(1))


def _perturb(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _reference(model: PeftModel, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
    """A plain copy of the base with W_in + s B_in A_in and W_out + s B_out A_out written in."""
    layer = model.base_model.model.mha
    ref = Net()
    out = layer.base_layer.out_proj
    with torch.no_grad():
        for n in adapters:
            s = layer.scaling[n]
            ref.mha.in_proj_weight += s * layer.lora_B[n].weight @ layer.lora_A[n].weight
            ref.mha.out_proj.weight += s * out.lora_B[n].weight @ out.lora_A[n].weight
    return ref.eval()(x)


def test_forward_matches_reference_math_and_merge() -> None:
    model = get_peft_model(Net(), LoraConfig(r=2, lora_alpha=4, target_modules=["mha"]))
    model.eval()
    x = _x()
    torch.testing.assert_close(model(x), Net().eval()(x))  # B = 0 at init: unchanged
    _perturb(model)
    expected = _reference(model, x, ["default"])
    assert (expected - Net().eval()(x)).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    layer = model.base_model.model.mha
    assert isinstance(layer, LoraMultiheadAttention)
    assert (layer.in_features, layer.out_features, layer.embed_dim, layer.num_heads) == (E, 3 * E, E, 2)
    w_in = layer.in_proj_weight.detach().clone()
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(layer.in_proj_weight, w_in, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), Net().eval()(x))
    plain = copy.deepcopy(model).merge_and_unload()
    assert type(plain.mha) is nn.MultiheadAttention and type(plain.mha.out_proj).__name__ == \
        "NonDynamicallyQuantizableLinear"
    assert isinstance(plain.mha.in_proj_weight, nn.Parameter)
    torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=1e-5)
    base = model.unload()
    assert type(base.mha) is nn.MultiheadAttention and type(base.mha.out_proj) is not type(layer)
    torch.testing.assert_close(base(x), Net().eval()(x))


def test_gradients_reach_both_projections_and_base_stays_frozen() -> None:
    model = get_peft_model(Net(), LoraConfig(r=2, target_modules=["mha"], init_lora_weights="gaussian"))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    theirs = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["mha"]))
    assert trainable == sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    _perturb(model)
    model(_x()).pow(2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_two_adapters_switch_delete() -> None:
    model = get_peft_model(Net(), LoraConfig(r=2, target_modules=["mha"]))
    model.add_adapter("other", LoraConfig(r=3, target_modules=["mha"]))
    _perturb(model)
    model.eval()
    x = _x()
    for names in (["default"], ["other"], ["default", "other"]):
        model.base_model.set_adapter(names)
        torch.testing.assert_close(model(x), _reference(model, x, names), atol=1e-5, rtol=1e-5)
    model.base_model.set_adapter("default")
    model.delete_adapter("other")
    torch.testing.assert_close(model(x), _reference(model, x, ["default"]), atol=1e-5, rtol=1e-5)
    model.delete_adapter("default")
    assert type(model.base_model.model.mha) is nn.MultiheadAttention
    assert type(model.base_model.model.mha.out_proj).__name__ == "NonDynamicallyQuantizableLinear"


def _zero_out_proj_b(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "out_proj.lora_B" in name:
                p.zero_()


@pytest.mark.parametrize("batch_first", [True, False])
def test_files_cross_with_peft_both_ways(batch_first: bool, tmp_path) -> None:
    """Same keys and tensors both ways; equal outputs with PEFT where its forward is right (the in_proj update:
    see test_peft_0_21_doubles_the_out_proj_update for out_proj)."""
    x = _x() if batch_first else _x().transpose(0, 1)
    ours = get_peft_model(Net(batch_first), LoraConfig(r=2, lora_alpha=8, target_modules=["mha"]))
    _perturb(ours)
    ours.save_pretrained(tmp_path / "full")
    theirs = peft.PeftModel.from_pretrained(Net(batch_first), tmp_path / "full")
    mine = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    assert mine and all(torch.equal(theirs.state_dict()[k], v) for k, v in mine.items())  # same keys, tensors
    _zero_out_proj_b(ours)
    ours.eval()
    expected = ours(x)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(Net(batch_first), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(x), expected, atol=1e-5, rtol=1e-5)

    made = peft.get_peft_model(Net(batch_first), peft.LoraConfig(r=2, lora_alpha=8, target_modules=["mha"]))
    _perturb(made)
    _zero_out_proj_b(made)
    made.eval()
    want = made(x)
    made.save_pretrained(tmp_path / "theirs")
    files = [load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs")]
    assert {k: v.shape for k, v in files[0].items()} == {k: v.shape for k, v in files[1].items()}
    back = PeftModel.from_pretrained(Net(batch_first), tmp_path / "theirs").eval()
    torch.testing.assert_close(back(x), want, atol=1e-5, rtol=1e-5)


def test_peft_0_21_doubles_the_out_proj_update(tmp_path) -> None:
    """PEFT 0.21.2's lora.MultiheadAttention adds out_proj's ΔW twice (its merge writes W + ΔW, then calls
    out_proj.merge(), which adds ΔW again; its forward merges the same way), so it computes W_out + 2ΔW_out;
    huggingface/peft#3774 fixes it to W_out + ΔW_out, which deltatune computes. Pinned here so that the
    difference is known (and this test says when PEFT changes)."""
    ours = get_peft_model(Net(), LoraConfig(r=2, lora_alpha=8, target_modules=["mha"]))
    _perturb(ours)
    ours.eval()
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(Net(), tmp_path).eval()
    x = _x()
    layer = ours.base_model.model.mha
    torch.testing.assert_close(ours(x), _reference(ours, x, ["default"]), atol=1e-5, rtol=1e-5)
    out = layer.base_layer.out_proj
    with torch.no_grad():
        out.scaling["default"] *= 2  # W_out + 2ΔW_out: what PEFT 0.21.2 computes
    torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-5)


def test_unsupported_forms_refused_and_model_untouched() -> None:
    with pytest.raises(ConfigError, match=r"^MultiheadAttention does not support DoRA \(yet\), please set use_dora to "
                                          r"False.*out of target_modules"):
        get_peft_model(net := Net(), LoraConfig(r=2, target_modules=["mha"], use_dora=True))
    assert type(net.mha.out_proj).__name__ == "NonDynamicallyQuantizableLinear"  # nothing left half-wrapped
    with pytest.raises(ConfigError, match="packed q/k/v"):
        get_peft_model(Net(kdim=4, vdim=4), LoraConfig(r=2, target_modules=["mha"]))
    with pytest.raises(TargetModuleError, match="remove 'out_proj' from target_modules"):
        get_peft_model(net := Net(), LoraConfig(r=2, target_modules=["mha", "out_proj"]))
    assert type(net.mha) is nn.MultiheadAttention
    assert type(net.mha.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
