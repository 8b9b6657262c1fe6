"""Issue 18: deltatune's refusals and warnings begin with PEFT 0.21.2's sentence, then add deltatune's fix hint.

Code written for PEFT (and PEFT's own test suite) catches these with ``except ValueError`` / ``pytest.raises(...,
match=...)``. Each case makes the same call with real ``peft`` and with ``deltatune``; PEFT's message, taken from
the run (not written here), must be the start of deltatune's (``re.match`` on PEFT's text, escaped), deltatune's
exception must be an instance of every built-in class PEFT's is (``ValueError``, ``TypeError``...; PEFT's
``NoMatchingPeftModuleError`` -> deltatune's alias of it), and deltatune's hint must still be there.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable

import peft
import peft.utils.hotswap
import pytest
import torch
from torch import nn

import deltatune as dt
import deltatune.hotswap


class MLP(nn.Module):
    """PEFT's test model: lin0 -> relu -> drop -> lin1 -> log-softmax; ``x: (B, 10)`` -> ``(B, 2)``."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(x)))))


class Emb(nn.Module):
    """An embedding then a linear layer; ``x: (B, T)`` token ids."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lin0 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(self.emb(x))


class MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2)


class GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, groups=2)


def _two_lora(lib, **kwargs):
    torch.manual_seed(0)
    model = lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0"], init_lora_weights=False, **kwargs))
    model.add_adapter("other", lib.LoraConfig(target_modules=["lin0"], init_lora_weights=False, **kwargs))
    return model.eval()


def _nan_lora_weight(lib):
    model = lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0"]))
    with torch.no_grad():
        model.base_model.model.lin0.lora_B["default"].weight.fill_(float("nan"))
    model.merge_and_unload(safe_merge=True)


def _nan_lora_bias(lib):
    model = lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0"], lora_bias=True))
    with torch.no_grad():
        model.base_model.model.lin0.lora_B["default"].bias.fill_(float("inf"))
    model.merge_and_unload(safe_merge=True)


def _overflowing_ia3_bias(lib):
    net = MLP()
    with torch.no_grad():
        net.lin1.bias.fill_(3e38)  # finite; times 2 it is not (the weight stays finite)
    model = lib.get_peft_model(net, lib.IA3Config(target_modules=["lin1"], feedforward_modules=[]))
    with torch.no_grad():
        model.base_model.model.lin1.ia3_l["default"].fill_(2.0)
    model.merge_and_unload(safe_merge=True)


def _nan_trainable_tokens(lib):
    model = lib.get_peft_model(Emb(), lib.TrainableTokensConfig(target_modules=["emb"], token_indices=[1, 2]))
    with torch.no_grad():
        model.base_model.model.emb.trainable_tokens_delta["default"].fill_(float("nan"))
    model.merge_and_unload(safe_merge=True)


def _mixed_training(lib):
    _two_lora(lib).train()(torch.randn(2, 10), adapter_names=["default", "other"])


def _mixed_unknown(lib):
    _two_lora(lib)(torch.randn(2, 10), adapter_names=["default", "does-not-exist"])


def _mixed_merged(lib):
    model = _two_lora(lib)
    model.merge_adapter()
    model(torch.randn(2, 10), adapter_names=["default", "other"])


def _mixed_length(lib):
    _two_lora(lib)(torch.randn(3, 10), adapter_names=["default", "other"])


def _weighted_with_shared_modules_to_save(lib):
    model = lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
    model.add_adapter("other", lib.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
    model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "merged")


def _duplicate_adapter(lib):
    model = lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0"]))
    model.add_adapter("default", lib.LoraConfig(target_modules=["lin1"]))


def _vera_pair(lib, **second):
    model = lib.get_peft_model(MLP(), lib.VeraConfig(target_modules=["lin0"], r=4))
    model.add_adapter("other", lib.VeraConfig(target_modules=["lin0"], **{"r": 4, **second}))


def _hotswap_unknown_check(lib):
    module = _hotswap(lib)
    model = lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0"]))
    # PEFT reads check_compiled only for a compiled model; compiling is lazy, nothing runs here
    module.prepare_model_for_compiled_hotswap(torch.compile(model), target_rank=8, check_compiled="wrong-option")


def _hotswap_grouped_conv(lib):
    module = _hotswap(lib)
    model = lib.get_peft_model(GroupedConv(), lib.LoraConfig(target_modules=["conv"], r=2))
    module.prepare_model_for_compiled_hotswap(model, target_rank=3)


def _config_with_pattern_only(cls: str, lib):
    return getattr(lib, cls)(target_modules=["lin0"], layers_pattern="layers")


class Kdim(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)


def _two_bias_adapters(lib):
    model = lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0"], bias="all"))
    model.add_adapter("other", lib.LoraConfig(target_modules=["lin1"], bias="lora_only"))


def _hotswap(lib):
    return deltatune.hotswap if lib is dt else peft.utils.hotswap


def _hotswap_rank_too_small(lib):
    model = lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0"], r=10))
    _hotswap(lib).prepare_model_for_compiled_hotswap(model, target_rank=9)


# (id, the call with lib = peft or deltatune, a fragment of deltatune's hint that must stay after PEFT's sentence)
CASES: list[tuple[str, Callable, str]] = [
    ("safe_merge NaN weight (LoRA)", _nan_lora_weight, "nothing was merged"),
    ("safe_merge NaN lora_bias (LoRA says weights)", _nan_lora_bias, "NaN/Inf in the bias"),
    ("safe_merge NaN bias (IA3 says bias)", _overflowing_ia3_bias, "NaN/Inf in the bias"),
    ("safe_merge NaN trainable tokens", _nan_trainable_tokens, "nothing was merged"),
    ("adapter_names in training mode", _mixed_training, "model.eval()"),
    ("adapter_names unknown", _mixed_unknown, "'__base__'"),
    ("adapter_names with merged adapters", _mixed_merged, "need unmerged adapters"),
    ("adapter_names length", _mixed_length, "one adapter name per input row"),
    ("target modules not found",
     lambda L: L.get_peft_model(MLP(), L.LoraConfig(target_modules=["non_existent_module"])),
     "module names in this model: ['drop'"),
    ("all modules excluded",
     lambda L: L.get_peft_model(MLP(), L.LoraConfig(target_modules=["lin0", "lin1", "relu", "drop", "sm"],
                                                    exclude_modules=["lin0", "lin1", "relu", "drop", "sm"])),
     "Excluded: ["),
    ("some excluded, some unmatched",
     lambda L: L.get_peft_model(MLP(), L.LoraConfig(target_modules=["lin0", "nope"], exclude_modules=["lin0"])),
     "Excluded: ['lin0']"),
    ("only modules_to_save matched",
     lambda L: L.get_peft_model(MLP(), L.LoraConfig(target_modules=["lin0"])).add_adapter(
         "other", L.LoraConfig(target_modules=["nope"], modules_to_save=["lin1"])), "Excluded: ['lin1']"),
    ("no default target_modules", lambda L: L.get_peft_model(MLP(), L.IA3Config()), "'all-linear'"),
    ("duplicate adapter name", _duplicate_adapter, "delete_adapter()"),
    ("add_weighted_adapter with shared modules_to_save", _weighted_with_shared_modules_to_save,
     "combine adapters without shared modules_to_save"),
    ("AdaLoRA total_step None", lambda L: L.AdaLoraConfig(target_modules=["lin0"]), "optimizer steps"),
    ("AdaLoRA total_step 0", lambda L: L.AdaLoraConfig(target_modules=["lin0"], total_step=0), "got 0"),
    ("AdaLoRA no budgeting phase",
     lambda L: L.AdaLoraConfig(target_modules=["lin0"], total_step=10, tinit=5, tfinal=5), "tinit=5 + tfinal=5"),
    ("AdaLoRA orth_reg_weight",
     lambda L: L.AdaLoraConfig(target_modules=["lin0"], total_step=10, tinit=1, tfinal=1, orth_reg_weight=-1), ""),
    ("AdaLoRA DoRA", lambda L: L.AdaLoraConfig(target_modules=["lin0"], total_step=10, use_dora=True),
     "LoraConfig(use_dora=True)"),
    # PEFT's own test matches this sentence whole (^...$), so no hint follows it
    ("IA3 feedforward not a subset",
     lambda L: L.IA3Config(target_modules=["lin0"], feedforward_modules=["lin1"]), ""),
    ("LoRA layers_to_transform with regex",
     lambda L: L.LoraConfig(target_modules=".*lin0", layers_to_transform=[0]), "into the regex"),
    ("LoRA layers_pattern with regex",
     lambda L: L.LoraConfig(target_modules=".*lin0", layers_pattern="layers"), "into the regex"),
    ("lora_bias with DoRA", lambda L: L.LoraConfig(target_modules=["lin0"], lora_bias=True, use_dora=True), ""),
    ("lora_bias with gaussian init",
     lambda L: L.LoraConfig(target_modules=["lin0"], lora_bias=True, init_lora_weights="gaussian"),
     "Set lora_bias=False"),
    *[(f"{cls} layers_pattern without layers_to_transform",
       functools.partial(_config_with_pattern_only, cls),
       "set both or neither")
      for cls in ("LoraConfig", "LoHaConfig", "VeraConfig", "OFTConfig")],
    ("inject_adapter_in_model with VeRA",
     lambda L: L.inject_adapter_in_model(L.VeraConfig(target_modules=["lin0"]), MLP()), "kept on the wrapper"),
    ("VeRA different prng key", lambda L: _vera_pair(L, projection_prng_key=1), "use projection_prng_key=0"),
    ("VeRA mixed save_projection", lambda L: _vera_pair(L, save_projection=False), "saved for all adapters"),
    ("VeRA larger second rank", lambda L: _vera_pair(L, r=8), "use r<=4"),
    ("DoRA on MultiheadAttention",
     lambda L: L.get_peft_model(MHA(), L.LoraConfig(target_modules=["mha"], use_dora=True)), "out of target_modules"),
    ("lora_bias on Embedding",
     lambda L: L.get_peft_model(Emb(), L.LoraConfig(target_modules=["emb"], lora_bias=True)), "Set lora_bias=False"),
    ("hotswap check_compiled unknown", _hotswap_unknown_check, ""),
    ("hotswap grouped conv rank", _hotswap_grouped_conv, "pass a target_rank divisible by 2"),
    ("orthogonal init with an odd rank",
     lambda L: L.get_peft_model(MLP(), L.LoraConfig(target_modules=["lin0"], r=7, init_lora_weights="orthogonal")),
     "use 8"),
    ("MiCA rank above the layer's", lambda L: L.get_peft_model(
        MLP(), L.LoraConfig(target_modules=["lin1"], r=3, init_lora_weights="mica")), "lower r"),
    ("MultiheadAttention with separate q/k/v",
     lambda L: L.get_peft_model(Kdim(), L.LoraConfig(target_modules=["mha"])), "packed q/k/v"),
    ("second adapter with bias", _two_bias_adapters, "only one adapter per model may train biases"),
    ("only modules_to_save among the targets",
     lambda L: L.get_peft_model(MLP(), L.LoraConfig(target_modules=["lin0"], modules_to_save=["lin0"])),
     "nothing to adapt"),
    ("target_parameters matching nothing",
     lambda L: L.get_peft_model(MLP(), L.LoraConfig(target_parameters=["foobar.weight"])), "module path suffix"),
    ("hotswap preparing a compiled model",
     lambda L: _hotswap(L).prepare_model_for_compiled_hotswap(
         torch.compile(L.get_peft_model(MLP(), L.LoraConfig(target_modules=["lin0"])))), "check_compiled='warn'"),
    ("hotswap preparing a model without adapters", lambda L: _hotswap(L).prepare_model_for_compiled_hotswap(MLP()),
     "No LoRA layers"),
    ("hotswap target_rank below a rank", _hotswap_rank_too_small, "target_rank must be the largest rank"),
    ("hotswap configs of two methods",
     lambda L: _hotswap(L).check_hotswap_configs_compatible(L.LoraConfig(), L.IA3Config()), "load_adapter instead"),
    ("hotswap configs of another method",
     lambda L: _hotswap(L).check_hotswap_configs_compatible(L.IA3Config(), L.IA3Config()), "LoRA adapters only"),
]


def _raised(call: Callable, lib) -> BaseException:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            call(lib)
        except Exception as err:  # noqa: BLE001 - the test compares what each library raises
            return err
    raise AssertionError(f"{lib.__name__} raised nothing")


def _builtin_bases(err: BaseException) -> set[type]:
    return {c for c in type(err).__mro__ if c.__module__ == "builtins" and c not in (object, BaseException,
                                                                                      Exception)}


@pytest.mark.parametrize("call, hint", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_message_starts_with_peft_sentence_and_keeps_the_hint(call: Callable, hint: str) -> None:
    theirs, ours = _raised(call, peft), _raised(call, dt)
    assert isinstance(ours, dt.DeltatuneError), repr(ours)
    assert _builtin_bases(theirs) <= _builtin_bases(ours), (type(theirs), type(ours))
    if isinstance(theirs, peft.NoMatchingPeftModuleError):
        assert isinstance(ours, dt.NoMatchingPeftModuleError)
    peft_sentence = str(theirs).rstrip()
    assert re.match(re.escape(peft_sentence), str(ours)), f"\npeft:      {theirs}\ndeltatune: {ours}"
    assert hint in str(ours)[len(peft_sentence):], str(ours)


def test_adalora_loftq_as_peft_writes_it() -> None:
    # Real peft cannot be asked here: its LoraConfig wants scipy for LoftQ first (ImportError in this venv), so the
    # sentence is PEFT's f-string over real peft's PeftType (adalora/config.py) and PEFT's own test's regex.
    with pytest.raises(ValueError) as info:
        dt.AdaLoraConfig(init_lora_weights="loftq", loftq_config={"loftq": "config"}, total_step=1)
    assert re.match(re.escape(f"{peft.PeftType.ADALORA} does not support LOFTQ."), str(info.value))
    assert re.search("ADALORA does not support LOFTQ", str(info.value)) and "use LoraConfig" in str(info.value)


WARN_CASES: list[tuple[str, Callable]] = [
    ("exclude_modules excluded nothing",
     lambda L: L.get_peft_model(MLP(), L.LoraConfig(target_modules=["lin1"], exclude_modules=["nope"]))),
    ("embedding layers of a non-transformers model",
     lambda L: L.get_peft_model_state_dict(L.get_peft_model(Emb(), L.LoraConfig(target_modules=["emb"])),
                                           save_embedding_layers=True)),
]


def _warned(call: Callable, lib) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call(lib)
    return [w for w in caught if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("call", [c[1] for c in WARN_CASES], ids=[c[0] for c in WARN_CASES])
def test_warning_as_peft(call: Callable) -> None:
    theirs = [w for w in _warned(call, peft) if "deprecat" not in str(w.message).lower()]
    assert len(theirs) == 1, [str(w.message) for w in theirs]
    ours = [w for w in _warned(call, dt) if re.match(re.escape(str(theirs[0].message)), str(w.message))]
    assert ours, [str(w.message) for w in _warned(call, dt)]
    builtin = next(c for c in theirs[0].category.__mro__ if c.__module__ == "builtins")
    assert issubclass(ours[0].category, builtin), (theirs[0].category, ours[0].category)
