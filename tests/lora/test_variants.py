"""Adding a LoRA variant, walked through with a toy one: one class plus a config field.

The toy, "gated LoRA", scales each adapter's update by a learnable scalar ``g`` (1 at creation, so a new adapter
is plain LoRA's identity)::

    y = W x + b + g · s · B A x,    ΔW = g · s · B A

Everything it needs is :class:`GatedLora` below and ``use_gate`` on a config; the layers, merging, saving and
loading, freezing and deleting ask the variant (:mod:`deltatune.lora.variants`) and name no variant themselves.

A real variant touches three files: its module (``src/deltatune/lora/<variant>.py``, the class), one line in
``BUILT_IN`` (``src/deltatune/lora/variants.py``) and its flag in ``LoraConfig`` (``src/deltatune/lora/config.py``),
plus its tests. (Before the interface it took six: ``lora/layer.py`` in about ten places (``update_layer``, the
init helpers, the forward gates and composed paths, ``_stacks``/``_forward_rows``, merged/unmerged weights of
Linear, Embedding and Conv), ``lora/config.py``, ``lora/__init__.py``, and the refusals in ``lora/arithmetic.py``,
``adalora/config.py`` and ``cli/inspect.py``.) A variant whose
files carry its tensors under another name than ``<container>.weight`` also adds that name to the method's
``file_suffixes`` in ``src/deltatune/lora/__init__.py``, as DoRA's ``lora_magnitude_vector`` does.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from support.models import make_inputs, output, params_snapshot, tiny_llama
from torch import nn

import deltatune as dt
from deltatune.errors import ConfigError, MixedBatchTypeError
from deltatune.lora.layer import LoraLayer, LoraLinear
from deltatune.lora.variants import LoraVariant, register_variant, unregister_variant, variant_for, variants_of


class _Gate(nn.Module):
    """The learnable scalar ``g``, as a ``weight`` (saved as ``lora_gate.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))


class GatedLora(LoraVariant):
    """The whole variant: its flag, its tensors, its update and its forward."""

    flag = "use_gate"
    label = "gated LoRA"
    containers = ("lora_gate",)
    weighted_merge_refusal = "its gate scales the whole update"

    def init(self, layer: nn.Module, name: str) -> None:
        layer.lora_gate[name] = _Gate().to(layer.lora_A[name].weight.device)

    def delta_weight(self, layer: nn.Module, name: str) -> torch.Tensor:
        return layer.lora_gate[name].weight * layer.get_delta_weight(name)

    def forward(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        lora_a, lora_b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
        return result + layer.lora_gate[name].weight * lora_b(lora_a(dropout(x))) * layer.scaling[name]


@dataclasses.dataclass
class GatedLoraConfig(dt.LoraConfig):
    """The config field: what ``LoraConfig`` gets for a real variant."""

    use_gate: bool = False


@pytest.fixture
def gated():
    register_variant(GatedLora)
    yield GatedLora
    unregister_variant(GatedLora.flag)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = GatedLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_gate=True)
    return dt.get_peft_model(tiny_llama(), config)


def test_the_variant_is_found_from_its_flag(gated):
    assert variants_of(GatedLoraConfig(use_gate=True)) == [GatedLora]
    assert variants_of({"use_gate": True, "use_dora": False}) == [GatedLora]  # an adapter_config.json
    assert variants_of(dt.LoraConfig()) == []
    assert "lora_gate" in LoraLayer.adapter_layer_names  # saved, moved, frozen and deleted with A and B
    with pytest.raises(ConfigError, match="cannot be combined"):
        variant_for({"use_gate": True, "use_dora": True})


def test_a_new_adapter_is_the_identity_and_the_gate_trains(gated):
    inputs = make_inputs("llama")
    model = _model()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear) and isinstance(layer.lora_variant["default"], GatedLora)
    assert torch.equal(output(model, inputs), output(tiny_llama(), inputs))
    gates = [p for n, p in model.named_parameters() if "lora_gate" in n]
    assert gates and all(p.requires_grad for p in gates)

    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(p, torch.ones(())) for p in gates)  # the gate moved (B is no longer 0)


def test_merge_unmerge_and_state_dict_round_trip(gated):
    inputs = make_inputs("llama")
    model = _model()
    with torch.no_grad():  # away from the identity: B and the gates random
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_gate" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1 if "gate" in name else 0))
    model.eval()
    unmerged = output(model, inputs)
    assert (unmerged - output(tiny_llama(), inputs)).abs().max() > 1e-3
    base = params_snapshot(model.get_base_model())

    model.base_model.merge_adapter()
    torch.testing.assert_close(output(model, inputs), unmerged, atol=1e-5, rtol=1e-5)
    model.base_model.unmerge_adapter()
    for key, value in model.get_base_model().state_dict().items():
        torch.testing.assert_close(value, base[key], atol=1e-6, rtol=1e-6)

    state = dt.get_peft_model_state_dict(model)
    assert any("lora_gate" in key for key in state)
    fresh = _model(seed=1)
    dt.set_peft_model_state_dict(fresh, state)
    torch.testing.assert_close(output(fresh.eval(), inputs), unmerged, atol=0, rtol=0)

    with pytest.raises(ConfigError, match="gated LoRA: its gate scales the whole update"):
        model.add_weighted_adapter(["default"], [1.0], "combined")
    with pytest.raises(MixedBatchTypeError, match="gated LoRA"):  # no row_scale: refused, not silently wrong
        model(**inputs, adapter_names=["default", "__base__"])

    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.delete_adapter("default")
    assert "default" not in layer.lora_gate and "default" not in layer.lora_variant
