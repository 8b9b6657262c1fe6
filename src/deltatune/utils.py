"""The names PEFT users import from ``peft.utils``, as deltatune objects.

``from peft.utils import get_peft_model_state_dict, ModulesToSaveWrapper, infer_device`` becomes
``from deltatune.utils import ...``. Most names are deltatune's own functions and classes under PEFT's name
(re-exported, not copies); a few small helpers PEFT keeps here are defined below. Per-architecture default target
tables (``TRANSFORMERS_MODELS_TO_<METHOD>_TARGET_MODULES_MAPPING``) are each method's registry entry, so a
``model_type`` deltatune knows for a method is in its table (they can differ from PEFT's lists).
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from deltatune.config import PeftType, PeftWarning, TaskType
from deltatune.core.io import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, infer_device
from deltatune.core.modules_to_save import ModulesToSaveWrapper
from deltatune.core.targeting import ALL_LINEAR
from deltatune.errors import NoMatchingPeftModuleError, PeftError
from deltatune.ia3.config import DEFAULT_IA3_FEEDFORWARD
from deltatune.lora.eva import MIN_TARGETS_TO_CONDENSE
from deltatune.lora.loftq import replace_lora_weights_loftq
from deltatune.quantization import prepare_model_for_kbit_training
from deltatune.registry import METHODS, load_builtins
from deltatune.save_and_load import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    load_peft_weights,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from deltatune.trainable_tokens import TokenAdapterWrapper

# File names and the target shorthand, under PEFT's names.
SAFETENSORS_WEIGHTS_NAME = SAFETENSORS_NAME
WEIGHTS_NAME = BIN_NAME
INCLUDE_LINEAR_LAYERS_SHORTHAND = ALL_LINEAR
# PEFT's name for the count of adapted modules from which a saved target_modules is shortened to suffixes.
MIN_TARGET_MODULES_FOR_OPTIMIZATION = MIN_TARGETS_TO_CONDENSE

# PEFT's name for the wrapper that holds a LoRA adapter's ``trainable_token_indices`` layer.
TrainableTokensWrapper = TokenAdapterWrapper


def _targets(peft_type: str) -> dict[str, list[str]]:
    load_builtins()  # the tables below are the registered methods' own
    return METHODS[PeftType(peft_type)].default_targets


TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING = _targets("LORA")
TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING = _targets("ADALORA")
TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING = _targets("IA3")
TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING = DEFAULT_IA3_FEEDFORWARD
TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING = _targets("LOHA")
TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING = _targets("LOKR")
TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING = _targets("VERA")
TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING = _targets("OFT")
TRANSFORMERS_MODELS_TO_BOFT_TARGET_MODULES_MAPPING = _targets("BOFT")
TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING = _targets("LN_TUNING")


class AuxiliaryTrainingWrapper(abc.ABC):  # noqa: B024 (no abstract methods: it only names a group of classes)
    """PEFT's common base of the wrappers that train a whole module (or rows of one) beside the adapters:
    ``ModulesToSaveWrapper`` and ``TrainableTokensWrapper``. deltatune's two classes do not share a base class;
    they are registered here, so ``isinstance(m, AuxiliaryTrainingWrapper)`` answers as in PEFT."""


AuxiliaryTrainingWrapper.register(ModulesToSaveWrapper)
AuxiliaryTrainingWrapper.register(TokenAdapterWrapper)


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Mixed-precision storage, as PEFT's helper: frozen parameters go to ``dtype`` (``float16``/``bfloat16``),
    trainable ones to ``float32`` (an optimizer step on half-precision weights loses small updates). In place."""
    for param in model.parameters():
        param.data = param.data.to(dtype if not param.requires_grad else torch.float32)


def shift_tokens_right(input_ids: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Decoder inputs from labels: ``out[:, 0] = decoder_start_token_id``, ``out[:, t] = input_ids[:, t - 1]``, and
    ``-100`` (the ignored-label id) replaced by ``pad_token_id``.

    Args:
        input_ids: ``(batch, seq)`` token ids (labels).
    Returns:
        ``(batch, seq)``, a new tensor.
    Raises:
        ValueError: ``pad_token_id`` is ``None`` (set ``model.config.pad_token_id``).
    """
    if pad_token_id is None:
        raise ValueError("shift_tokens_right needs a pad_token_id; set model.config.pad_token_id")
    shifted = torch.full_like(input_ids, decoder_start_token_id)
    shifted[:, 1:] = input_ids[:, :-1]
    return shifted.masked_fill(shifted == -100, pad_token_id)


def _get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """``(parent, target, target_name)`` of the submodule at dotted path ``key``: PEFT's helper (private by its
    underscore, yet imported by code written against PEFT, its own tests included), kept under its name and order."""
    from deltatune.core.tuner import get_submodule_parent

    parent, name = get_submodule_parent(model, key)
    return parent, model.get_submodule(key), name


def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """``weight.T`` when the layer stores it as ``(in, out)`` (GPT-2's ``Conv1D``, ``fan_in_fan_out=True``)."""
    return weight.T if fan_in_fan_out else weight


__all__ = [
    "CONFIG_NAME",
    "INCLUDE_LINEAR_LAYERS_SHORTHAND",
    "MIN_TARGET_MODULES_FOR_OPTIMIZATION",
    "SAFETENSORS_WEIGHTS_NAME",
    "TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_BOFT_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING",
    "WEIGHTS_NAME",
    "AuxiliaryTrainingWrapper",
    "ModulesToSaveWrapper",
    "NoMatchingPeftModuleError",
    "PeftError",
    "PeftType",
    "PeftWarning",
    "TaskType",
    "TrainableTokensWrapper",
    "cast_mixed_precision_params",
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "infer_device",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "replace_lora_weights_loftq",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "shift_tokens_right",
    "transpose",
]
