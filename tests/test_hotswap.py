"""Hot-swapping LoRA adapters (issue 19 item 5): ``hotswap_adapter`` writes another adapter's tensors into the
loaded one in place; after ``prepare_model_for_compiled_hotswap`` a ``torch.compile``'d model runs it without
recompiling and returns what a fresh load returns. Files written by PEFT swap in too.

Compilation uses the ``eager`` backend (TorchDynamo's capture and guards, no code generation): recompilations are
counted by ``CompileCounterWithBackend``, whose ``frame_count`` grows by one per frame (re)compiled.
"""

from __future__ import annotations

import peft
import pytest
import torch
from support.models import tiny_llama
from torch._dynamo.testing import CompileCounterWithBackend

import deltatune as dt
from deltatune.hotswap import HotswapError

IDS = torch.tensor([[1, 5, 7, 9, 11, 13], [2, 4, 6, 8, 10, 12]])


def _save(lib, path, seed: int, **kwargs) -> str:
    torch.manual_seed(seed)
    kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(init_lora_weights=False, **kwargs))
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hotswap")
    return {
        "a": _save(dt, root / "a", 1, r=4, lora_alpha=8),
        "b_peft": _save(peft, root / "b_peft", 2, r=6, lora_alpha=3),  # written by PEFT, other rank and alpha
        "big": _save(dt, root / "big", 3, r=12, lora_alpha=12),
        "other": _save(dt, root / "other", 4, r=4, lora_alpha=8, target_modules=["k_proj", "v_proj"]),
        "q_only": _save(dt, root / "q_only", 5, r=2, lora_alpha=4, target_modules=["q_proj"]),
        "dora": _save(dt, root / "dora", 6, r=4, lora_alpha=8, use_dora=True),
        "pattern": _save(dt, root / "pattern", 7, r=4, lora_alpha=8, rank_pattern={"v_proj": 8}),
        "alpha": _save(dt, root / "alpha", 8, r=4, lora_alpha=16),
    }


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _fresh(path: str) -> torch.Tensor:
    return _logits(dt.PeftModel.from_pretrained(tiny_llama(), path))


def test_compiled_hotswap_does_not_recompile_and_equals_a_fresh_load(dirs):
    torch._dynamo.reset()
    model = dt.PeftModel.from_pretrained(tiny_llama(), dirs["a"])
    before = _logits(model)
    dt.prepare_model_for_compiled_hotswap(model, target_rank=8)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape == (8, 32)
    torch.testing.assert_close(_logits(model), before, atol=1e-6, rtol=0)  # zero padding changes nothing
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter)
    torch.testing.assert_close(_logits(compiled), before, atol=1e-6, rtol=0)
    frames = counter.frame_count
    assert frames > 0

    dt.hotswap_adapter(compiled, dirs["b_peft"], adapter_name="default")  # rank 6 < 8, alpha 3 instead of 8
    swapped = _logits(compiled)
    assert counter.frame_count == frames  # no recompilation
    expected = _fresh(dirs["b_peft"])
    assert (expected - before).abs().max() > 1e-3  # the second adapter really differs
    torch.testing.assert_close(swapped, expected, atol=1e-5, rtol=1e-5)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), dirs["b_peft"])
    torch.testing.assert_close(swapped, _logits(theirs), atol=1e-5, rtol=1e-5)

    dt.hotswap_adapter(compiled, dirs["a"], adapter_name="default")  # and back
    torch.testing.assert_close(_logits(compiled), before, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == frames


def test_without_prepare_a_new_alpha_recompiles(dirs):
    """The control for the test above: the counter does see the recompilation a float scaling causes."""
    torch._dynamo.reset()
    model = dt.PeftModel.from_pretrained(tiny_llama(), dirs["a"])
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter)
    _logits(compiled)
    frames = counter.frame_count
    dt.hotswap_adapter(compiled, dirs["alpha"], adapter_name="default")  # same r=4, alpha 16 instead of 8
    torch.testing.assert_close(_logits(compiled), _fresh(dirs["alpha"]), atol=1e-5, rtol=1e-5)
    assert counter.frame_count > frames


def test_hotswap_rank_pattern_and_fewer_targets_equal_a_fresh_load(dirs):
    model = dt.PeftModel.from_pretrained(tiny_llama(), dirs["a"])
    dt.prepare_model_for_compiled_hotswap(model, target_rank=8)
    dt.hotswap_adapter(model, dirs["pattern"], "default")  # v_proj at rank 8 (= target), q_proj at 4
    torch.testing.assert_close(_logits(model), _fresh(dirs["pattern"]), atol=1e-5, rtol=1e-5)
    dt.hotswap_adapter(model, dirs["q_only"], "default")  # v_proj's factors are zeroed
    torch.testing.assert_close(_logits(model), _fresh(dirs["q_only"]), atol=1e-5, rtol=1e-5)
    v = model.base_model.model.model.layers[0].self_attn.v_proj
    assert v.lora_B["default"].weight.abs().sum() == 0


def test_unprepared_uncompiled_model_takes_a_larger_rank(dirs):
    model = dt.PeftModel.from_pretrained(tiny_llama(), dirs["a"])
    dt.hotswap_adapter(model, dirs["big"], "default")
    torch.testing.assert_close(_logits(model), _fresh(dirs["big"]), atol=1e-5, rtol=1e-5)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.r["default"] == 12 and q.lora_A["default"].out_features == 12


def test_rank_above_target_rank_is_refused_and_changes_nothing(dirs):
    model = dt.PeftModel.from_pretrained(tiny_llama(), dirs["a"])
    dt.prepare_model_for_compiled_hotswap(model, target_rank=8)
    before = _logits(model)
    with pytest.raises(HotswapError, match=r"q_proj: the new adapter's rank 12 is above the loaded \(prepared\) "
                                           r"rank 8.*target_rank"):
        dt.hotswap_adapter(model, dirs["big"], "default")
    torch.testing.assert_close(_logits(model), before, atol=0, rtol=0)


def test_other_target_modules_are_refused_and_change_nothing(dirs):
    model = dt.PeftModel.from_pretrained(tiny_llama(), dirs["a"])
    before = _logits(model)
    with pytest.raises(HotswapError, match=r"targets modules the loaded adapter 'default' does not: .*k_proj"):
        dt.hotswap_adapter(model, dirs["other"], "default")
    torch.testing.assert_close(_logits(model), before, atol=0, rtol=0)


def test_incompatible_config_merged_adapter_and_bad_arguments_are_refused(dirs):
    model = dt.PeftModel.from_pretrained(tiny_llama(), dirs["a"])
    with pytest.raises(HotswapError, match="differ in use_dora"):
        dt.hotswap_adapter(model, dirs["dora"], "default")
    with pytest.raises(dt.AdapterNameError, match="no adapter named 'nope'"):
        dt.hotswap_adapter(model, dirs["b_peft"], "nope")
    with pytest.raises(dt.ConfigError, match="above target_rank=2"):
        dt.prepare_model_for_compiled_hotswap(model, target_rank=2)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.r["default"] == 4  # unchanged
    with pytest.raises(dt.ConfigError, match="check_compiled"):
        dt.prepare_model_for_compiled_hotswap(model, check_compiled="maybe")
    with pytest.raises(dt.ConfigError, match=r"^No adapter layers found on the model.*No LoRA layers: call it"):
        dt.prepare_model_for_compiled_hotswap(tiny_llama())
    with pytest.raises(dt.ConfigError, match="before torch.compile"):
        dt.prepare_model_for_compiled_hotswap(torch.compile(model, backend="eager"))
    model.merge_adapter()
    with pytest.raises(HotswapError, match="merged into the base weights; call unmerge_adapter"):
        dt.hotswap_adapter(model, dirs["b_peft"], "default")


def test_prepare_updates_the_given_config_as_peft():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj"]))
    config = dt.LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 2})
    dt.prepare_model_for_compiled_hotswap(model, target_rank=16, config=config)
    assert config.r == 16 and config.rank_pattern == {"q_proj": 16}
    assert model.peft_config["default"].r == 4  # the model's own config is left alone, as PEFT leaves it
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"], torch.Tensor)


def test_target_parameters_hotswap_same_rank_and_other_rank_refused(tmp_path):
    from lora.test_target_parameters import EXPERTS, tiny_qwen3_moe

    def save(name, seed, r):
        torch.manual_seed(seed)
        model = dt.get_peft_model(tiny_qwen3_moe(), dt.LoraConfig(r=r, lora_alpha=2 * seed, target_parameters=EXPERTS,
                                                                  init_lora_weights=False))
        model.save_pretrained(str(tmp_path / name))
        return str(tmp_path / name)

    first, second, wider = save("a", 1, 2), save("b", 2, 2), save("c", 3, 4)
    model = dt.PeftModel.from_pretrained(tiny_qwen3_moe(), first)
    dt.hotswap_adapter(model, second, "default")
    expected = _logits(dt.PeftModel.from_pretrained(tiny_qwen3_moe(), second))
    torch.testing.assert_close(_logits(model), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(HotswapError, match="ranks differ on a LoraParam"):
        dt.hotswap_adapter(model, wider, "default")
    torch.testing.assert_close(_logits(model), expected, atol=0, rtol=0)
