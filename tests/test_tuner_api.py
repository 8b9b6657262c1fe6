"""PEFT's tuner- and layer-level API (``peft_model.base_model``, the adapter layers), against real ``peft`` 0.21.2.

Every check builds the same tiny model twice, once under deltatune and once under ``peft``, does the same calls on
both, and compares what a PEFT user would look at: outputs, ``requires_grad`` flags, scalings, errors.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import deltatune
from deltatune.core.layer import AdapterLayer
from deltatune.registry import METHODS


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 20)
        self.head = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.lin1(self.relu(self.lin0(x)))))


def _mlp() -> MLP:
    torch.manual_seed(0)
    return MLP()


X = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))


def _pair(config_kwargs: dict, second: dict | None = None, cls: str = "LoraConfig"):
    """The same model under deltatune and peft, adapter "default" (and "other" from ``second``), with equal
    adapter tensors (peft's copied into ours by name: the keys are the same)."""
    ours = deltatune.get_peft_model(_mlp(), getattr(deltatune, cls)(**config_kwargs))
    theirs = peft.get_peft_model(_mlp(), getattr(peft, cls)(**config_kwargs))
    if second is not None:
        ours.add_adapter("other", getattr(deltatune, cls)(**second))
        theirs.add_adapter("other", getattr(peft, cls)(**second))
    their_state = theirs.state_dict()
    with torch.no_grad():
        for name, tensor in ours.state_dict().items():
            tensor.copy_(their_state[name])
    return ours, theirs


def _grad_flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


LORA = {"target_modules": ["lin0", "lin1"], "r": 4, "init_lora_weights": False}


# ---- tuner classes and tables ------------------------------------------------------------------
WEIGHT_CASES = {  # a config per registered weight method for the tiny MLP
    "LORA": ("LoraConfig", {"target_modules": ["lin0"]}),
    "LOHA": ("LoHaConfig", {"target_modules": ["lin0"]}),
    "LOKR": ("LoKrConfig", {"target_modules": ["lin0"]}),
    "ADALORA": ("AdaLoraConfig", {"target_modules": ["lin0"], "total_step": 10}),
    "IA3": ("IA3Config", {"target_modules": ["lin0"], "feedforward_modules": []}),
    "VERA": ("VeraConfig", {"target_modules": ["lin0", "lin1"], "r": 4}),
    "HIRA": ("HiraConfig", {"target_modules": ["lin0"]}),
    "SHIRA": ("ShiraConfig", {"target_modules": ["lin0"], "r": 2}),
    "MISS": ("MissConfig", {"target_modules": ["lin0"], "r": 2}),
    "HRA": ("HRAConfig", {"target_modules": ["lin0"], "r": 2}),
    "C3A": ("C3AConfig", {"target_modules": ["lin0"], "block_size": 2}),
    "OFT": ("OFTConfig", {"target_modules": ["lin0"], "r": 2, "oft_block_size": 0}),
    "BOFT": ("BOFTConfig", {"target_modules": ["lin0"], "boft_block_size": 2}),
    "LN_TUNING": ("LNTuningConfig", {"target_modules": ["lin0"]}),
    "TRAINABLE_TOKENS": ("TrainableTokensConfig", None),
    "BITFIT": ("BitFitConfig", {"target_modules": ["lin0"]}),
    "BOTTLENECK": ("BottleneckConfig", None),
    "LILY": ("LilyConfig", {"target_modules": ["lin0"], "r": 4}),
    "GRALORA": ("GraloraConfig", {"target_modules": ["lin0"], "r": 2}),
    "FOURIERFT": ("FourierFTConfig", {"target_modules": ["lin0"], "n_frequency": 20}),
    "RANDLORA": ("RandLoraConfig", {"target_modules": ["lin0"], "r": 4}),
    "PVERA": ("PveraConfig", {"target_modules": ["lin0", "lin1"], "r": 4}),
    "PEANUT": ("PeanutConfig", {"target_modules": ["lin0"], "r": 4}),
    "GLORA": ("GloraConfig", {"target_modules": ["lin0"], "r": 2}),
    "WAVEFT": ("WaveFTConfig", {"target_modules": ["lin0"], "n_frequency": 8}),
    "VBLORA": ("VBLoRAConfig", {"target_modules": ["lin0"], "r": 2, "num_vectors": 8, "vector_length": 2}),
    "ADAPTION_PROMPT": ("AdaptionPromptConfig", None),  # wraps attention modules: the MLP has none
    "ROAD": ("RoadConfig", {"target_modules": ["lin0"], "group_size": 4}),
    "BEFT": ("BeftConfig", {"target_modules": ["lin0"]}),
    "PSOFT": ("PsoftConfig", {"target_modules": ["lin0"], "r": 2}),
    "OSF": ("OSFConfig", {"target_modules": ["lin0"]}),
    "FROD": ("FrodConfig", {"target_modules": ["lin0"]}),
    "DELORA": ("DeloraConfig", {"target_modules": ["lin0"], "r": 2}),
    "DEFT": ("DeftConfig", {"target_modules": ["lin0"], "r": 2}),
    "SUPERTUNING": ("SupertuningConfig", {"target_modules": ["lin0"], "sparsity": 0.5}),
    "TINYLORA": ("TinyLoraConfig", {"target_modules": ["lin0", "lin1"], "u": 4}),
    "UNILORA": ("UniLoraConfig", {"target_modules": ["lin0", "lin1"], "theta_d_length": 16}),
    "SHADOW": ("ShadowConfig", None),  # wraps the decoder blocks of a transformers model: the MLP has none
    "POLY": ("PolyConfig", {"target_modules": ["lin0"], "n_tasks": 2}),
    "ADAMSS": ("AdamssConfig", {"target_modules": ["lin0"], "r": 4, "num_subspaces": 2}),
}


def test_every_weight_method_has_a_tuner_class_with_peft_name_in_the_tables():
    weight = {t for t, m in METHODS.items() if m.family == "weight"}
    table = deltatune.PEFT_TYPE_TO_TUNER_MAPPING
    # PEFT's table also lists the virtual-token methods (their prompt encoders) and X-LoRA (its model class):
    # the same keys as PEFT's for every method both have, and the same class names.
    ours_in_peft = {str(t) for t in METHODS if t in peft.PEFT_TYPE_TO_TUNER_MAPPING}
    assert {str(t) for t in table if t in peft.PEFT_TYPE_TO_TUNER_MAPPING} == ours_in_peft
    assert {str(t) for t in table} == {str(t) for t in weight} | ours_in_peft
    for peft_type in ours_in_peft:
        assert table[peft_type].__name__ == peft.PEFT_TYPE_TO_TUNER_MAPPING[peft_type].__name__, peft_type
    assert table["PROMPT_TUNING"] is deltatune.PromptEmbedding and table["XLORA"] is deltatune.XLoraModel
    assert set(deltatune.PEFT_TYPE_TO_CONFIG_MAPPING) == set(METHODS)  # virtual-token methods too
    assert set(deltatune.PEFT_TYPE_TO_MIXED_MODEL_MAPPING) == {"LORA", "LOHA", "LOKR", "ADALORA", "OFT", "SHIRA"}
    assert set(WEIGHT_CASES) == {str(t) for t in weight}, "a new method needs a row in WEIGHT_CASES"
    for peft_type in weight:
        ours = deltatune.PEFT_TYPE_TO_TUNER_MAPPING[peft_type]
        assert deltatune.PEFT_TYPE_TO_TUNER_MAPPING[str(peft_type).lower()] is ours  # PEFT keys are str enums
        package = METHODS[peft_type].config_cls.__module__.removesuffix(".config")
        assert getattr(__import__(package, fromlist=["_"]), ours.__name__) is ours  # deltatune.lora.LoraModel
        assert getattr(deltatune, ours.__name__) is ours and ours.__name__ in deltatune.__all__
        assert issubclass(ours, deltatune.core.tuner.AdapterModel)
        if peft_type in peft.PEFT_TYPE_TO_TUNER_MAPPING:  # methods PEFT has: same class name, same config name
            assert ours.__name__ == peft.PEFT_TYPE_TO_TUNER_MAPPING[peft_type].__name__
            assert deltatune.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].__name__ == \
                peft.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].__name__
            if hasattr(peft.PEFT_TYPE_TO_TUNER_MAPPING[peft_type], "prefix"):  # PEFT's AdaptionPromptModel has none
                assert ours.prefix == peft.PEFT_TYPE_TO_TUNER_MAPPING[peft_type].prefix
    with pytest.raises(KeyError):
        deltatune.PEFT_TYPE_TO_TUNER_MAPPING["NO_SUCH_METHOD"]


@pytest.mark.parametrize("peft_type", [t for t, (_, kw) in WEIGHT_CASES.items() if kw is not None])
def test_base_model_is_an_instance_of_its_method_tuner_class(peft_type):
    cls_name, kwargs = WEIGHT_CASES[peft_type]
    model = deltatune.get_peft_model(_mlp(), getattr(deltatune, cls_name)(**kwargs))
    tuner = deltatune.PEFT_TYPE_TO_TUNER_MAPPING[peft_type]
    assert type(model.base_model) is tuner
    others = [c for t, c in deltatune.PEFT_TYPE_TO_TUNER_MAPPING.items() if str(t) != peft_type]
    assert not any(isinstance(model.base_model, c) for c in others)
    assert model.get_model_status().adapter_model_type == tuner.__name__
    assert model.base_model.prefix == METHODS[peft_type].prefix
    assert model.base_model.tuner_layer_cls is METHODS[peft_type].layer_cls
    if peft_type not in peft.PEFT_TYPE_TO_TUNER_MAPPING:
        assert model.base_model.uses_shared_state is False  # deltatune's own methods share nothing across layers
    else:
        their_tuner = peft.PEFT_TYPE_TO_TUNER_MAPPING[peft_type]
        assert model.base_model.uses_shared_state is their_tuner.uses_shared_state
        their_defaults = getattr(their_tuner, "target_module_mapping", None) or {}  # IA3Model has none
        if "llama" in their_defaults:
            assert model.base_model.target_module_mapping["llama"] == their_defaults["llama"]


def test_lora_model_constructed_directly_matches_peft():
    """``LoraModel(model, config, "default")`` as PEFT's constructor: the model changes in place, only the adapter
    trains, and (with peft's tensors) the forward is peft's."""
    base = _mlp()
    config = deltatune.LoraConfig(**LORA)
    ours = deltatune.LoraModel(base, config, "default", low_cpu_mem_usage=False)
    theirs = peft.LoraModel(_mlp(), peft.LoraConfig(**LORA), "default")
    assert ours.model is base and isinstance(base.lin0, deltatune.lora.LoraLayer)
    assert ours.peft_config == {"default": config} and ours.active_adapters == ["default"]
    assert _grad_flags(ours) == _grad_flags(theirs)
    with torch.no_grad():
        for name, tensor in ours.state_dict().items():
            tensor.copy_(theirs.state_dict()[name])
    torch.testing.assert_close(ours(X), theirs(X), atol=0, rtol=0)
    assert (ours(X) - _mlp()(X)).abs().max() > 1e-3  # the adapter acts (init_lora_weights=False)
    # PEFT's {name: config} form and low_cpu_mem_usage are accepted too
    other = deltatune.LoraModel(_mlp(), {"x": deltatune.LoraConfig(**LORA)}, "x", low_cpu_mem_usage=True)
    assert other.active_adapter == "x" and other.targeted_module_names == ["lin0", "lin1"]


# ---- switching, gradients --------------------------------------------------------------------
def test_disable_and_enable_adapter_layers_as_peft():
    ours, theirs = _pair(LORA, second=LORA)
    for model in (ours, theirs):
        model.base_model.disable_adapter_layers()
    torch.testing.assert_close(ours(X), _mlp()(X), atol=0, rtol=0)  # the base's output
    torch.testing.assert_close(ours(X), theirs(X), atol=1e-6, rtol=0)
    assert _grad_flags(ours) == _grad_flags(theirs)
    assert not any(p.requires_grad for p in ours.parameters())  # disabled adapters are frozen (PEFT's)
    assert not ours.has_active_enabled_adapter
    for model in (ours, theirs):
        model.base_model.enable_adapter_layers()
    assert _grad_flags(ours) == _grad_flags(theirs)
    assert {n for n, f in _grad_flags(ours).items() if f} == {
        f"base_model.model.{layer}.lora_{ab}.default.weight" for layer in ("lin0", "lin1") for ab in "AB"}
    torch.testing.assert_close(ours(X), theirs(X), atol=1e-6, rtol=0)
    assert ours.has_active_enabled_adapter


def test_disable_adapter_layers_warns_when_biases_train():
    model = deltatune.get_peft_model(_mlp(), deltatune.LoraConfig(target_modules=["lin0"], bias="all"))
    with pytest.warns(UserWarning, match="bias configured to be 'all'"):
        model.base_model.disable_adapter_layers()


def test_disable_adapter_nested_and_flags_restored():
    ours, theirs = _pair(LORA, second=LORA)
    ours.set_requires_grad("default", False)  # a user-frozen adapter stays frozen after the block
    before = _grad_flags(ours)
    with ours.disable_adapter():
        assert not ours.has_active_enabled_adapter
        with ours.disable_adapter():
            assert not ours.has_active_enabled_adapter
        assert not ours.has_active_enabled_adapter  # the inner block does not re-enable
        torch.testing.assert_close(ours(X), _mlp()(X), atol=0, rtol=0)
    assert ours.has_active_enabled_adapter
    assert _grad_flags(ours) == before


def test_set_requires_grad_flips_exactly_that_adapter_as_peft():
    kwargs = {**LORA, "modules_to_save": ["head"]}
    ours, theirs = _pair(kwargs, second=kwargs)
    for call in [("other", True), (["default", "other"], False), ("default", True)]:
        ours.set_requires_grad(*call)
        theirs.set_requires_grad(*call)
        assert _grad_flags(ours) == _grad_flags(theirs), call
    on = {n for n, f in _grad_flags(ours).items() if f}
    assert on and all(".default." in n for n in on)
    assert any("modules_to_save.default" in n for n in on)
    ours.base_model.set_requires_grad("other")  # the tuner's method: same effect
    assert any(".other." in n for n, f in _grad_flags(ours).items() if f)


def test_set_requires_grad_refused_for_prompt_learning():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    model = deltatune.get_peft_model(llama, deltatune.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(TypeError, match="prompt learning"):
        model.set_requires_grad("default")
    assert not model.supports_lora_conversion()


def test_set_adapter_inference_mode_freezes_as_peft():
    ours, theirs = _pair(LORA, second=LORA)
    for model in (ours, theirs):
        model.set_adapter("other", inference_mode=True)
    assert _grad_flags(ours) == _grad_flags(theirs)
    assert not any(p.requires_grad for p in ours.parameters())
    assert ours.active_adapter == "other"


def test_set_adapter_trains_an_inference_mode_adapter_as_peft():
    """PEFT's ``set_adapter`` makes the adapter trainable whatever its config's ``inference_mode`` (the AdaLoRA
    recipe: a second adapter added with ``inference_mode=True``, trained later); adding it leaves it frozen."""
    frozen = {**LORA, "inference_mode": True}
    ours, theirs = _pair(LORA, second=frozen, cls="LoraConfig")
    assert _grad_flags(ours) == _grad_flags(theirs)
    assert not any(".other." in n for n, f in _grad_flags(ours).items() if f)
    for model in (ours, theirs):
        model.set_adapter("other")
    assert _grad_flags(ours) == _grad_flags(theirs)
    assert {n for n, f in _grad_flags(ours).items() if f} == {
        f"base_model.model.{layer}.lora_{ab}.other.weight" for layer in ("lin0", "lin1") for ab in "AB"}


def test_delete_merged_adapter_refused_as_peft():
    ours, theirs = _pair(LORA, second=LORA)
    for model in (ours, theirs):
        model.merge_adapter()
    words = r"Cannot delete adapter\(s\) \['default'\] while they are merged\. Please unmerge them first\."
    with pytest.raises(ValueError, match=words):
        theirs.delete_adapter("default")
    with pytest.raises(ValueError, match=words):
        ours.delete_adapter("default")
    with pytest.raises(ValueError, match="Adapter nope does not exist"):
        ours.delete_adapter("nope")
    assert set(ours.peft_config) == {"default", "other"}  # nothing changed
    merged = ours(X)
    ours.unmerge_adapter()
    torch.testing.assert_close(ours(X), merged, atol=1e-5, rtol=0)
    ours.delete_adapter("default")
    assert set(ours.peft_config) == {"other"}


def test_add_weighted_adapter_on_the_tuner_equals_peft():
    ours, theirs = _pair(LORA, second=LORA)
    twin = copy.deepcopy(ours)
    for model in (ours, theirs):
        model.base_model.add_weighted_adapter(["default", "other"], [0.7, 0.3], "mix", combination_type="linear")
    twin.add_weighted_adapter(["default", "other"], [0.7, 0.3], "mix", combination_type="linear")
    assert ours.active_adapter == "default"  # not made active (PEFT's)
    for model in (ours, theirs, twin):
        model.set_adapter("mix")
    torch.testing.assert_close(ours(X), twin(X), atol=0, rtol=0)
    torch.testing.assert_close(ours(X), theirs(X), atol=1e-6, rtol=0)
    for factor in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(ours.base_model.model.lin1, factor)["mix"].weight,
                                   getattr(theirs.base_model.model.lin1, factor)["mix"].weight, atol=1e-6, rtol=0)


# ---- PeftModel attributes ------------------------------------------------------------------------
def test_peft_model_attributes_as_peft():
    kwargs = {**LORA, "modules_to_save": ["head"]}
    ours, theirs = _pair(kwargs)
    assert ours.active_peft_config is ours.peft_config["default"]
    assert ours.modules_to_save == theirs.modules_to_save == {"head"}
    assert deltatune.get_peft_model(_mlp(), deltatune.LoraConfig(**LORA)).modules_to_save is None
    assert ours.base_model_torch_dtype is None is theirs.base_model_torch_dtype  # a plain module has no dtype
    assert ours.has_active_enabled_adapter is theirs.has_active_enabled_adapter is True
    assert ours.prefix == theirs.prefix == "lora_"


@pytest.mark.parametrize("cls_name, kwargs", [
    ("LoraConfig", {"target_modules": ["lin0"]}),
    ("LoraConfig", {"target_modules": ["lin0"], "use_dora": True}),
    ("LoHaConfig", {"target_modules": ["lin0"]}),
    ("LoKrConfig", {"target_modules": ["lin0"]}),
    ("VeraConfig", {"target_modules": ["lin0", "lin1"], "r": 4}),
    ("IA3Config", {"target_modules": ["lin0"], "feedforward_modules": []}),
    ("OFTConfig", {"target_modules": ["lin0"], "r": 2, "oft_block_size": 0}),
    ("RandLoraConfig", {"target_modules": ["lin0", "lin1"], "r": 4}),
    ("PveraConfig", {"target_modules": ["lin0", "lin1"], "r": 4}),
])
def test_supports_lora_conversion_as_peft(cls_name, kwargs):
    ours = deltatune.get_peft_model(_mlp(), getattr(deltatune, cls_name)(**kwargs))
    theirs = peft.get_peft_model(_mlp(), getattr(peft, cls_name)(**kwargs))
    assert ours.supports_lora_conversion() is theirs.supports_lora_conversion()
    assert ours.base_model.supports_lora_conversion() is theirs.base_model.supports_lora_conversion()


def test_prepare_model_for_gradient_checkpointing_makes_embedding_output_require_grad():
    class Embedder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.lin = nn.Linear(4, 4)

        def get_input_embeddings(self) -> nn.Module:
            return self.embed

        def forward(self, ids):
            return self.lin(self.embed(ids))

    model = deltatune.get_peft_model(Embedder(), deltatune.LoraConfig(target_modules=["lin"]))
    ids = torch.tensor([[1, 2]])
    assert not model.base_model.model.embed(ids).requires_grad  # frozen embedding
    assert model.prepare_model_for_gradient_checkpointing(model.get_base_model()) is model.get_base_model()
    assert model.base_model.model.embed(ids).requires_grad


# ---- layer level -------------------------------------------------------------------------------
def test_layer_attributes_as_peft():
    ours, theirs = _pair(LORA, second=LORA)
    layer, their_layer = ours.base_model.model.lin0, theirs.base_model.model.lin0
    assert layer.active_adapter == their_layer.active_adapter == ["default"]
    assert layer.active_adapters == their_layer.active_adapters
    assert layer.merged_adapters == their_layer.merged_adapters == []
    assert layer.disable_adapters is their_layer.disable_adapters is False
    assert layer._all_available_adapter_names() == their_layer._all_available_adapter_names() == ["default", "other"]
    assert layer.supports_lora_conversion() is their_layer.supports_lora_conversion() is True
    assert layer.frozen_peft_weight_names == {}
    torch.testing.assert_close(layer.get_base_weight(), their_layer.get_base_weight(), atol=0, rtol=0)
    new = torch.randn(20, 10)
    layer.set_base_weight(new.clone())
    assert torch.equal(layer.base_layer.weight, new) and torch.equal(layer.get_base_weight(), new)
    layer.set_requires_grad("other")
    their_layer.set_requires_grad("other")
    assert _grad_flags(layer) == _grad_flags(their_layer)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_set_scale_scale_layer_unscale_layer_as_peft(use_rslora):
    kwargs = {**LORA, "lora_alpha": 12, "use_rslora": use_rslora}
    ours, theirs = _pair(kwargs)
    layer, their_layer = ours.base_model.model.lin0, theirs.base_model.model.lin0
    initial = 12 / (4 ** 0.5 if use_rslora else 4)
    assert layer.scaling["default"] == pytest.approx(initial)
    steps = [("set_scale", ("default", 0.5)), ("scale_layer", (3.0,)), ("unscale_layer", (2.0,)),
             ("set_scale", ("missing", 9.0)), ("unscale_layer", (None,)), ("scale_layer", (0.25,))]
    for method, args in steps:
        getattr(layer, method)(*args)
        getattr(their_layer, method)(*args)
        assert layer.scaling == pytest.approx(their_layer.scaling), method
        torch.testing.assert_close(ours(X), theirs(X), atol=1e-6, rtol=0)
    assert layer.scaling["default"] == pytest.approx(initial * 0.25)


def test_reset_lora_parameters_as_peft():
    ours, _ = _pair(LORA)
    layer = ours.base_model.model.lin0
    layer.reset_lora_parameters("default", True)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # B = 0: the adapter is the identity again
    bound = 1 / 10 ** 0.5  # kaiming_uniform(a=sqrt(5)) on (r, in=10): U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A["default"].weight.abs().max() <= bound
    torch.testing.assert_close(layer(X), layer.base_layer(X), atol=0, rtol=0)
    torch.manual_seed(3)
    layer.reset_lora_parameters("default", "gaussian")
    a = layer.lora_A["default"].weight.clone()
    their_layer = peft.get_peft_model(_mlp(), peft.LoraConfig(**LORA)).base_model.model.lin0
    torch.manual_seed(3)
    their_layer.reset_lora_parameters("default", "gaussian")
    torch.testing.assert_close(a, their_layer.lora_A["default"].weight, atol=0, rtol=0)  # N(0, 1/r), same draws
    layer.reset_lora_parameters("default", False)
    assert torch.equal(layer.lora_A["default"].weight, a)  # False: unchanged
    with pytest.raises(ValueError, match="Unknown initialization"):
        layer.reset_lora_parameters("default", "pissa")


def test_generic_layer_set_requires_grad_keeps_design_frozen_weights():
    model = deltatune.get_peft_model(_mlp(), deltatune.LoHaConfig(target_modules=["lin0"]))
    layer = model.base_model.model.lin0
    assert isinstance(layer, AdapterLayer)
    layer.set_requires_grad("default", False)
    assert not any(p.requires_grad for p in layer.parameters())
    layer.frozen_adapter_weights["default"] = ("hada_w1_a",)  # a container the adapter keeps frozen
    layer.set_requires_grad(["default"])
    assert not layer.hada_w1_a["default"].requires_grad and layer.hada_w2_a["default"].requires_grad
