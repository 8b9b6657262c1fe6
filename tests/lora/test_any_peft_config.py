"""Issue 19 item 1: loading never depends on how an adapter was initialised.

Every ``init_lora_weights`` PEFT 0.21.2 accepts, with the sub-configs (eva/corda/loftq/lora_ga) exactly as PEFT
saves them, loads in deltatune (``PeftModel.from_pretrained``, ``load_adapter``) with the logits of the same A, B
on the given base, and saves back the same ``adapter_config.json``. Data-driven inits are refused only at
creation, with the reason; ``orthogonal`` is implemented and draws PEFT's factors under the same seed; fields that
change the forward (aLoRA) are refused at load with the reason (target_parameters is implemented:
tests/lora/test_target_parameters.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings

import peft
import pytest
import torch
from peft.tuners.lora.config import CordaConfig, EvaConfig, LoftQConfig, LoraGAConfig
from support.models import tiny_llama

import deltatune as dt
from deltatune.errors import ConfigError

IDS = torch.tensor([[1, 5, 7, 9, 11, 13], [2, 4, 6, 8, 10, 12]])

# init_lora_weights -> the fields PEFT saves with it (its sub-config dataclasses, as asdict writes them).
PEFT_INITS: dict[object, dict] = {
    True: {}, False: {}, "gaussian": {}, "orthogonal": {}, "pissa": {}, "pissa_niter_4": {}, "olora": {},
    "eva": {"eva_config": dataclasses.asdict(EvaConfig(rho=1.5, tau=0.95, whiten=True))},
    "corda": {"corda_config": dataclasses.asdict(CordaConfig(corda_method="kpm", cache_file="cov.pt"))},
    "loftq": {"loftq_config": dataclasses.asdict(LoftQConfig(loftq_bits=4, loftq_iter=2))},
    "lora_ga": {"lora_ga_config": dataclasses.asdict(LoraGAConfig())},
}
# PEFT's own from_pretrained leaves the base as given for these (it re-runs PiSSA/OLoRA on the base, needs
# preprocess_corda's eigens for CorDA and scipy + a quantisation for LoftQ).
PEFT_LOADS_PLAIN = (True, False, "gaussian", "orthogonal", "eva", "lora_ga")
# PiSSA/OLoRA files saved as they are: both libraries rebuild the residual base W - s B0 A0 on load (issue 18), so
# the logits are peft's (pissa_niter_N: each library's own randomised SVD draw, so close to peft's, not equal).
PEFT_REBUILDS_RESIDUAL = ("pissa", "olora", "pissa_niter_4")
# LoftQ files: both libraries rebuild the quantised base Q on load (vs peft: tests/lora/test_loftq_load.py).
REBUILDS_LOFTQ_BASE = ("loftq",)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A trained-looking LoRA (random A and B) saved by PEFT, and its logits on the base it was made on."""
    d = str(tmp_path_factory.mktemp("plain"))
    torch.manual_seed(1)
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                                 "down_proj"],
                                                              init_lora_weights=False))
    model.save_pretrained(d)
    with torch.no_grad():
        return d, model(IDS).logits


def as_peft_saved(plain_dir: str, out: str, init: object, extra: dict) -> dict:
    """``plain_dir`` with its adapter_config.json saying ``init`` (and its sub-config) as PEFT writes it."""
    os.makedirs(out)
    shutil.copy(os.path.join(plain_dir, "adapter_model.safetensors"), out)
    with open(os.path.join(plain_dir, "adapter_config.json")) as fh:
        config = json.load(fh)
    config.update(init_lora_weights=init, **extra)
    with open(os.path.join(out, "adapter_config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    return config


def same_json(a: dict, b: dict) -> None:
    """Equal configs; target_modules is a set in both libraries (its list order follows string hashing)."""
    a, b = dict(a), dict(b)
    assert set(a.pop("target_modules")) == set(b.pop("target_modules"))
    assert a == b


@pytest.mark.parametrize("init", list(PEFT_INITS), ids=str)
def test_every_peft_init_loads_with_equal_logits_and_saves_back_unchanged(plain, tmp_path, init):
    plain_dir, logits = plain
    written = as_peft_saved(plain_dir, str(tmp_path / "a"), init, PEFT_INITS[init])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA: "expects the residual base" warning
        model = dt.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
    with torch.no_grad():
        ours = model(IDS).logits
    if init in PEFT_REBUILDS_RESIDUAL:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
        with torch.no_grad():
            atol = 0.5 if init == "pissa_niter_4" else 1e-5
            torch.testing.assert_close(ours, theirs(IDS).logits, rtol=0, atol=atol)
        assert (ours - logits).abs().max() > 1e-3  # the residual was rebuilt: not the plain A, B on the given base
    elif init in REBUILDS_LOFTQ_BASE:
        assert (ours - logits).abs().max() > 1e-3  # the base is LoftQ's Q now, not the given W
    else:
        torch.testing.assert_close(ours, logits, rtol=0, atol=1e-5)
    if init in PEFT_LOADS_PLAIN:
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
        with torch.no_grad():
            torch.testing.assert_close(ours, theirs(IDS).logits, rtol=0, atol=1e-5)
    model.save_pretrained(str(tmp_path / "b"))
    with open(tmp_path / "b" / "adapter_config.json") as fh:
        same_json(json.load(fh), written)


@pytest.mark.parametrize("init", ["eva", "corda", "lora_ga", "orthogonal"])  # loftq: test_loftq_load.py
def test_load_adapter_as_second_adapter(plain, tmp_path, init):
    plain_dir, logits = plain
    as_peft_saved(plain_dir, str(tmp_path / "a"), init, PEFT_INITS[init])
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["k_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_adapter(str(tmp_path / "a"), adapter_name="other")
    model.set_adapter("other")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, logits, rtol=0, atol=1e-5)
    assert model.peft_config["other"].init_lora_weights == init  # restored after the load built it


@pytest.mark.parametrize("init", ["corda", "lora_ga"])  # LoftQ's base is rebuilt on load (test_loftq_load.py)
def test_base_rewriting_inits_warn_about_the_residual_base(plain, tmp_path, init):
    as_peft_saved(plain[0], str(tmp_path / "a"), init, PEFT_INITS[init])
    with pytest.warns(UserWarning, match="residual base"):
        dt.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))


@pytest.mark.parametrize("init", ["corda", "lora_ga"])  # created: loftq tests/lora/test_loftq.py, eva test_eva.py
def test_creating_a_data_driven_init_is_refused_with_the_reason_before_the_model_changes(init):
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ConfigError, match=rf"init_lora_weights='{init}' is computed from .*Loading .* works"):
        dt.get_peft_model(base, dt.LoraConfig(r=4, init_lora_weights=init, **PEFT_INITS[init]))
    assert list(base.state_dict()) == list(before)  # no adapter layer left behind
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_orthogonal_init_equals_peft_under_the_same_seed():
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], init_lora_weights="orthogonal")
    base_a, base_b = tiny_llama(), tiny_llama()
    torch.manual_seed(123)
    theirs = peft.get_peft_model(base_a, peft.LoraConfig(**kwargs))
    torch.manual_seed(123)
    ours = dt.get_peft_model(base_b, dt.LoraConfig(**kwargs))
    a = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    b = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    assert sorted(a) == sorted(b) and len(a) == 12
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
    assert all(v.abs().sum() > 0 for v in b.values())  # both factors non-zero ...
    with torch.no_grad():  # ... yet B A = 0: the model is unchanged
        torch.testing.assert_close(ours(IDS).logits, tiny_llama()(IDS).logits, rtol=0, atol=1e-5)


def test_orthogonal_needs_an_even_rank():
    with pytest.raises(ConfigError, match=r"^Orthogonal initialization requires the LoRA rank to be even.* r=3; use 4"):
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=3, init_lora_weights="orthogonal"))
    with pytest.raises(ConfigError, match=r"rank_pattern\['q_proj'\]=5"):
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, rank_pattern={"q_proj": 5}, init_lora_weights="orthogonal"))


@pytest.mark.parametrize("field, value, reason", [
    ("megatron_config", {"tensor_model_parallel_size": 1}, "Megatron .* not implemented"),  # aLoRA loads now
])
def test_forward_changing_fields_are_refused_at_load_with_the_reason(plain, tmp_path, field, value, reason):
    as_peft_saved(plain[0], str(tmp_path / "a"), True, {field: value})
    with pytest.raises(ConfigError, match=reason):
        dt.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))


def test_empty_target_parameters_loads(plain, tmp_path):
    as_peft_saved(plain[0], str(tmp_path / "a"), True, {"target_parameters": []})
    model = dt.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, plain[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["eva", "corda", "loftq", "lora_ga", "orthogonal"])
def test_inspect_reads_them(plain, tmp_path, capsys, init):
    from deltatune.cli import main

    as_peft_saved(plain[0], str(tmp_path / "a"), init, PEFT_INITS[init])
    assert main(["inspect", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "LORA" in out and f"init_lora_weights={init}" in out
