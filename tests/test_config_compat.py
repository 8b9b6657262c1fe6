"""Config loading as PEFT 0.21.2 does it, checked against real ``peft`` on the same files: unknown keys (a newer
PEFT's fields) dropped with one warning of PEFT's text, a JSON without ``peft_type`` refused with a ``TypeError``,
``peft_version`` recorded, PEFT's task-type message, ``from_pretrained``'s keyword arguments, and PEFT's names for
deltatune's errors, helpers and ``peft.utils``."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch

import deltatune as dt
from deltatune.errors import AdapterLoadError, ConfigKeysError

CASES = [("LoraConfig", {"r": 4, "target_modules": ["q"]}), ("IA3Config", {}), ("OFTConfig", {}),
         ("AdaLoraConfig", {"total_step": 10}), ("PromptTuningConfig", {"num_virtual_tokens": 3})]
PEFT_SENTENCE = "Unexpected keyword arguments ['foobar', 'spam'] for class {}, these are ignored."


def _write(directory, data: dict) -> None:
    with open(directory / "adapter_config.json", "w") as fh:
        json.dump(data, fh, default=sorted)  # PEFT's to_dict keeps sets (its save_pretrained lists them)


def _load_recording(load):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load()
    return config, [str(w.message) for w in caught]


@pytest.mark.parametrize("name, kwargs", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("via_base", [False, True], ids=["own_class", "PeftConfig"])
def test_unknown_keys_are_dropped_with_one_peft_warning(tmp_path, name, kwargs, via_base):
    ours_cls, their_cls = getattr(dt, name), getattr(peft, name)
    (tmp_path / "dt").mkdir()
    (tmp_path / "peft").mkdir()
    original = ours_cls(**kwargs)
    data = {**original.to_dict(), "foobar": "baz", "spam": 123}
    _write(tmp_path / "dt", data)
    _write(tmp_path / "peft", {**their_cls(**kwargs).to_dict(), "foobar": "baz", "spam": 123})

    loader = dt.PeftConfig if via_base else ours_cls
    ours, our_msgs = _load_recording(lambda: loader.from_pretrained(tmp_path / "dt"))
    their_loader = peft.PeftConfig if via_base else their_cls
    theirs, their_msgs = _load_recording(lambda: their_loader.from_pretrained(str(tmp_path / "peft")))

    sentence = PEFT_SENTENCE.format(name)
    assert len(our_msgs) == len(their_msgs) == 1
    assert our_msgs[0].startswith(sentence) and their_msgs[0].startswith(sentence)
    assert type(ours) is ours_cls
    assert "foobar" not in ours.to_dict() and "spam" not in ours.to_dict()
    assert ours.to_dict() == original.to_dict() and ours == original
    # and what a re-save writes is what PEFT keeps: the same keys
    assert set(ours.to_dict()) == set(theirs.to_dict()) - {"runtime_config"}


NOT_OFT = [c for c in CASES if c[0] != "OFTConfig"]  # PEFT's OFT refuses any file without oft_block_size first


@pytest.mark.parametrize("name, kwargs", NOT_OFT, ids=[c[0] for c in NOT_OFT])
def test_json_without_peft_type_is_a_type_error_as_in_peft(tmp_path, name, kwargs):
    _write(tmp_path, {"foo": "bar", "baz": 123})
    start = f"The {name} config that is trying to be loaded is missing required keys: {{'peft_type'}}."
    with pytest.raises(TypeError) as theirs:
        getattr(peft, name).from_pretrained(str(tmp_path))
    with pytest.raises(TypeError) as ours:
        getattr(dt, name).from_pretrained(tmp_path)
    assert str(theirs.value).startswith(start) and str(ours.value).startswith(start)
    # still deltatune's load error (a ValueError) for code written against deltatune
    assert isinstance(ours.value, ConfigKeysError) and isinstance(ours.value, AdapterLoadError)
    assert isinstance(ours.value, ValueError)
    with pytest.raises(TypeError, match=r"The PeftConfig config .* missing required keys"):
        dt.PeftConfig.from_pretrained(tmp_path)


def test_empty_config_is_refused_and_bare_fields_are_not_an_adapter(tmp_path):
    _write(tmp_path, {})
    with pytest.raises(ConfigKeysError, match="is empty: it names no peft_type"):
        dt.PeftConfig.from_pretrained(tmp_path)
    _write(tmp_path, {"inference_mode": True})
    with pytest.raises(AdapterLoadError, match="names no peft_type"):
        dt.PeftConfig.from_pretrained(tmp_path)


def test_peft_version_is_recorded_like_peft_and_kept_from_files(tmp_path):
    ours, theirs = dt.LoraConfig(r=4), peft.LoraConfig(r=4)
    assert ours.peft_version == theirs.peft_version == dt.config.PEFT_FORMAT_VERSION == peft.__version__
    assert set(ours.to_dict()) == set(theirs.to_dict()) - {"runtime_config"}
    _write(tmp_path, {**theirs.to_dict(), "peft_version": "0.17.0", "runtime_config": None})
    loaded = dt.PeftConfig.from_pretrained(tmp_path)
    assert loaded.peft_version == "0.17.0"
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["peft_version"] == "0.17.0"


def test_peft_reads_a_deltatune_cayley_oft_config_as_current(tmp_path):
    """PEFT warns "retrain" for OFT Cayley-Neumann files older than 0.18 (no peft_version counts as older): a
    deltatune file records the format it follows, so PEFT loads it silently."""
    dt.OFTConfig(target_modules=["q"], oft_block_size=4, r=0, use_cayley_neumann=True).save_pretrained(tmp_path)
    config, messages = _load_recording(lambda: peft.OFTConfig.from_pretrained(str(tmp_path)))
    assert config.use_cayley_neumann and not [m for m in messages if "cayley" in m.lower()]
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    del data["peft_version"]
    _write(tmp_path, data)
    _, messages = _load_recording(lambda: peft.OFTConfig.from_pretrained(str(tmp_path)))
    assert [m for m in messages if "cayley" in m.lower()]  # the check this record satisfies is real


def test_invalid_task_type_message_is_peft_s():
    with pytest.raises(ValueError) as theirs:
        peft.LoraConfig(task_type="not-a-task")
    with pytest.raises(ValueError) as ours:
        dt.LoraConfig(task_type="not-a-task")
    assert str(ours.value).startswith("Invalid task type: 'not-a-task'. Must be one of the following task types: ")
    assert str(theirs.value).startswith("Invalid task type: 'not-a-task'.")


def test_from_pretrained_keywords_as_peft(tmp_path):
    """Download options are not config fields; a field given here fills in a key the file lacks, the file wins."""
    _write(tmp_path, {"peft_type": "LORA", "r": 4, "target_modules": ["q"]})
    kwargs = {"r": 16, "lora_alpha": 32, "revision": "v2", "cache_dir": str(tmp_path / "cache")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.LoraConfig.from_pretrained(str(tmp_path), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unexpected to warn about
        ours = dt.LoraConfig.from_pretrained(tmp_path, **kwargs)
    assert (ours.r, ours.lora_alpha, ours.revision) == (theirs.r, theirs.lora_alpha, theirs.revision) == (4, 32, None)


def test_from_peft_type_and_get_peft_config_pick_the_class():
    for peft_type, cls in [("LORA", dt.LoraConfig), ("IA3", dt.IA3Config), ("PREFIX_TUNING", dt.PrefixTuningConfig)]:
        assert type(dt.PeftConfig.from_peft_type(peft_type=peft_type)) is cls
        assert type(peft.PeftConfig.from_peft_type(peft_type=peft_type)).__name__ == cls.__name__
    config = dt.get_peft_config({"peft_type": "LORA", "r": 6, "target_modules": ["q"]})
    assert isinstance(config, dt.LoraConfig) and config.r == 6


def test_peft_error_names_catch_deltatune_errors():
    assert issubclass(dt.TargetModuleError, dt.PeftError)
    assert dt.NoMatchingPeftModuleError is dt.TargetModuleError and issubclass(dt.NoMatchingPeftModuleError, ValueError)
    for cls in (dt.ConfigError, dt.AdapterLoadError, dt.MergeError):
        assert issubclass(cls, dt.PeftError)


def test_helpers_match_peft():
    labels = torch.tensor([[5, 6, -100, 7], [1, -100, -100, -100]])
    torch.testing.assert_close(dt.shift_tokens_right(labels, 0, 2), peft.shift_tokens_right(labels, 0, 2))
    with pytest.raises(ValueError):
        dt.shift_tokens_right(labels, None, 2)

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))

    ours, theirs = model(), model()
    for m in (ours, theirs):
        m[0].weight.requires_grad_(False)
    dt.cast_mixed_precision_params(ours, torch.bfloat16)
    peft.cast_mixed_precision_params(theirs, torch.bfloat16)
    assert [(p.dtype, p.requires_grad) for p in ours.parameters()] == \
           [(p.dtype, p.requires_grad) for p in theirs.parameters()]
    assert ours[0].weight.dtype == torch.bfloat16 and ours[1].weight.dtype == torch.float32


def test_prompt_names_are_exported():
    assert dt.PromptTuningInit.TEXT.value == peft.PromptTuningInit.TEXT.value
    assert dt.PromptEncoderReparameterizationType.MLP.value == peft.PromptEncoderReparameterizationType.MLP.value
    assert {m.value for m in dt.MultitaskPromptTuningInit} <= {m.value for m in peft.MultitaskPromptTuningInit}
    config = dt.PromptTuningConfig(num_virtual_tokens=3, token_dim=8, num_transformer_submodules=1)
    embedding = dt.PromptEmbedding(config, torch.nn.Embedding(10, 8))
    assert embedding().shape == (3, 8)  # deltatune's encoders return the whole table (PEFT's take indices)
    assert dt.PromptEncoder is dt.prompt.PromptEncoder and dt.PrefixEncoder is dt.prompt.PrefixEncoder


def test_utils_module_has_peft_utils_names():
    from deltatune import utils

    used = ["get_peft_model_state_dict", "set_peft_model_state_dict", "ModulesToSaveWrapper", "infer_device",
            "INCLUDE_LINEAR_LAYERS_SHORTHAND", "SAFETENSORS_WEIGHTS_NAME", "WEIGHTS_NAME", "CONFIG_NAME",
            "TrainableTokensWrapper", "AuxiliaryTrainingWrapper", "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"]
    import peft.utils as their_utils

    for name in used:
        assert hasattr(their_utils, name) and hasattr(utils, name), name
    for name in ["INCLUDE_LINEAR_LAYERS_SHORTHAND", "SAFETENSORS_WEIGHTS_NAME", "WEIGHTS_NAME", "CONFIG_NAME"]:
        assert getattr(utils, name) == getattr(their_utils, name), name
    assert utils.infer_device() == their_utils.infer_device()
    assert utils.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["llama"] == \
        their_utils.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["llama"]
