"""Bad input fails with a clear ``deltatune.errors`` exception naming the problem, and leaves the model as it was.

Every error is a :class:`deltatune.errors.DeltatuneError` and (like PEFT's) a ``ValueError`` where PEFT
raises one, so ``except ValueError`` code keeps working. After each failed call the model has the same
parameter names, values and module types as before.
"""

from __future__ import annotations

import json
import os

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from support.models import assert_same_state, params_snapshot, tiny_gpt2, tiny_llama, tiny_net
from torch import nn

import deltatune
from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.errors import DeltatuneError


def _types(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()}


class Unchanged:
    """Context manager: the model's state dict (keys and values) and module types are the same after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self):
        self.state = params_snapshot(self.model)
        self.types = _types(self.model)
        return self

    def __exit__(self, *exc):
        assert_same_state(self.state, self.model)
        assert _types(self.model) == self.types, "module types changed (an adapter layer was left behind)"
        return False


def _raises(exc_type=ValueError):
    """pytest.raises that also checks the exception is one of deltatune's."""
    return pytest.raises(exc_type)


def _check_deltatune(info) -> str:
    assert isinstance(info.value, DeltatuneError), f"{type(info.value).__name__} is not a DeltatuneError"
    return str(info.value)


@pytest.fixture
def saved_llama_adapter(tmp_path):
    pm = get_peft_model(tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


# ---- exception types -----------------------------------------------------------------------------

def test_error_hierarchy():
    from deltatune import errors

    for name in ("ConfigError", "TargetModuleError", "AdapterLoadError", "AdapterNameError", "MergeError"):
        cls = getattr(errors, name)
        assert issubclass(cls, DeltatuneError), name
        assert issubclass(cls, ValueError), name


# ---- targeting -----------------------------------------------------------------------------------

def test_target_matching_nothing_lists_closest_names():
    model = tiny_llama(0)
    with Unchanged(model), _raises(ValueError) as info:
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_prj", "vproj"]))
    msg = _check_deltatune(info)
    assert "q_prj" in msg
    assert "q_proj" in msg and "v_proj" in msg, f"closest real names expected in: {msg}"
    with pytest.raises(ValueError):  # PEFT refuses too
        peft.get_peft_model(tiny_llama(0), peft.LoraConfig(r=2, target_modules=["q_prj", "vproj"]))


def test_a_long_target_list_matching_nothing_is_shortened():
    """An adapter config that names every full module path of another model (PEFT saves "all-linear" that way)."""
    names = [f"model.layers.{i}.mlp.gate_prj" for i in range(30)]
    with _raises(ValueError) as info:
        get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=names))
    msg = _check_deltatune(info)
    assert "... 30 names in all" in msg and msg.count("gate_prj") == 5 and "gate_proj" in msg


def test_regex_matching_nothing():
    model = tiny_llama(0)
    with Unchanged(model), _raises(ValueError) as info:
        get_peft_model(model, LoraConfig(r=2, target_modules=r".*\.attention\.query"))
    assert "attention" in _check_deltatune(info)


def test_layers_to_transform_matching_nothing():
    model = tiny_llama(0)
    with Unchanged(model), _raises(ValueError) as info:
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[7],
                                         layers_pattern="layers"))
    msg = _check_deltatune(info)
    assert "layers_to_transform" in msg and "7" in msg


@pytest.mark.parametrize("factory,target,type_name", [
    (tiny_llama, ["input_layernorm"], "LlamaRMSNorm"),
    (tiny_net, ["norm"], "LayerNorm"),
    (tiny_llama, ["self_attn"], "LlamaAttention"),
])
def test_unsupported_layer_type(factory, target, type_name):
    model = factory(0)
    with Unchanged(model), _raises(ValueError) as info:
        get_peft_model(model, LoraConfig(r=2, target_modules=target))
    msg = _check_deltatune(info)
    assert type_name in msg, msg
    assert target[0] in msg
    assert "Linear" in msg, f"the message should say what is supported: {msg}"


def test_partial_injection_is_rolled_back():
    """A regex that hits a Linear first and an unsupported module later must leave no adapter layer behind."""
    model = tiny_llama(0)
    with Unchanged(model), _raises(ValueError):
        get_peft_model(model, LoraConfig(
            r=2, target_modules=r".*layers\.0\.(self_attn\.q_proj|post_attention_layernorm)"))


def test_no_default_targets_for_unknown_model():
    model = tiny_net(0)
    with Unchanged(model), _raises(ValueError) as info:
        get_peft_model(model, LoraConfig(r=2))
    assert "target_modules" in _check_deltatune(info)


# ---- config values -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,word", [
    ({"r": 0}, "r"), ({"r": -3}, "r"), ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ({"lora_dropout": 1.5}, "lora_dropout"), ({"bias": "some"}, "bias"),
    ({"init_lora_weights": "kaiming"}, "init_lora_weights"),
])
def test_bad_config_values(kwargs, word):
    with _raises(ValueError) as info:
        LoraConfig(target_modules=["q_proj"], **kwargs)
    msg = _check_deltatune(info)
    assert word in msg and str(next(iter(kwargs.values())) if word != "rank_pattern" else "q_proj") in msg


def test_lora_bias_on_embedding_refused_like_peft():
    model = tiny_net(0)
    with Unchanged(model), _raises(ValueError) as info:
        get_peft_model(model, LoraConfig(r=2, target_modules=["emb"], lora_bias=True))
    assert "lora_bias" in _check_deltatune(info)
    with pytest.raises(ValueError):
        peft.get_peft_model(tiny_net(0), peft.LoraConfig(r=2, target_modules=["emb"], lora_bias=True))


# ---- adapter names -------------------------------------------------------------------------------

def test_duplicate_adapter_name(saved_llama_adapter):
    pm = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"]))
    pm.add_adapter("second", LoraConfig(r=2, target_modules=["k_proj"]))
    for name in ("default", "second"):
        with Unchanged(pm), _raises(ValueError) as info:
            pm.add_adapter(name, LoraConfig(r=2, target_modules=["v_proj"]))
        assert name in _check_deltatune(info)
        with Unchanged(pm), _raises(ValueError) as info:
            pm.load_adapter(saved_llama_adapter, adapter_name=name)
        assert name in _check_deltatune(info)
    assert set(pm.peft_config) == {"default", "second"}


def test_failed_add_adapter_leaves_model_unchanged():
    pm = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"]))
    with Unchanged(pm), _raises(ValueError):
        pm.add_adapter("bad", LoraConfig(r=2, target_modules=["nothing_here"]))
    assert set(pm.peft_config) == {"default"}
    with Unchanged(pm), _raises(ValueError):
        pm.add_adapter("bad", LoraConfig(r=2, target_modules=r".*layers\.0\.(self_attn\.k_proj|input_layernorm)"))
    assert set(pm.peft_config) == {"default"}


# ---- loading -------------------------------------------------------------------------------------

def _llama_with(**overrides) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
           "tie_word_embeddings": False}
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def test_shape_mismatch_names_module_and_shapes(saved_llama_adapter):
    # hidden 48 -> q_proj is 48 x 48, so lora_A is (4, 48) where the file has (4, 32).
    model = _llama_with(hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    with Unchanged(model), _raises(ValueError) as info:
        PeftModel.from_pretrained(model, saved_llama_adapter)
    msg = _check_deltatune(info)
    assert "q_proj" in msg or "v_proj" in msg, msg
    assert "(4, 32)" in msg and "(4, 48)" in msg, f"both shapes expected in: {msg}"


def test_shape_mismatch_in_load_adapter_keeps_peft_model(saved_llama_adapter, tmp_path):
    pm = get_peft_model(_llama_with(hidden_size=48), LoraConfig(r=4, target_modules=["q_proj"]))
    with Unchanged(pm), _raises(ValueError) as info:
        pm.load_adapter(saved_llama_adapter, adapter_name="other")
    _check_deltatune(info)
    assert set(pm.peft_config) == {"default"}


def test_adapter_for_other_architecture(saved_llama_adapter):
    model = tiny_gpt2(0)
    with Unchanged(model), _raises(ValueError) as info:
        PeftModel.from_pretrained(model, saved_llama_adapter)
    msg = _check_deltatune(info)
    assert "q_proj" in msg, msg


def _copy_adapter(src, dst):
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if os.path.isfile(os.path.join(src, f)):
            with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
                b.write(a.read())
    return dst


@pytest.mark.parametrize("peft_type", ["FOO_BAR", "IA3_XYZ"])
def test_unknown_peft_type(saved_llama_adapter, tmp_path, peft_type):
    d = _copy_adapter(saved_llama_adapter, tmp_path / "bad")
    with open(d / "adapter_config.json") as fh:
        cfg = json.load(fh)
    cfg["peft_type"] = peft_type
    with open(d / "adapter_config.json", "w") as fh:
        json.dump(cfg, fh)
    model = tiny_llama(0)
    with Unchanged(model), _raises(ValueError) as info:
        PeftModel.from_pretrained(model, d)
    msg = _check_deltatune(info)
    assert peft_type in msg and "LORA" in msg, f"the message should name the type and what is known: {msg}"
    with _raises(ValueError) as info:
        deltatune.PeftConfig.from_pretrained(d)
    _check_deltatune(info)


def test_missing_adapter_dir(tmp_path):
    model = tiny_llama(0)
    missing = tmp_path / "does_not_exist"
    with Unchanged(model), pytest.raises((ValueError, FileNotFoundError, OSError)) as info:
        PeftModel.from_pretrained(model, missing)
    msg = _check_deltatune(info)
    assert "does_not_exist" in msg


def test_missing_weights_file(saved_llama_adapter, tmp_path):
    d = _copy_adapter(saved_llama_adapter, tmp_path / "noweights")
    os.remove(d / "adapter_model.safetensors")
    model = tiny_llama(0)
    with Unchanged(model), pytest.raises((ValueError, FileNotFoundError, OSError)) as info:
        PeftModel.from_pretrained(model, d)
    assert "adapter_model.safetensors" in _check_deltatune(info)


def test_missing_config_file(saved_llama_adapter, tmp_path):
    d = _copy_adapter(saved_llama_adapter, tmp_path / "noconfig")
    os.remove(d / "adapter_config.json")
    model = tiny_llama(0)
    with Unchanged(model), pytest.raises((ValueError, FileNotFoundError, OSError)) as info:
        PeftModel.from_pretrained(model, d)
    assert "adapter_config.json" in _check_deltatune(info)


@pytest.mark.parametrize("how", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(saved_llama_adapter, tmp_path, how):
    d = _copy_adapter(saved_llama_adapter, tmp_path / how)
    path = d / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b""}[how])
    model = tiny_llama(0)
    with Unchanged(model), _raises(ValueError) as info:
        PeftModel.from_pretrained(model, d)
    assert "adapter_model.safetensors" in _check_deltatune(info)


def test_corrupt_config_json(saved_llama_adapter, tmp_path):
    d = _copy_adapter(saved_llama_adapter, tmp_path / "badjson")
    (d / "adapter_config.json").write_text("{not json")
    model = tiny_llama(0)
    with Unchanged(model), _raises(ValueError) as info:
        PeftModel.from_pretrained(model, d)
    assert "adapter_config.json" in _check_deltatune(info)


def test_incomplete_weights_file(saved_llama_adapter, tmp_path):
    d = _copy_adapter(saved_llama_adapter, tmp_path / "incomplete")
    tensors = load_file(d / "adapter_model.safetensors")
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, d / "adapter_model.safetensors")
    model = tiny_llama(0)
    with Unchanged(model), _raises(ValueError) as info:
        PeftModel.from_pretrained(model, d)
    msg = _check_deltatune(info)
    assert "lora" in msg.lower()


def test_config_field_type_errors():
    with _raises(ValueError) as info:
        LoraConfig(r=2, target_modules=["q_proj"], task_type="NOT_A_TASK")
    assert "NOT_A_TASK" in _check_deltatune(info)
