"""AdaMSS against peft 0.21.2: the config's ``to_dict``, the same initial tensors from the same seed, the same
forward and merge on the same tensors, and adapter files both ways with equal logits (tiny Llama; a biased
``nn.Linear`` for the bias column).

peft's AdaMSS clusters with scikit-learn's K-means and deltatune with its own (:mod:`deltatune.adamss.kmeans`),
so these tests also check that both compute the same clusters.
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from support.layers import layer_and_input
from support.models import make_inputs, output, perturb_trainable, tiny_llama

import deltatune

LLAMA = {"r": 12, "num_subspaces": 3, "subspace_rank": 2, "target_modules": ["q_proj", "v_proj"],
         "task_type": "CAUSAL_LM"}


def _both(factory, seed: int = 1, **config):
    """deltatune's and peft's model built from the same seed (the SVD is seeded; A's QR init draws from torch's
    global stream, in the same order on both sides)."""
    torch.manual_seed(seed)
    ours = deltatune.get_peft_model(factory(), deltatune.AdamssConfig(**config))
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(factory(), peft.AdamssConfig(**config))
    return ours, theirs


def _adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "adamss_" in k}


def _holder():
    return layer_and_input("linear")[0]


X = layer_and_input("linear")[1]


@pytest.mark.parametrize("config", [
    {},
    {"r": 8, "use_asa": True, "asa_target_subspaces": 3, "init_warmup": 1, "final_warmup": 5, "mask_interval": 2,
     "target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "layers", "init_weights": None},
])
def test_config_to_dict_equals_peft(config):
    ours, theirs = deltatune.AdamssConfig(**config).to_dict(), peft.AdamssConfig(**config).to_dict()
    assert set(ours) == set(theirs)
    for key, value in theirs.items():  # peft's dict keeps the set it made of target_modules; JSON writes a list
        assert ours[key] == (sorted(value) if isinstance(value, set) else value), key


@pytest.mark.parametrize("extra", [{}, {"use_dynamic_rank": True, "svd_threshold": 0.3, "subspace_rank": 3},
                                   {"init_weights": None}])
def test_same_initial_tensors_as_peft(extra):
    ours, theirs = _both(tiny_llama, **{**LLAMA, **extra})
    mine, peft_state = _adapter_state(ours), _adapter_state(theirs)
    assert sorted(mine) == sorted(peft_state)
    for key, value in mine.items():
        assert torch.equal(value, peft_state[key]), key
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    peft_layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.num_subspaces == peft_layer.num_subspaces
    assert torch.equal(layer.scatter_index["default"], peft_layer.scatter_index["default"])


@pytest.mark.parametrize("factory,kind", [(tiny_llama, "llama"), (_holder, "linear")])
def test_forward_and_merge_equal_peft_on_the_same_tensors(factory, kind):
    config = LLAMA if kind == "llama" else {"r": 8, "num_subspaces": 3, "target_modules": ["layer"]}
    ours, theirs = _both(factory, **config)
    perturb_trainable(ours, seed=3, std=0.2)
    theirs.load_state_dict(ours.state_dict())
    inputs = make_inputs("llama") if kind == "llama" else {"x": X}
    ours.eval(), theirs.eval()
    want = output(theirs, inputs)
    torch.testing.assert_close(output(ours, inputs), want, atol=1e-6, rtol=1e-5)
    ours.merge_adapter(), theirs.merge_adapter()
    for (name, value), (_, peft_value) in zip(ours.base_model.model.state_dict().items(),
                                              theirs.base_model.model.state_dict().items()):
        torch.testing.assert_close(value, peft_value, atol=1e-6, rtol=1e-5, msg=name)  # weights and biases
    torch.testing.assert_close(output(ours, inputs), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("factory,kind", [(tiny_llama, "llama"), (_holder, "linear")])
def test_files_cross_both_ways(factory, kind, tmp_path):
    config = LLAMA if kind == "llama" else {"r": 8, "num_subspaces": 3, "target_modules": ["layer"]}
    inputs = make_inputs("llama") if kind == "llama" else {"x": X}
    ours, theirs = _both(factory, seed=5, **config)
    perturb_trainable(ours, seed=4, std=0.2)
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(factory(), tmp_path / "ours").eval()
    torch.testing.assert_close(output(loaded, inputs), output(ours.eval(), inputs), atol=1e-6, rtol=1e-5)

    perturb_trainable(theirs, seed=6, std=0.2)
    theirs.save_pretrained(tmp_path / "theirs")
    back = deltatune.PeftModel.from_pretrained(factory(), tmp_path / "theirs").eval()
    torch.testing.assert_close(output(back, inputs), output(theirs.eval(), inputs), atol=1e-6, rtol=1e-5)
