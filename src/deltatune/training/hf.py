"""``transformers.Trainer`` that saves and resumes a deltatune adapter in PEFT's file format.

Kept for existing imports; the implementation is :mod:`deltatune.integrations.transformers`.

Usage::

    from deltatune.training.hf import AdapterTrainer
    trainer = AdapterTrainer(model=peft_model, args=training_args, train_dataset=data)
    trainer.train()
    trainer.save_model("out")          # out/adapter_config.json, out/adapter_model.safetensors
"""

from __future__ import annotations

from deltatune.integrations.transformers import TRAINING_ARGS_NAME, AdapterTrainer, AdapterTrainerMixin

__all__ = ["TRAINING_ARGS_NAME", "AdapterTrainer", "AdapterTrainerMixin"]
