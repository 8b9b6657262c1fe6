"""``core.features.follow_fan_in_fan_out``: every method whose layers wrap ``nn.Linear`` or GPT-2's ``Conv1D``
corrects a ``fan_in_fan_out`` that contradicts the layer type with PEFT's warning, in its config as PEFT does, so the
saved adapter_config.json says what the file holds."""

from __future__ import annotations

import warnings

import peft
import pytest

import deltatune
from tests.support.models import tiny_gpt2, tiny_llama

CASES = [  # (config class name, kwargs): methods that take both layer types
    ("LoraConfig", {"r": 2, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}),
    ("AdaLoraConfig", {"init_r": 4, "target_r": 2, "total_step": 10, "target_modules": ["q_proj", "v_proj"]}),
    ("IA3Config", {"target_modules": ["q_proj", "v_proj"], "feedforward_modules": []}),
    ("VeraConfig", {"r": 4, "target_modules": ["q_proj", "v_proj"]}),
    ("ShiraConfig", {"r": 2, "target_modules": ["q_proj", "v_proj"]}),
    ("OFTConfig", {"r": 0, "oft_block_size": 4, "target_modules": ["q_proj", "v_proj"]}),
]


@pytest.mark.parametrize("cls,kwargs", CASES, ids=[c[0] for c in CASES])
def test_linear_with_fan_in_fan_out_true_is_corrected_as_peft_does(cls, kwargs):
    warned = {}
    for lib in (deltatune, peft):
        config = getattr(lib, cls)(fan_in_fan_out=True, task_type="CAUSAL_LM", **kwargs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = lib.get_peft_model(tiny_llama(), config)
        warned[lib.__name__] = [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)]
        assert model.peft_config["default"].fan_in_fan_out is False, lib.__name__
    sentence = ("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out "
                "to False.")
    assert warned["peft"] and all(m.startswith(sentence) for m in warned["peft"] + warned["deltatune"])
    assert warned["deltatune"]


@pytest.mark.parametrize("cls,kwargs", CASES, ids=[c[0] for c in CASES])
def test_conv1d_with_fan_in_fan_out_false_is_corrected(cls, kwargs):
    kwargs = {**kwargs, "target_modules": ["c_attn"]}
    if cls == "IA3Config":
        kwargs["feedforward_modules"] = []
    config = getattr(deltatune, cls)(fan_in_fan_out=False, **kwargs)
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True. \\(transformer.h.0.attn.c_attn\\)"):
        model = deltatune.get_peft_model(tiny_gpt2(), config)
    assert model.peft_config["default"].fan_in_fan_out is True
