"""The contract every registered method keeps, on the tiny Llama, parametrised over ``deltatune.registry.METHODS``:
a method is tested the moment it registers (its small config is one row of ``tests/support/contract.py``).

For each method:

- identity at init: a fresh adapter leaves the logits as they were (weight methods), or changes them (virtual
  tokens: the flag in the table must be right either way);
- an adapter with seeded noise on every trainable tensor changes the logits, and ``disable_adapter`` gives the
  base logits back (then the adapted ones again);
- merge == unmerged for mergeable methods (``merge_adapter``, ``unmerge_adapter`` restores the base weights,
  ``merge_and_unload`` gives the plain model computing the adapted function); ``MergeError`` with nothing
  changed for the others (virtual tokens, ``mergeable=False``);
- a backward pass puts gradients on the method's own tensors only (names with the registry's ``prefix``, or
  the prompt encoder), and on every one of them;
- save -> load into a fresh base gives the same logits; a re-save writes bit-identical tensors and the same
  config; the loaded adapter is frozen;
- a mixed batch (``adapter_names``) runs each row through its own adapter (or none) exactly as a model
  holding only that adapter does (weight methods); virtual-token methods refuse it with ``ConfigError``;
- interop with peft 0.21.2 both ways where peft has the method: peft loads deltatune's files, deltatune loads
  peft's, with equal logits.
"""

from __future__ import annotations

import json
import os
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from support.contract import CASES, case_for, config_for, forward_kwargs, starts_as_identity
from support.models import make_inputs, output, perturb_trainable, tiny_llama

import deltatune
from deltatune.core.layer import AdapterLayer
from deltatune.errors import ConfigError, MergeError
from deltatune.registry import METHODS, method_for

ATOL = 1e-5
PEFT_TYPES = sorted(t.value for t in METHODS)


@pytest.fixture(params=PEFT_TYPES)
def peft_type(request) -> str:
    case_for(request.param)  # fails here, naming the fix, for a registered method without a row
    return request.param


def _inputs(peft_type: str) -> dict[str, torch.Tensor]:
    return {**make_inputs("llama"), **forward_kwargs(peft_type)}


def _adapted(peft_type: str, seed: int = 7) -> deltatune.PeftModel:
    """The method on a fresh tiny Llama, every trainable tensor moved by seeded noise (far from any init)."""
    model = deltatune.get_peft_model(tiny_llama(), config_for(peft_type))
    perturb_trainable(model, seed=seed, std=0.2)
    return model.eval()


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape != b.shape or (a - b).abs().max().item() > 1e-3


def test_every_row_names_a_registered_method():
    stale = sorted(set(CASES) - set(PEFT_TYPES))
    assert not stale, f"tests/support/contract.py has rows for methods that are not registered: {stale}"


def test_identity_at_init(peft_type):
    inputs = _inputs(peft_type)
    base = output(tiny_llama(), make_inputs("llama"))
    fresh = output(deltatune.get_peft_model(tiny_llama(), config_for(peft_type)).eval(), inputs)
    if starts_as_identity(peft_type):
        torch.testing.assert_close(fresh, base, atol=ATOL, rtol=0)
    else:
        assert _differs(fresh, base), f"{peft_type} starts as the identity: set identity_at_init=True in its row"


def test_adapter_changes_output_and_disable_adapter_gives_the_base(peft_type):
    inputs = _inputs(peft_type)
    base = output(tiny_llama(), make_inputs("llama"))
    model = _adapted(peft_type)
    adapted = output(model, inputs)
    assert _differs(adapted, base), "the perturbed adapter does not change the logits"
    with model.disable_adapter():
        torch.testing.assert_close(output(model, inputs), base, atol=ATOL, rtol=0)
    torch.testing.assert_close(output(model, inputs), adapted, atol=ATOL, rtol=0)


def test_gradients_reach_only_adapter_tensors(peft_type):
    method = method_for(peft_type)
    model = deltatune.get_peft_model(tiny_llama(), config_for(peft_type))
    perturb_trainable(model, std=0.2)  # some factors start at zero: their partners would get no gradient
    model.train()
    model(**_inputs(peft_type)).logits.float().pow(2).mean().backward()
    mark = method.prefix or "prompt_encoder"  # virtual tokens have no prefix: their encoder trains
    trainable = []
    for name, p in model.named_parameters():
        assert p.requires_grad == (mark in name), f"{name}: requires_grad={p.requires_grad}"
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
            trainable.append(name)
        else:
            assert p.grad is None, f"base parameter {name} got a gradient"
    assert trainable, "nothing is trainable"


def test_merge_equals_unmerged_or_refuses(peft_type):
    method = method_for(peft_type)
    inputs = _inputs(peft_type)
    model = _adapted(peft_type)
    adapted = output(model, inputs)
    if method.family != "weight" or not method.mergeable:
        with pytest.raises(MergeError):
            model.merge_adapter()
        with pytest.raises(MergeError):
            model.merge_and_unload()
        torch.testing.assert_close(output(model, inputs), adapted, atol=0, rtol=0)  # nothing changed
        return
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    assert layers, "no layer was adapted"
    model.merge_adapter()
    assert all(layer.merged for layer in layers)
    torch.testing.assert_close(output(model, inputs), adapted, atol=ATOL, rtol=1e-4)
    model.unmerge_adapter()
    assert not any(layer.merged for layer in layers)
    torch.testing.assert_close(output(model, inputs), adapted, atol=ATOL, rtol=0)
    restored = model.unload().state_dict()  # unmerged + unloaded: the base weights as they were
    for name, weight in tiny_llama().state_dict().items():
        torch.testing.assert_close(restored[name], weight, atol=1e-6, rtol=1e-5, msg=f"unmerge changed {name}")

    model = _adapted(peft_type)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(output(plain, inputs), adapted, atol=ATOL, rtol=1e-4)


def test_save_load_round_trip(peft_type, tmp_path):
    inputs = _inputs(peft_type)
    model = _adapted(peft_type)
    adapted = output(model, inputs)
    model.save_pretrained(tmp_path / "first")
    loaded = deltatune.PeftModel.from_pretrained(tiny_llama(), tmp_path / "first").eval()
    torch.testing.assert_close(output(loaded, inputs), adapted, atol=1e-6, rtol=0)
    assert all(not p.requires_grad for p in loaded.parameters()), "an inference-mode load must be frozen"

    loaded.save_pretrained(tmp_path / "again")
    first = load_file(os.path.join(tmp_path, "first", "adapter_model.safetensors"))
    again = load_file(os.path.join(tmp_path, "again", "adapter_model.safetensors"))
    assert sorted(first) == sorted(again)
    for key, value in first.items():
        assert torch.equal(value, again[key]), f"re-saved {key} differs"
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("first", "again")]
    configs[0].pop("inference_mode"), configs[1].pop("inference_mode")
    assert configs[0] == configs[1]


def test_mixed_batch_rows_equal_single_adapter_runs(peft_type, tmp_path):
    inputs = _inputs(peft_type)
    base = output(tiny_llama(), make_inputs("llama"))
    other = _adapted(peft_type, seed=11)
    other_out = output(other, inputs)
    other.save_pretrained(tmp_path)
    model = _adapted(peft_type, seed=12)
    model_out = output(model, inputs)
    model.load_adapter(tmp_path, adapter_name="other")
    model.eval()
    if method_for(peft_type).family != "weight":
        with pytest.raises(ConfigError):
            output(model, {**inputs, "adapter_names": ["default", "other"]})
        return
    assert _differs(model_out, other_out)
    mixed = output(model, {**inputs, "adapter_names": ["default", "other"]})
    torch.testing.assert_close(mixed[0], model_out[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[1], other_out[1], atol=ATOL, rtol=0)
    mixed = output(model, {**inputs, "adapter_names": ["other", "__base__"]})
    torch.testing.assert_close(mixed[0], other_out[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[1], base[1], atol=ATOL, rtol=0)
    assert model.active_adapter == "default"
    torch.testing.assert_close(output(model, inputs), model_out, atol=ATOL, rtol=0)


def _peft_has(peft_type: str) -> None:
    if not hasattr(peft.PeftType, peft_type):
        pytest.skip(f"peft {peft.__version__} has no {peft_type}")
    if case_for(peft_type).peft_interop:
        pytest.skip(case_for(peft_type).peft_interop)


def test_peft_loads_deltatune_files(peft_type, tmp_path):
    _peft_has(peft_type)
    inputs = _inputs(peft_type)
    model = _adapted(peft_type)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(output(theirs, inputs), output(model, inputs), atol=1e-6, rtol=1e-5)


def test_deltatune_loads_peft_files(peft_type, tmp_path):
    _peft_has(peft_type)
    inputs = _inputs(peft_type)
    deltatune.get_peft_model(tiny_llama(), config_for(peft_type)).save_pretrained(tmp_path / "ours")
    config = peft.PeftConfig.from_pretrained(tmp_path / "ours")  # peft reads our config into its own class
    config.inference_mode = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), config)
    perturb_trainable(theirs, seed=3, std=0.2)
    theirs.eval()
    want = output(theirs, inputs)
    assert _differs(want, output(tiny_llama(), make_inputs("llama")))
    theirs.save_pretrained(tmp_path / "theirs")
    ours = deltatune.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs").eval()
    torch.testing.assert_close(output(ours, inputs), want, atol=1e-6, rtol=1e-5)
