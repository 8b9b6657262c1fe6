"""PeftMixedModel: adapters of different methods on one model, checked against PEFT 0.21.2's mixed model."""

from __future__ import annotations

import peft
import pytest
import torch
from support.models import tiny_llama

import deltatune as dt

IDS = torch.tensor([[1, 5, 7, 9, 11], [3, 4, 8, 2, 6]])


def _build(lib):
    model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False), mixed=True)
    model.add_adapter("loha", lib.LoHaConfig(target_modules=["q_proj", "o_proj"], init_weights=False))
    model.add_adapter("lokr", lib.LoKrConfig(target_modules=["q_proj", "v_proj"], init_weights=False))
    return model


def _unchained(key: str) -> str:
    """A key without the chain steps, which differ: PEFT wraps the newest method outermost, deltatune innermost."""
    return ".".join(p for p in key.split(".") if p != "base_layer")


@pytest.fixture
def pair():
    ours, theirs = _build(dt), _build(peft)
    their_state = {_unchained(k): v for k, v in theirs.state_dict().items()}
    with torch.no_grad():
        for key, value in ours.state_dict().items():
            value.copy_(their_state[_unchained(key)])  # the same adapter tensors in both
    return ours.eval(), theirs.eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("active", [["default"], ["loha"], ["default", "loha"], ["default", "loha", "lokr"]])
def test_mixed_adapters_active_together_match_peft(pair, active) -> None:
    ours, theirs = pair
    assert isinstance(ours, dt.PeftMixedModel) and type(theirs).__name__ == "PeftMixedModel"
    for model in (ours, theirs):
        model.set_adapter(active)
    assert ours.active_adapters == active
    base = _logits(tiny_llama())
    torch.testing.assert_close(_logits(ours), _logits(theirs))
    assert (_logits(ours) - base).abs().max() > 1e-3  # the adapters do something
    with ours.disable_adapter():
        torch.testing.assert_close(_logits(ours), base)


def test_mixed_merge_and_unload_matches_peft(pair) -> None:
    ours, theirs = pair
    for model in (ours, theirs):
        model.set_adapter(["default", "loha", "lokr"])
    expected = _logits(theirs)
    ours.merge_adapter()
    torch.testing.assert_close(_logits(ours), expected)
    ours.unmerge_adapter()
    torch.testing.assert_close(_logits(ours), expected)
    merged = ours.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert not any("lora_" in k or "hada_" in k or "lokr_" in k for k in merged.state_dict())
    torch.testing.assert_close(_logits(merged), _logits(theirs.merge_and_unload()))


def test_mixed_trainability_follows_the_active_set() -> None:
    model = _build(dt)
    model.set_adapter(["default", "loha"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_A.default." in n for n in trainable) and any("hada_w1_a.loha" in n for n in trainable)
    assert not any(".lokr" in n for n in trainable) and all("_proj.weight" not in n for n in trainable)
    assert model.get_model_status().peft_types == {"default": "LORA", "loha": "LOHA", "lokr": "LOKR"}


def test_mixed_adapters_save_as_plain_adapters_and_load_back(pair, tmp_path) -> None:
    ours, theirs = pair
    for model in (ours, theirs):
        model.set_adapter(["default", "loha", "lokr"])
    ours.save_pretrained(tmp_path)  # PEFT 0.21.2 cannot save a mixed model
    back = dt.PeftMixedModel.from_pretrained(tiny_llama(), tmp_path)
    back.load_adapter(tmp_path / "loha", "loha")
    back.load_adapter(tmp_path / "lokr", "lokr")
    back.set_adapter(["default", "loha", "lokr"])
    torch.testing.assert_close(_logits(back), _logits(theirs))
    # Each directory is an ordinary adapter: PEFT reads the LoHa one alone.
    alone = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "loha")).eval()
    ours.set_adapter("loha")
    torch.testing.assert_close(_logits(alone), _logits(ours))


def test_mixed_with_oft_and_adalora_merges_consistently() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.OFTConfig(target_modules=["q_proj"], r=0, oft_block_size=8,
                                                         init_weights=False), mixed=True)
    model.add_adapter("lora", dt.LoraConfig(target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    model.add_adapter("ada", dt.AdaLoraConfig(target_modules=["q_proj"], init_r=4, target_r=2, total_step=10))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.ada" in name:
                p.normal_()  # AdaLoRA starts at zero; give it an update to merge
    model.set_adapter(["default", "lora", "ada"])
    model.eval()
    expected = _logits(model)
    assert (expected - _logits(tiny_llama())).abs().max() > 1e-3
    torch.testing.assert_close(_logits(model.merge_and_unload()), expected, atol=1e-5, rtol=1e-4)


def test_mixed_refuses_what_it_cannot_hold() -> None:
    with pytest.raises(dt.ConfigError, match="^The provided `peft_type` 'IA3' is not compatible with the "
                                             "`PeftMixedModel`. A mixed model .* holds "
                                             "LORA, ADALORA, OFT, LOHA, LOKR, SHIRA"):
        dt.get_peft_model(tiny_llama(), dt.IA3Config(target_modules=["q_proj"]), mixed=True)
    model = _build(dt)
    with pytest.raises(dt.ConfigError, match="'PROMPT_TUNING' is not compatible"):
        model.add_adapter("p", dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(dt.ConfigError, match="DoRA"):
        model.add_adapter("d", dt.LoraConfig(target_modules=["q_proj"], use_dora=True))
    assert sorted(model.peft_config) == ["default", "loha", "lokr"]  # nothing half-added


def test_mixed_lora_and_adalora_on_one_layer_save_and_load(tmp_path) -> None:
    """Both methods name their tensors lora_A/lora_B: loading must find each method's own layer in the chain."""
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"], init_lora_weights=False),
                              mixed=True)
    model.add_adapter("ada", dt.AdaLoraConfig(target_modules=["q_proj"], init_r=4, target_r=2, total_step=10))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.ada" in name:
                p.normal_()
    model.set_adapter(["default", "ada"])
    model.eval()
    model.save_pretrained(tmp_path)
    back = dt.PeftMixedModel.from_pretrained(tiny_llama(), tmp_path)
    back.load_adapter(tmp_path / "ada", "ada")
    back.set_adapter(["default", "ada"])
    torch.testing.assert_close(_logits(back), _logits(model))


def test_mixed_shira_with_lora_matches_peft() -> None:
    """SHiRA's sparse update shares layers with LoRA (PEFT's mixed model holds SHiRA too, added first: its SHiRA
    layer refuses to wrap another adapter layer; deltatune's chains take either order)."""

    def build(lib, lora_first: bool = False):
        shira = lib.ShiraConfig(target_modules=["q_proj", "o_proj"], r=2, random_seed=0)
        lora = lib.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        first, second = (lora, shira) if lora_first else (shira, lora)
        model = lib.get_peft_model(tiny_llama(), first, mixed=True)
        model.add_adapter("other", second)
        return model

    theirs = build(peft)
    with torch.no_grad():
        for key, value in theirs.state_dict().items():
            if "shira_weight" in key:
                value.normal_(std=0.5)  # SHiRA starts at zero; give it an update
    their_state = {_unchained(k): v for k, v in theirs.state_dict().items()}
    theirs.set_adapter(["default", "other"])
    expected = _logits(theirs.eval())
    assert (expected - _logits(tiny_llama())).abs().max() > 1e-3
    for lora_first in (False, True):
        ours = build(dt, lora_first)
        renamed = {"default": "other", "other": "default"} if lora_first else {}
        with torch.no_grad():
            for key, value in ours.state_dict().items():
                if "shira_indices" not in key:  # PEFT keeps the positions outside its state dict (same seed here)
                    value.copy_(their_state[".".join(renamed.get(p, p) for p in _unchained(key).split("."))])
        ours.set_adapter(["default", "other"])
        torch.testing.assert_close(_logits(ours.eval()), expected)
        torch.testing.assert_close(_logits(ours.merge_and_unload()), expected, atol=1e-5, rtol=1e-4)
