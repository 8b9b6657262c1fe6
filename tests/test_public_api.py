"""PEFT's model-level public API (issue 18): each behaviour checked against PEFT 0.21.2 where cheap."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from support.models import tiny_llama

import deltatune as dt

IDS = torch.tensor([[1, 5, 7, 9, 11]])


def _lora_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for n, p in model.named_parameters() if "lora_" in n}


# ---- autocast_adapter_dtype ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_matches_peft(dtype: torch.dtype, autocast: bool) -> None:
    ours = dt.get_peft_model(tiny_llama().to(dtype), dt.LoraConfig(target_modules=["q_proj"]),
                             autocast_adapter_dtype=autocast)
    theirs = peft.get_peft_model(tiny_llama().to(dtype), peft.LoraConfig(target_modules=["q_proj"]),
                                 autocast_adapter_dtype=autocast)
    expected = {torch.float32} if autocast else {dtype}
    assert _lora_dtypes(theirs) == expected
    assert _lora_dtypes(ours) == expected
    ours.add_adapter("second", dt.LoraConfig(target_modules=["v_proj"]), autocast_adapter_dtype=autocast)
    theirs.add_adapter("second", peft.LoraConfig(target_modules=["v_proj"]), autocast_adapter_dtype=autocast)
    second = {p.dtype for n, p in ours.named_parameters() if ".second." in n}
    assert second == {p.dtype for n, p in theirs.named_parameters() if ".second." in n} == expected
    assert ours(IDS).logits.dtype == dtype  # the half-precision adapter runs


def test_autocast_false_adapter_loads_in_base_dtype(tmp_path) -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), tmp_path, autocast_adapter_dtype=False)
    assert _lora_dtypes(loaded) == {torch.bfloat16}
    loaded.load_adapter(tmp_path, "again", autocast_adapter_dtype=False)
    assert {p.dtype for n, p in loaded.named_parameters() if ".again." in n} == {torch.bfloat16}
    loaded.load_adapter(tmp_path, "upcast")
    assert {p.dtype for n, p in loaded.named_parameters() if ".upcast." in n} == {torch.float32}


# ---- PEFT's warnings (PeftWarning) -------------------------------------------------------------
def test_peft_warning_is_a_user_warning() -> None:
    assert issubclass(dt.PeftWarning, UserWarning)


def _merged_weight_and_warnings(lib, merge_twice) -> tuple[torch.Tensor, list[str]]:
    model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.merge_adapter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge_twice(model)
    weight = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    return weight, sorted({str(w.message) for w in caught if "merge" in str(w.message)})


@pytest.mark.parametrize("again", ["merge_adapter", "merge_adapter_explicit"])
def test_merging_twice_warns_and_changes_nothing_as_peft(again: str) -> None:
    def twice(model) -> None:
        if again == "merge_adapter":
            model.merge_adapter()
        else:
            model.merge_adapter(["default"])

    ours, our_msgs = _merged_weight_and_warnings(dt, twice)
    theirs, their_msgs = _merged_weight_and_warnings(peft, twice)
    assert our_msgs == their_msgs == ["All adapters are already merged, nothing to do."]
    torch.testing.assert_close(ours, theirs)  # merged once, not twice


def test_merging_another_adapter_names_the_merged_ones() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"]))
    model.add_adapter("other", dt.LoraConfig(target_modules=["q_proj"]))
    model.merge_adapter()
    with pytest.warns(dt.PeftWarning, match="Already following adapters were merged default. "
                                            "You are now additionally merging other."):
        model.merge_adapter(["other"])
    with pytest.warns(dt.PeftWarning, match="All adapters are already merged"):
        model.merge_and_unload()


def test_second_get_peft_model_on_the_same_model_warns() -> None:
    base = tiny_llama()
    dt.get_peft_model(base, dt.LoraConfig(target_modules=["q_proj"]))
    with pytest.warns(dt.PeftWarning, match="modify a model with PEFT for a second time"):
        dt.get_peft_model(base, dt.LoraConfig(target_modules=["v_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", dt.PeftWarning)
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"]))  # a fresh model: silent


@pytest.mark.parametrize("attr", ["rank_pattern", "alpha_pattern"])
def test_pattern_keys_matching_nothing_warn(attr: str) -> None:
    patterns = {"q_proj": 4, "qproj_typo": 2, r"layers\.7\.self_attn\.q_proj": 2}
    with pytest.warns(dt.PeftWarning, match=rf"{attr} keys did not match any targeted module and were ignored: "
                                             r"\['layers\\\\.7\\\\.self_attn\\\\.q_proj', 'qproj_typo'\]"):
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"], **{attr: patterns}))
    with pytest.warns(RuntimeWarning, match="qproj_typo"):  # PEFT warns about the same keys
        peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], **{attr: patterns}))
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"]))
    with pytest.warns(dt.PeftWarning, match="qproj_typo"):
        model.add_adapter("b", dt.LoraConfig(target_modules=["q_proj"], **{attr: {"qproj_typo": 2}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", dt.PeftWarning)
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"], **{attr: {"q_proj": 4}}))


# ---- disable_adapter and requires_grad -----------------------------------------------------------
def _trainable(model) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("lib", [dt, peft], ids=["deltatune", "peft"])
def test_disable_adapter_freezes_adapters_inside_and_restores(lib) -> None:
    model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    before = _trainable(model)
    assert any("lora_A" in n for n in before) and any("modules_to_save" in n for n in before)
    with model.disable_adapter():
        assert _trainable(model) == []
    assert _trainable(model) == before


def test_disable_adapter_keeps_a_frozen_adapter_frozen(tmp_path) -> None:
    dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    model = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)  # inference mode: nothing trainable
    with model.disable_adapter():
        pass
    assert _trainable(model) == []


# ---- get_layer_status / get_model_status / targeted_module_names -------------------------------------
def _two_adapter_models():
    ours = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj", "v_proj"],
                                                         modules_to_save=["lm_head"]))
    ours.add_adapter("other", dt.LoraConfig(target_modules=["q_proj"]))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj", "v_proj"],
                                                               modules_to_save=["lm_head"]))
    theirs.add_adapter("other", peft.LoraConfig(target_modules=["q_proj"]))
    return ours, theirs


_LAYER_FIELDS = ("name", "enabled", "active_adapters", "merged_adapters", "requires_grad", "available_adapters",
                 "devices", "quantization_backend")
_MODEL_FIELDS = ("base_model_type", "peft_types", "trainable_params", "total_params", "num_adapter_layers", "enabled",
                 "active_adapters", "merged_adapters", "requires_grad", "available_adapters", "devices",
                 "quantization_backend")


def _same_status(ours, theirs, skip: tuple[str, ...] = ()) -> None:
    layer_fields = [f for f in _LAYER_FIELDS if f not in skip]
    model_fields = [f for f in _MODEL_FIELDS if f not in skip]
    our_layers, their_layers = ours.get_layer_status(), theirs.get_layer_status()
    assert [[getattr(s, f) for f in layer_fields] for s in our_layers] == \
        [[getattr(s, f) for f in layer_fields] for s in their_layers]
    our_model, their_model = ours.get_model_status(), theirs.get_model_status()
    assert {f: getattr(our_model, f) for f in model_fields} == {f: getattr(their_model, f) for f in model_fields}


def test_status_matches_peft_through_switch_merge_and_disable() -> None:
    ours, theirs = _two_adapter_models()
    status = ours.get_model_status()
    assert status.peft_types == {"default": "LORA", "other": "LORA"}
    assert status.num_adapter_layers == 5  # 2 q_proj + 2 v_proj + lm_head's modules_to_save wrapper
    assert status.requires_grad == {"default": True, "other": False}
    assert status.active_adapters == ["default"] and status.merged_adapters == [] and status.enabled is True
    assert status.adapter_model_type == "LoraModel"  # PEFT's tuner class name
    _same_status(ours, theirs)
    for model in (ours, theirs):
        model.set_adapter("other")
    _same_status(ours, theirs)
    for model in (ours, theirs):
        model.merge_adapter()
    assert ours.get_model_status().merged_adapters == ["other"]
    _same_status(ours, theirs)
    for model in (ours, theirs):
        model.unmerge_adapter()
    with ours.disable_adapter(), theirs.disable_adapter():
        assert ours.get_model_status().enabled is False
        _same_status(ours, theirs)


def test_status_says_irregular_for_an_inconsistent_model() -> None:
    ours, theirs = _two_adapter_models()
    for model in (ours, theirs):
        model.base_model.model.model.layers[0].self_attn.q_proj.enable_adapters(False)  # one layer by hand
        model.base_model.model.model.layers[1].self_attn.q_proj.merge()
    status = ours.get_model_status()
    assert status.enabled == "irregular" and status.merged_adapters == "irregular"
    # PEFT's layer-level enable_adapters(False) also freezes that layer's tensors; deltatune's layer call does not
    # (PeftModel.disable_adapter does, as PEFT's), so requires_grad differs after this by-hand call.
    _same_status(ours, theirs, skip=("requires_grad", "trainable_params"))


def test_targeted_module_names_match_peft() -> None:
    ours, theirs = _two_adapter_models()
    assert ours.targeted_module_names == theirs.targeted_module_names == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_status_of_a_prompt_model_is_a_clear_error() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(TypeError, match="(?s)invalid PeftModel instance.*prompt-learning adapters .* have none"):
        model.get_model_status()
    assert model.targeted_module_names == []


# ---- PeftConfig.from_json_file, load_adapter's result ---------------------------------------------------
def test_from_json_file_returns_the_dict_as_peft(tmp_path) -> None:
    dt.LoraConfig(r=4, target_modules=["q_proj"]).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = dt.PeftConfig.from_json_file(path)
    assert data == peft.PeftConfig.from_json_file(str(path))
    assert data["r"] == 4 and data["peft_type"] == "LORA"
    assert dt.PeftConfig.from_dict(data) == dt.LoraConfig(r=4, target_modules=["q_proj"])
    path.write_text('{"peft_type": "LORA", "runtime_config": {"ephemeral_gpu_offload": true}}')
    with pytest.warns(dt.PeftWarning, match="runtime_config"):
        assert dt.PeftConfig.from_json_file(path) == {"peft_type": "LORA"}
    with pytest.raises(dt.AdapterLoadError, match="does not exist"):
        dt.PeftConfig.from_json_file(tmp_path / "nope.json")


def test_load_adapter_returns_peft_load_result(tmp_path) -> None:
    dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    our_result = ours.load_adapter(tmp_path, "second")
    their_result = theirs.load_adapter(str(tmp_path), "second")
    assert our_result.missing_keys == their_result.missing_keys == []
    assert our_result.unexpected_keys == their_result.unexpected_keys == []
    missing, unexpected = our_result  # a named tuple, as torch's load_state_dict result
    assert type(our_result).__name__ == type(their_result).__name__ == "_IncompatibleKeys"


def test_status_functions_are_top_level_and_take_the_model() -> None:
    ours, _ = _two_adapter_models()
    assert dt.get_model_status(ours) == ours.get_model_status()
    assert [s.name for s in dt.get_layer_status(ours)] == [s.name for s in ours.get_layer_status()]
    assert isinstance(ours.get_layer_status()[0], dt.TunerLayerStatus)
    with pytest.raises(dt.ConfigError, match="No adapter layers found in the model"):
        dt.get_layer_status(tiny_llama())


# ---- model card, push_to_hub -------------------------------------------------------------------------
def _named_llama():
    model = tiny_llama()
    model.config._name_or_path = "org/tiny-llama"  # as if loaded from the Hub
    return model


def _card(path) -> tuple[dict, str]:
    from deltatune.model_card import split_card

    return split_card((path / "README.md").read_text())


def test_save_pretrained_writes_a_model_card_like_peft(tmp_path) -> None:
    config = dict(task_type="CAUSAL_LM", target_modules=["q_proj"])
    dt.get_peft_model(_named_llama(), dt.LoraConfig(**config)).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(_named_llama(), peft.LoraConfig(**config)).save_pretrained(tmp_path / "theirs")
    ours, body = _card(tmp_path / "ours")
    theirs, _ = _card(tmp_path / "theirs")
    for key in ("library_name", "base_model", "pipeline_tag"):
        assert ours[key] == theirs[key], key
    assert ours["library_name"] == "peft" and ours["base_model"] == "org/tiny-llama"
    # PEFT's tags, plus "deltatune" (PEFT 0.21.2 also writes an empty "base_model:adapter:", from its tuner's name)
    assert {t for t in theirs["tags"] if not t.endswith(":")} <= set(ours["tags"])
    assert "base_model:adapter:org/tiny-llama" in ours["tags"] and "deltatune" in ours["tags"]
    assert f"### Framework versions\n\n- deltatune {dt.__version__}" in body
    assert 'from_pretrained("org/tiny-llama")' in body
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours"))  # the card changes nothing else
    assert loaded.peft_config["default"].base_model_name_or_path == "org/tiny-llama"


def test_model_card_keeps_the_users_readme(tmp_path) -> None:
    (tmp_path / "README.md").write_text("---\nlicense: mit\ntags: [mine]\npipeline_tag: summarization\n---\n\n"
                                        "# My adapter\n\nHand-written notes.\n")
    model = dt.get_peft_model(_named_llama(), dt.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # a second save adds nothing twice
    meta, body = _card(tmp_path)
    assert meta["license"] == "mit" and meta["pipeline_tag"] == "summarization"  # PEFT keeps an existing pipeline tag
    assert "mine" in meta["tags"] and "lora" in meta["tags"] and meta["library_name"] == "peft"
    assert body.startswith("\n# My adapter\n\nHand-written notes.\n")
    assert body.count(f"- deltatune {dt.__version__}") == 1


def test_model_card_leaves_a_local_base_path_out_of_the_metadata(tmp_path) -> None:
    base = tiny_llama()
    base.config._name_or_path = str(tmp_path)  # a local directory: not a Hub id
    dt.get_peft_model(base, dt.LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    meta, _ = _card(tmp_path / "a")
    assert "base_model" not in meta and meta["library_name"] == "peft"


def test_model_card_of_a_plain_torch_module_names_no_base_model(tmp_path) -> None:
    """A custom module has no Hub identity: PEFT writes no ``base_model`` for it even when the config names one
    (PEFT's own tests build configs with ``base_model_name_or_path="MLP"``); neither do we."""
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4))
    for lib, out in ((dt, "ours"), (peft, "theirs")):
        model = lib.get_peft_model(mlp if lib is dt else torch.nn.Sequential(torch.nn.Linear(4, 4)),
                                   lib.LoraConfig(target_modules=["0"], base_model_name_or_path="MLP"))
        model.save_pretrained(str(tmp_path / out))
    ours, _ = _card(tmp_path / "ours")
    theirs, _ = _card(tmp_path / "theirs")
    assert "base_model" not in ours and "base_model" not in theirs and ours["library_name"] == "peft"


def test_push_to_hub_saves_and_uploads_one_folder(tmp_path, monkeypatch) -> None:
    import huggingface_hub

    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        folder = kwargs["folder_path"]
        files = sorted(p.relative_to(folder).as_posix() for p in __import__("pathlib").Path(folder).rglob("*"))
        calls.append(("upload_folder", {**kwargs, "files": files,
                                        "card": (__import__("pathlib").Path(folder) / "README.md").read_text()}))
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = dt.get_peft_model(_named_llama(), dt.LoraConfig(target_modules=["q_proj"]))
    model.add_adapter("second", dt.LoraConfig(target_modules=["v_proj"]))
    assert model.push_to_hub("me/my-adapter", private=True, tags=["chat"]) == "commit-info"
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1]["private"] is True and calls[0][1]["exist_ok"] is True
    upload = calls[1][1]
    assert upload["repo_id"] == "me/my-adapter" and upload["commit_message"] == "Upload model"
    assert upload["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors", "second",
                               "second/adapter_config.json", "second/adapter_model.safetensors"]
    assert "- chat" in upload["card"] and "library_name: peft" in upload["card"]


def test_push_to_hub_offline_is_one_clear_error(monkeypatch) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(dt.ConfigError, match="huggingface_hub is offline .HF_HUB_OFFLINE=1.; unset it"):
        model.push_to_hub("me/my-adapter")


def test_model_card_leaves_a_non_utf8_readme_alone(tmp_path) -> None:
    (tmp_path / "README.md").write_bytes(b"caf\xe9 notes in latin-1\n")
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"]))
    with pytest.warns(dt.PeftWarning, match="not UTF-8; the model card was not updated"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_bytes() == b"caf\xe9 notes in latin-1\n"
    assert (tmp_path / "adapter_model.safetensors").exists()
