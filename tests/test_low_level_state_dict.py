"""PEFT's state-dict functions on models that are not a ``PeftModel``: a plain model after
``inject_adapter_in_model`` and an FSDP(1)-wrapped model. Tensors cross to and from real ``peft`` 0.21.2's
equivalent model with equal outputs; the base-model functions round trip; ``load_peft_weights`` reads PEFT's files."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.errors import AdapterLoadError, AdapterNameError, ConfigError


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.lin = nn.Linear(8, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.lin(self.emb(x)))))


X = torch.arange(12).view(3, 4)
CASES = [
    ("LoraConfig", dict(r=4, target_modules=["lin", "mid"], init_lora_weights=False)),
    ("LoraConfig", dict(r=2, target_modules=["lin"], modules_to_save=["head"], init_lora_weights=False)),
    ("IA3Config", dict(target_modules=["lin", "mid"], feedforward_modules=["mid"], init_ia3_weights=False)),
    ("LoKrConfig", dict(r=2, target_modules=["mid"], init_weights=False)),
]
IDS = ["lora", "lora_modules_to_save", "ia3", "lokr"]


def _base(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def _perturb(model: nn.Module) -> None:
    """Make every trainable tensor non-trivial (a trained adapter; a modules_to_save copy that moved)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_injected_model_state_dict_crosses_to_peft_and_back(name, kwargs):
    ours = dt.inject_adapter_in_model(getattr(dt, name)(**kwargs), _base())
    _perturb(ours)
    ours.eval()
    state = dt.get_peft_model_state_dict(ours)
    assert state and not any(k.startswith("base_model.") or ".default." in k for k in state)

    theirs = peft.inject_adapter_in_model(getattr(peft, name)(**kwargs), _base()).eval()
    assert set(state) == set(peft.get_peft_model_state_dict(theirs))  # the same keys, before loading anything
    result = peft.set_peft_model_state_dict(theirs, state)
    assert not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(theirs(X), ours(X))

    # and back: PEFT's tensors into a fresh deltatune injection
    again = dt.inject_adapter_in_model(getattr(dt, name)(**kwargs), _base()).eval()
    with torch.no_grad():
        assert not torch.allclose(again(X), ours(X))
    loaded = dt.set_peft_model_state_dict(again, peft.get_peft_model_state_dict(theirs))
    assert loaded.missing_keys == [] and loaded.unexpected_keys == []
    with torch.no_grad():
        torch.testing.assert_close(again(X), ours(X))


def test_injected_model_non_default_adapter_name_and_refusals():
    config = dict(r=2, target_modules=["lin"], init_lora_weights=False)
    model = dt.inject_adapter_in_model(dt.LoraConfig(**config), _base(), adapter_name="other")
    state = dt.get_peft_model_state_dict(model, adapter_name="other")
    assert sorted(state) == ["lin.lora_A.weight", "lin.lora_B.weight"]
    with pytest.raises(AdapterNameError, match="no adapter named 'default'.*'other'"):
        dt.get_peft_model_state_dict(model)
    with pytest.raises(ConfigError, match="holds no deltatune adapter layers"):
        dt.get_peft_model_state_dict(_base())
    # a checked load: a wrong shape changes nothing
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(state, **{"lin.lora_A.weight": torch.zeros(3, 8)})
    with pytest.raises(AdapterLoadError, match="shape mismatch at lin"):
        dt.set_peft_model_state_dict(model, bad, adapter_name="other")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_injected_model_with_peft_config_attribute_files_the_bias():
    """A model carrying PEFT's ``peft_config`` dict: its config decides, e.g. ``bias="all"`` files every bias."""
    config = dt.LoraConfig(r=2, target_modules=["lin"], bias="all")
    model = dt.inject_adapter_in_model(config, _base())
    assert model.peft_config == {"default": config}  # injection leaves PEFT's attribute, as PEFT does
    with_bias = dt.get_peft_model_state_dict(model)
    del model.peft_config
    without = dt.get_peft_model_state_dict(model)
    assert set(with_bias) - set(without) == {"lin.base_layer.bias", "mid.bias", "head.bias"}
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["lin"], bias="all"), _base())
    assert set(with_bias) == set(peft.get_peft_model_state_dict(theirs))


def test_base_model_state_dict_round_trip_as_peft():
    model = dt.get_peft_model(_base(), dt.LoraConfig(r=2, target_modules=["lin"], modules_to_save=["head"]))
    theirs = peft.get_peft_model(_base(), peft.LoraConfig(r=2, target_modules=["lin"], modules_to_save=["head"]))
    plain = _base(seed=5).state_dict()
    assert set(dt.get_base_model_state_dict(model)) == set(plain) == set(peft.get_base_model_state_dict(theirs))
    result = dt.set_base_model_state_dict(model, plain)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, value in dt.get_base_model_state_dict(model).items():
        assert torch.equal(value, plain[key]), key
    # modules_to_save's trained copy is the adapter's, not the base's: untouched
    assert not torch.equal(model.base_model.model.head.modules_to_save["default"].weight, plain["head.weight"])
    with pytest.raises(RuntimeError, match="unexpected keys \\['nope'\\]"):
        dt.set_base_model_state_dict(model, {**plain, "nope": torch.zeros(1)})
    result = dt.set_base_model_state_dict(model, {"lin.weight": plain["lin.weight"]}, strict=False)
    assert "mid.weight" in result.missing_keys and result.unexpected_keys == []
    injected = dt.inject_adapter_in_model(dt.LoraConfig(r=2, target_modules=["lin"]), _base())
    assert set(dt.get_base_model_state_dict(injected)) == set(plain)


def test_load_peft_weights_reads_peft_files(tmp_path):
    theirs = peft.get_peft_model(_base(), peft.LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = dt.load_peft_weights(str(tmp_path), device="cpu")
    expected = peft.load_peft_weights(str(tmp_path), device="cpu")
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[k], expected[k]) for k in ours)
    mapping = {r"^lin\.": "renamed."}
    assert dt.load_peft_weights(str(tmp_path), device="cpu", key_mapping=mapping).keys() == \
        peft.load_peft_weights(str(tmp_path), device="cpu", key_mapping=mapping).keys()


def test_fsdp_wrapped_model_round_trip():
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        config = dict(r=2, target_modules=["lin"], init_lora_weights=False, bias="lora_only")
        model = dt.get_peft_model(_base(), dt.LoraConfig(**config)).eval()
        _perturb(model)
        wrapped = FSDP(model, use_orig_params=True, device_id="cpu")
        with torch.no_grad():
            reference = wrapped(X)
        state = dt.get_peft_model_state_dict(wrapped)
        assert set(state) == set(dt.get_peft_model_state_dict(model))
        assert "base_model.model.lin.base_layer.bias" in state

        fresh = dt.get_peft_model(_base(seed=3), dt.LoraConfig(**config)).eval()
        dt.set_base_model_state_dict(fresh, _base().state_dict())
        wrapped_fresh = FSDP(fresh, use_orig_params=True, device_id="cpu")
        dt.set_peft_model_state_dict(wrapped_fresh, state)
        with torch.no_grad():
            torch.testing.assert_close(wrapped_fresh(X), reference)
    finally:
        dist.destroy_process_group()


def test_get_submodules_returns_parent_target_and_name_as_peft():
    from peft.utils import _get_submodules as peft_get

    from deltatune.utils import _get_submodules

    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU()))
    ours, theirs = _get_submodules(model, "0.1"), peft_get(model, "0.1")
    assert ours[0] is theirs[0] is model[0] and ours[1] is theirs[1] is model[0][1] and ours[2] == theirs[2] == "1"


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(8, 8)


class _OldVLM(nn.Module):
    """The old layout of a vision-language model: ``visual`` and ``model`` at the top."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = nn.ModuleDict({"blocks": nn.ModuleList([_Block()])})
        self.model = nn.ModuleDict({"layers": nn.ModuleList([_Block()])})

    def forward(self, x):
        return self.model["layers"][0].attn(self.visual["blocks"][0].attn(x))


class _NewVLM(nn.Module):
    """transformers' new layout of the same model (both under ``model``), with the renames it declares."""

    _checkpoint_conversion_mapping = {"^visual": "model.visual", r"^model(?!\.(language_model|visual))":
                                      "model.language_model"}

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.ModuleDict({"visual": nn.ModuleDict({"blocks": nn.ModuleList([_Block()])}),
                                    "language_model": nn.ModuleDict({"layers": nn.ModuleList([_Block()])})})

    def forward(self, x):
        return self.model["language_model"]["layers"][0].attn(self.model["visual"]["blocks"][0].attn(x))


@pytest.mark.parametrize("config", [dt.LoraConfig(target_modules=["attn"], init_lora_weights=False),
                                    dt.VBLoRAConfig(target_modules=["attn"], vector_length=2, num_vectors=4)],
                         ids=["lora", "vblora"])
def test_an_old_layout_checkpoint_loads_into_the_renamed_model_as_peft_does(config, tmp_path):
    """The model's ``_checkpoint_conversion_mapping`` renames the file's keys in ``from_pretrained`` (PEFT's rule):
    an adapter saved on the old layout gives the renamed model the same outputs in both libraries; without the
    renames (``key_mapping={}``) the file is refused, naming the modules the model lacks."""
    torch.manual_seed(0)
    saved = dt.get_peft_model(_OldVLM(), config)
    with torch.no_grad():
        for p in saved.parameters():
            if p.requires_grad:
                p.uniform_(-1, 1)
    saved.save_pretrained(tmp_path)

    def new_model() -> nn.Module:
        torch.manual_seed(1)  # the same base weights for every copy
        return _NewVLM()

    x = torch.randn(3, 8)
    ours = dt.PeftModel.from_pretrained(new_model(), str(tmp_path)).eval()
    theirs = peft.PeftModel.from_pretrained(new_model(), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
        assert not torch.allclose(ours(x), new_model()(x))  # the adapter arrived
    with pytest.raises(AdapterLoadError, match="modules this model does not have"):
        dt.PeftModel.from_pretrained(new_model(), str(tmp_path), key_mapping={})
