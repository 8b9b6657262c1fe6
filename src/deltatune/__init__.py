"""deltatune: parameter-efficient fine-tuning with Hugging Face PEFT's API and file format."""

from deltatune import lora  # noqa: F401  (registers the method)
from deltatune.config import PeftConfig, PeftType, TaskType
from deltatune.errors import (
    AdapterLoadError,
    AdapterNameError,
    ConfigError,
    DeltatuneError,
    MergeError,
    TargetModuleError,
)
from deltatune.lora import LoraConfig
from deltatune.mapping import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, get_peft_model
from deltatune.optimizers import create_loraplus_optimizer
from deltatune.peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterLoadError", "AdapterNameError", "ConfigError", "DeltatuneError", "LoraConfig", "MergeError",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING", "PeftConfig", "PeftModel", "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification", "PeftModelForTokenClassification", "PeftType", "TargetModuleError",
    "TaskType", "create_loraplus_optimizer", "get_peft_model",
]
