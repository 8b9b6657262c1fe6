"""``get_peft_model``: wrap a model with its first adapter, picking the class from ``task_type``."""

from __future__ import annotations

import warnings

from torch import nn

from deltatune.config import PeftConfig, PeftWarning, TaskType
from deltatune.core.layer import AdapterLayer
from deltatune.errors import ConfigError
from deltatune.peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    _model_name_or_path,
)

MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[TaskType, type[PeftModel]] = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Freeze ``model``, add the adapter ``peft_config`` describes, and return the ``PeftModel``.

    Raises:
        ConfigError: ``peft_config`` is not a config, or ``model`` already is a ``PeftModel``.
        TargetModuleError: the targets match nothing (with the closest module names) or an
            unsupported layer type.
    """
    if not isinstance(peft_config, PeftConfig):
        cls = type(peft_config)
        library = cls.__module__.split(".")[0]
        if library != "deltatune" and cls.__name__.endswith("Config"):  # e.g. peft.LoraConfig, half migrated
            raise ConfigError(f"got {library}.{cls.__name__}; use deltatune.{cls.__name__} (same fields)")
        raise ConfigError(f"peft_config must be a deltatune config (e.g. LoraConfig), got {type(peft_config).__name__}")
    if isinstance(model, PeftModel):
        raise ConfigError("model already is a PeftModel; use model.add_adapter(name, config) for another adapter")
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        warnings.warn("You are trying to modify a model with PEFT for a second time: it already holds adapter layers "
                      "from an earlier get_peft_model. To start over with a different config, call .unload() on the "
                      "first PeftModel before.", PeftWarning, stacklevel=2)
    if peft_config.base_model_name_or_path is None:
        peft_config.base_model_name_or_path = _model_name_or_path(model)
    if revision is not None:
        peft_config.revision = revision
    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(peft_config.task_type, PeftModel)
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
