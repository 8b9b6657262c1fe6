"""Which parameters train is decided by identity, not by name (issue 18).

A base-model module whose name looks like an adapter's (``lora_foobar`` for LoRA, ``ia3_foobar`` for IA³...) is a
base module: it is frozen like every other base weight and never saved as adapter weights. Before, freezing
matched the method's name prefix, so such a module stayed trainable and an optimizer trained base weights that
no adapter file would ever hold.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt


class Net(nn.Module):
    """``x -> lin -> <prefix>foobar -> norm -> head``: the middle module is a plain base layer with a tricky name."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.lin = nn.Linear(8, 8)
        self.add_module(f"{prefix}foobar", nn.Linear(8, 8))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(getattr(self, f"{self.prefix}foobar")(self.lin(x))))


METHODS = {  # prefix of the method's parameter names -> a config adapting `lin` only
    "lora": ("lora_", lambda: dt.LoraConfig(r=2, target_modules=["lin"])),
    "dora": ("lora_", lambda: dt.LoraConfig(r=2, target_modules=["lin"], use_dora=True)),
    "ia3": ("ia3_", lambda: dt.IA3Config(target_modules=["lin"], feedforward_modules=[])),
    "loha": ("hada_", lambda: dt.LoHaConfig(r=2, target_modules=["lin"])),
    "lokr": ("lokr_", lambda: dt.LoKrConfig(r=2, target_modules=["lin"])),
    "vera": ("vera_lambda_", lambda: dt.VeraConfig(r=2, target_modules=["lin"])),
    "bitfit": ("bitfit_", lambda: dt.BitFitConfig(target_modules=["lin"])),
    "ln_tuning": ("ln_tuning_", lambda: dt.LNTuningConfig(target_modules=["norm"])),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_base_module_named_like_the_adapter_prefix_is_frozen_and_not_saved(method, tmp_path):
    prefix, make = METHODS[method]
    torch.manual_seed(0)
    model = dt.get_peft_model(Net(prefix), make())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable, "the adapter itself must train"
    assert not [n for n in trainable if f"{prefix}foobar" in n]
    assert all(".default" in n for n in trainable), trainable  # only the adapter's own tensors

    # One optimizer step moves the adapter and nothing of the base model.
    base_before = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters()
                   if f"{prefix}foobar" in n}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(4, 8)).square().sum().backward()
    optimizer.step()
    for n, p in model.get_base_model().named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert not [k for k in saved if f"{prefix}foobar" in k], sorted(saved)


def test_set_adapter_and_modules_to_save_still_decide_what_trains():
    """The identity rule keeps the existing ones: the active adapter and the modules_to_save copies train, an
    inactive adapter does not, ``bias="all"`` trains every bias (the tricky-named module's too, as in PEFT)."""
    model = dt.get_peft_model(Net("lora_"), dt.LoraConfig(r=2, target_modules=["lin"], modules_to_save=["head"]))
    model.add_adapter("other", dt.LoraConfig(r=2, target_modules=["lin"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A.default" in n for n in trainable)
    assert any("modules_to_save.default" in n for n in trainable)
    assert not any("other" in n or "lora_foobar" in n or "original_module" in n for n in trainable)

    with_bias = dt.get_peft_model(Net("lora_"), dt.LoraConfig(r=2, target_modules=["lin"], bias="all"))
    trainable = {n for n, p in with_bias.named_parameters() if p.requires_grad}
    assert "base_model.model.lora_foobar.bias" in trainable
    assert "base_model.model.lora_foobar.weight" not in trainable
