"""X-LoRA: a learned per-token mixture of frozen LoRA experts (the registry entry; see :mod:`.model`)."""

from __future__ import annotations

from deltatune.config import PeftType
from deltatune.registry import Hooks, Method
from deltatune.xlora.classifier import XLoraClassifier
from deltatune.xlora.config import XLoraConfig
from deltatune.xlora.layer import XLoraGate
from deltatune.xlora.model import XLoraModel
from deltatune.xlora.tuner import XLoraTuner

XLORA = Method(
    peft_type=PeftType.XLORA,
    config_cls=XLoraConfig,
    # What trains (the classifier; the experts too with use_trainable_adapters). No layer class of its own: its
    # layers are LoRA's (the experts), so PeftModel delegates to X-LoRA's tuner (the peft_tuner hook) instead.
    prefix="internal_xlora_classifier",
    mergeable=False,  # the experts' weights depend on the input
    hooks=Hooks(peft_tuner=XLoraTuner),
)

__all__ = ["XLORA", "XLoraClassifier", "XLoraConfig", "XLoraGate", "XLoraModel", "XLoraTuner"]
