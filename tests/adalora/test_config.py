"""AdaLoraConfig: PEFT's fields and defaults, the file round trip, and clear errors for bad input."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from adalora_helpers import adalora_model, branches

import deltatune as dt
from deltatune.errors import ConfigError

PEFT_DEFAULTS = dict(target_r=8, init_r=12, tinit=0, tfinal=0, deltaT=1, beta1=0.85, beta2=0.85,
                     orth_reg_weight=0.5, total_step=None, rank_pattern=None)


def test_fields_and_defaults_match_peft():
    ours = dt.AdaLoraConfig(total_step=100, target_modules=["q_proj"]).to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.AdaLoraConfig(total_step=100, target_modules=["q_proj"]).to_dict()
    assert set(ours) == set(theirs)  # peft_version too: deltatune records the PEFT format it writes
    for key in ours:
        value = theirs[key]
        value = sorted(value) if isinstance(value, set) else value
        assert ours[key] == (value.value if hasattr(value, "value") else value), key
    assert ours["peft_type"] == "ADALORA"
    for key, default in PEFT_DEFAULTS.items():
        if key != "total_step":
            assert ours[key] == default, key


def test_file_round_trip_with_a_rank_pattern(tmp_path):
    config = dt.AdaLoraConfig(total_step=10, init_r=3, target_r=1,
                              rank_pattern={"model.layers.0.q_proj.lora_E": [True, False, True]})
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["rank_pattern"] == {"model.layers.0.q_proj.lora_E": [True, False, True]}
    loaded = dt.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, dt.AdaLoraConfig)
    assert loaded.to_dict() == config.to_dict()


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "`total_step` is None.*number of optimizer steps you will train"),
    (dict(total_step=0), "supply a value > 0. .*total_step must be a positive integer"),
    (dict(total_step=-5), "total_step must be a positive integer"),
    (dict(total_step=10.5), "total_step must be a positive integer"),
    (dict(total_step=100, init_r=4, target_r=8), "target_r=8 is larger than init_r=4"),
    (dict(total_step=100, tinit=60, tfinal=40), "budgeting phase.*tinit=60 \\+ tfinal=40 >= total_step=100"),
    (dict(total_step=100, tinit=99, tfinal=5), "don't allow for a budgeting phase"),
    (dict(total_step=100, init_r=0), "init_r must be a positive integer"),
    (dict(total_step=100, deltaT=0), "deltaT must be a positive integer"),
    (dict(total_step=100, beta1=1.0), "beta1 must lie strictly between 0 and 1"),
    (dict(total_step=100, beta2=0.0), "beta2 must lie strictly between 0 and 1"),
    (dict(total_step=100, orth_reg_weight=-0.1), "`orth_reg_weight` should be greater than or equal to 0"),
    (dict(total_step=100, tinit=-1), "tinit must be an integer >= 0"),
    (dict(total_step=100, use_dora=True), "does not support DoRA.*use_dora=False"),
    (dict(total_step=100, init_lora_weights="pissa"), "init_lora_weights"),
    (dict(total_step=100, rank_pattern={"a.lora_E": [2, 3]}), "list of booleans"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        dt.AdaLoraConfig(**kwargs)


def test_r_is_not_used_and_says_so():
    # PEFT's text (filters written for PEFT's warning catch it), naming the fix
    with pytest.warns(UserWarning, match=r"^Note that `r` is not used in AdaLora and will be ignored\..*use `init_r`"):
        dt.AdaLoraConfig(total_step=10, r=4)


def test_second_trainable_adapter_is_refused():
    model = adalora_model()
    with pytest.raises(ConfigError, match="AdaLoraModel supports only 1 trainable adapter.*inference_mode=True"):
        model.add_adapter("other", dt.AdaLoraConfig(total_step=15, target_modules=["branch.0"]))
    assert list(model.peft_config) == ["default"]  # nothing half-added
    assert not any("other" in n for n, _ in model.named_parameters())
    # a frozen second adapter is fine
    model.add_adapter("frozen", dt.AdaLoraConfig(total_step=15, target_modules=["branch.0"], inference_mode=True))
    assert sorted(model.peft_config) == ["default", "frozen"]


def test_rank_pattern_that_does_not_fit_init_r_is_refused():
    config = dt.AdaLoraConfig(total_step=10, init_r=4, target_r=2, target_modules=["branch.0"],
                              rank_pattern={"branch.0.lora_E": [True, False]})
    with pytest.raises(ConfigError, match="2 flags but init_r=4"):
        dt.get_peft_model(branches(), config)


def test_unsupported_layer_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4))
    with pytest.raises(dt.TargetModuleError, match="unsupported type"):
        dt.get_peft_model(model, dt.AdaLoraConfig(total_step=10, target_modules=["0"]))
