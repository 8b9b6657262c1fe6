"""PEFT's model-level public API (issue 18): each behaviour checked against PEFT 0.21.2 where cheap."""

from __future__ import annotations

import peft
import pytest
import torch
from helpers import tiny_llama

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
