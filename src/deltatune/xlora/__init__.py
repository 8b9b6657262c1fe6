"""X-LoRA: a learned per-token mixture of frozen LoRA experts (the registry entry; see :mod:`.model`)."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from deltatune.config import PeftType
from deltatune.core.io import save_adapter_files
from deltatune.core.state_dict import adapter_state_dict
from deltatune.lora import LORA
from deltatune.registry import Hooks, Method
from deltatune.xlora.classifier import XLoraClassifier
from deltatune.xlora.config import XLoraConfig
from deltatune.xlora.layer import XLoraGate
from deltatune.xlora.model import XLoraModel
from deltatune.xlora.tuner import XLoraTuner


def _inspect_targets(config: dict[str, Any]) -> str:
    """``deltatune inspect``'s targets line: what the file holds instead of layers, and where the experts are."""
    experts = config.get("adapters") or {}
    where = ", ".join(f"{k}: {v}" for k, v in experts.items())
    return (f"no layer of its own (and no virtual tokens): a classifier weighing {len(experts)} LoRA experts per "
            f"token, loaded from their folders ({where})")


def _inspect_size(config: dict[str, Any], shapes: dict[str, list[int]]) -> str:
    depth, size = config.get("xlora_depth", 1), config.get("xlora_size")
    width = f", width {size}" if depth > 1 else ""
    return f"{len(config.get('adapters') or {})} experts; classifier depth {depth}{width}"


def _save_experts(peft_model: nn.Module, adapter_name: str, adapter_dir: str, safe_serialization: bool) -> None:
    """Each expert of ``adapter_name`` as a LoRA adapter folder ``<adapter_dir>/<i>`` (PEFT's layout: it files its
    experts as the adapters ``"0"``, ``"1"``, ...). Loading reads the experts from ``adapters``, as PEFT does for a
    local directory; these copies keep what ``use_trainable_adapters`` trained, and make the folder portable (point
    ``adapters`` at them)."""
    xlora = peft_model.base_model
    lora = xlora.lora_model
    for index, name in enumerate(xlora.experts[adapter_name]):
        state = {f"base_model.{k}": v for k, v in
                 adapter_state_dict(lora, name, LORA.containers, "none", LORA.file_suffixes).items()}
        data = lora.peft_config[name].to_dict()
        data["inference_mode"] = True
        expert_dir = os.path.join(adapter_dir, str(index))
        os.makedirs(expert_dir, exist_ok=True)
        save_adapter_files(expert_dir, state, data, safe_serialization=safe_serialization)


_CLI_REFUSAL = ("X-LoRA mixes LoRA experts that are already trained, and a recipe cannot name them. Train each expert "
                "with `deltatune train --method lora`, then build the mixture in Python: get_peft_model(model, "
                "XLoraConfig(hidden_size=<the model's>, adapters={'0': '<run>/adapter', '1': ...})) and train its "
                "classifier with deltatune.integrations.transformers.AdapterTrainer or your own loop")

# The classifier weighs the experts of one adapter from a first pass over the whole model: no per-row adapters.
_SERVE_REFUSAL = ("its classifier runs the model a first time to weigh the LoRA experts of one adapter, so its rows "
                  "cannot share a batch with other adapters' (no adapter_names); use `deltatune generate --adapter` "
                  "for it, or serve its experts as LoRA adapters")

XLORA = Method(
    peft_type=PeftType.XLORA,
    config_cls=XLoraConfig,
    # What trains (the classifier; the experts too with use_trainable_adapters). No layer class of its own: its
    # layers are LoRA's (the experts), so PeftModel delegates to X-LoRA's tuner (the peft_tuner hook) instead.
    prefix="internal_xlora_classifier",
    mergeable=False,  # the experts' weights depend on the input
    hooks=Hooks(peft_tuner=XLoraTuner, peft_table_cls=XLoraModel, cli_refusal=_CLI_REFUSAL,
                inspect_targets=_inspect_targets, inspect_size=_inspect_size, save_beside=_save_experts,
                serve_refusal=lambda config: _SERVE_REFUSAL),
)

__all__ = ["XLORA", "XLoraClassifier", "XLoraConfig", "XLoraGate", "XLoraModel", "XLoraTuner"]
