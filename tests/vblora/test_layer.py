"""VB-LoRA: the factors against a reference mixed sub-vector by sub-vector from the paper's formula, equality with
peft's layer (the same seed gives the same bank and logits), merge/unmerge on Linear and GPT-2's ``Conv1D``, the one
shared bank per adapter, ``save_only_topk_weights`` files both ways with peft (and PEFT's refusal to train such an
adapter), PEFT's refusals, the model-level contract on GPT-2 and two named adapters.

The reference sorts each sub-vector's logits in Python, keeps the ``k`` largest, and sums their bank rows weighted
by the softmax of those logits; it does not use the layer's ``topk``/``einsum``.
"""

from __future__ import annotations

import dataclasses
import math

import peft
import pytest
import torch
from safetensors.torch import load_file
from support.family_checks import check_model_contract, check_two_adapters
from support.models import Holder, make_inputs, output, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune
from deltatune import PeftModel, VBLoRAConfig, VBLoRALayer, VBLoRAModel, get_peft_model
from deltatune.errors import ConfigError

ATOL = 1e-5


def _mix(logits: list[float], bank: torch.Tensor, k: int) -> torch.Tensor:
    best = sorted(range(len(logits)), key=lambda j: -logits[j])[:k]
    exps = [math.exp(logits[j] - logits[best[0]]) for j in best]
    return sum(e / sum(exps) * bank[j].double() for e, j in zip(exps, best))


def _reference_factors(layer: VBLoRALayer, name: str = "default") -> tuple[torch.Tensor, torch.Tensor]:
    """``A: (r, in)``, ``B: (out, r)`` from the paper: A's row p is the concatenation of the mixes of
    ``logits_A[p, c]``; B's column p stacks the mixes of ``logits_B[o, p]``."""
    bank = layer.vblora_vector_bank[name].detach()
    la, lb, k = layer.vblora_logits_A[name].detach(), layer.vblora_logits_B[name].detach(), layer.topk[name]
    r, n_in, _ = la.shape
    n_out, ell = lb.shape[0], bank.shape[1]
    a = torch.zeros(r, n_in * ell, dtype=torch.float64)
    b = torch.zeros(n_out * ell, r, dtype=torch.float64)
    for p in range(r):
        for c in range(n_in):
            a[p, c * ell:(c + 1) * ell] = _mix(la[p, c].tolist(), bank, k)
        for o in range(n_out):
            b[o * ell:(o + 1) * ell, p] = _mix(lb[o, p].tolist(), bank, k)
    return a, b


def _config(**kwargs) -> dict:
    return {"target_modules": ["layer"], "r": 3, "num_vectors": 10, "vector_length": 4, "topk": 3, **kwargs}


def _adapt(base: nn.Module, **kwargs) -> tuple[nn.Module, VBLoRALayer]:
    torch.manual_seed(0)
    pm = get_peft_model(Holder(base), VBLoRAConfig(**_config(**kwargs))).eval()
    return pm, pm.base_model.model.layer


@pytest.mark.parametrize("kind", ["linear", "conv1D"])
def test_layer_forward_and_merge_match_the_reference(kind):
    torch.manual_seed(1)
    base = nn.Linear(8, 12) if kind == "linear" else Conv1D(12, 8)
    pm, layer = _adapt(base)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        weight = (base.weight if kind == "linear" else base.weight.T).clone()  # (out, in)
        a, b = _reference_factors(layer)
        delta = (b @ a).float()
        expected = x @ (weight + delta).T + base.bias
        assert torch.allclose(pm(x), expected, atol=ATOL)
        assert torch.allclose(layer.get_delta_weight("default"), delta if kind == "linear" else delta.T, atol=ATOL)
        layer.merge()
        assert torch.allclose(pm(x), expected, atol=ATOL)
        layer.unmerge()
        assert torch.allclose(base.weight if kind == "linear" else base.weight.T, weight, atol=1e-6)
        merged = pm.merge_and_unload()
        assert type(merged.layer) is type(base)
        assert torch.allclose(merged(x), expected, atol=ATOL)


def test_same_seed_gives_peft_s_bank_logits_and_outputs():
    torch.manual_seed(3)
    ours = get_peft_model(tiny_llama(), VBLoRAConfig(r=4, num_vectors=12, vector_length=8, task_type="CAUSAL_LM"))
    torch.manual_seed(3)
    theirs = peft.get_peft_model(tiny_llama(), peft.VBLoRAConfig(r=4, num_vectors=12, vector_length=8,
                                                                  task_type="CAUSAL_LM"))
    mine = {k: v for k, v in ours.state_dict().items() if "vblora" in k}
    theirs_state = theirs.state_dict()
    assert mine and all(torch.equal(v, theirs_state[k]) for k, v in mine.items())
    inputs = make_inputs("llama")
    with torch.no_grad():
        assert torch.allclose(output(ours.eval(), inputs), output(theirs.eval(), inputs), atol=1e-5)
        q, their_q = (m.base_model.model.model.layers[0].self_attn.q_proj for m in (ours, theirs))
        assert torch.allclose(q.get_delta_weight("default"), their_q.get_delta_weight("default"), atol=1e-6)
    assert isinstance(ours.base_model, VBLoRAModel) and ours.base_model.uses_shared_state is True
    assert type(theirs.base_model).uses_shared_state is True


def test_one_shared_bank_per_adapter_trains_from_every_layer():
    model = get_peft_model(tiny_llama(), VBLoRAConfig(r=2, num_vectors=8, vector_length=8, task_type="CAUSAL_LM"))
    layers = [m for m in model.modules() if isinstance(m, VBLoRALayer)]
    bank = model.base_model.vblora_vector_bank["default"]
    assert len(layers) == 4 and all(layer.vblora_vector_bank["default"] is bank for layer in layers)
    assert sum(1 for n, _ in model.named_parameters() if "vector_bank" in n) == 1 and bank.requires_grad
    model.train()(**make_inputs("llama")).logits.sum().backward()
    assert bank.grad is not None and bank.grad.abs().sum() > 0
    model.add_adapter("other", VBLoRAConfig(r=2, num_vectors=6, vector_length=16, task_type="CAUSAL_LM"))
    assert model.base_model.vblora_vector_bank["other"].shape == (6, 16)
    assert not model.base_model.vblora_vector_bank["other"].requires_grad  # not active: frozen
    model.delete_adapter("other")
    assert "other" not in model.base_model.vblora_vector_bank


@pytest.mark.parametrize("direction", ["peft_to_ours", "ours_to_peft"])
def test_top_k_files_cross_with_peft(direction, tmp_path):
    config = {"r": 4, "num_vectors": 300, "vector_length": 8, "topk": 3, "save_only_topk_weights": True,
              "task_type": "CAUSAL_LM"}  # 300 vectors: int16 indices
    inputs = make_inputs("llama")
    torch.manual_seed(5)
    if direction == "peft_to_ours":
        source = peft.get_peft_model(tiny_llama(), peft.VBLoRAConfig(**config)).eval()
        source.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
        assert isinstance(loaded.base_model, VBLoRAModel)
    else:
        source = get_peft_model(tiny_llama(), VBLoRAConfig(**config)).eval()
        source.save_pretrained(tmp_path)
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    file = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.vblora_logits_A"
    assert file[key + "_topk_indices"].dtype == torch.int16 and file[key + "_topk_indices"].shape == (4, 4, 3)
    assert file[key + "_topk_weights"].shape == (4, 4, 2) and "base_model.vblora_vector_bank" in file
    assert not any(k.endswith("vblora_logits_A") for k in file)
    with torch.no_grad():
        assert torch.allclose(output(loaded, inputs), output(source, inputs), atol=1e-5)
    if direction == "peft_to_ours":  # PEFT's refusal: the dropped logits are -inf, training would not work
        with pytest.raises(RuntimeError, match="Found infinity values in VB-LoRA logits. Ensure training was not "
                                               "resumed from a `save_only_topk_weights` model."):
            output(loaded.train(), inputs)


def test_peft_s_refusals():
    with pytest.raises(ConfigError, match="`r` 0 should be a positive integer value"):
        _adapt(nn.Linear(8, 8), r=0)
    with pytest.raises(ConfigError, match="`topk` 0 should be a positive integer value"):
        _adapt(nn.Linear(8, 8), topk=0)
    with pytest.raises(ConfigError, match="`in_features` 6 must be divisible by `vector_length` 4"):
        _adapt(nn.Linear(6, 8))
    with pytest.raises(ConfigError, match="`out_features` 6 must be divisible by `vector_length` 4"):
        _adapt(nn.Linear(8, 6))
    with pytest.raises(ConfigError, match="When `layers_pattern` is specified, `layers_to_transform` must also be "
                                          "specified."):
        VBLoRAConfig(layers_pattern="layers")
    config = VBLoRAConfig()
    assert (config.r, config.num_vectors, config.vector_length, config.topk, config.init_vector_bank_bound,
            config.init_logits_std, config.save_only_topk_weights) == (4, 256, 256, 2, 0.02, 0.1, False)


def test_gpt2_conv1d_model_contract(tmp_path):
    def config():
        return VBLoRAConfig(r=4, num_vectors=16, vector_length=16)  # PEFT's GPT-2 target: c_attn (Conv1D, 32->96)

    check_model_contract(tiny_gpt2, "gpt2", config, "vblora_", tmp_path, identity_at_init=False)


def test_two_named_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", VBLoRAConfig(r=4, num_vectors=16, vector_length=8, task_type="CAUSAL_LM"),
                       VBLoRAConfig(r=2, num_vectors=8, vector_length=16, topk=3, task_type="CAUSAL_LM"), tmp_path)


@pytest.mark.parametrize("num_vectors,topk_only", [(16, False), (16, True), (300, True)])
def test_savable_parameter_counts_are_peft_s(num_vectors, topk_only, capsys):
    config = {"r": 4, "num_vectors": num_vectors, "vector_length": 8, "save_only_topk_weights": topk_only,
              "task_type": "CAUSAL_LM"}
    ours = get_peft_model(tiny_llama(), VBLoRAConfig(**config))
    theirs = peft.get_peft_model(tiny_llama(), peft.VBLoRAConfig(**config))
    assert ours.get_nb_savable_parameters() == theirs.get_nb_savable_parameters()
    ours.print_savable_parameters()
    theirs.print_savable_parameters()
    mine, peft_line = capsys.readouterr().out.splitlines()
    assert mine == peft_line


def test_exported():
    assert deltatune.VBLoRALayer is VBLoRALayer and "VBLoRAConfig" in deltatune.__all__


def test_config_fields_and_defaults_are_peft_s():
    def fields(cls):
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}

    assert fields(VBLoRAConfig) == fields(peft.VBLoRAConfig)
