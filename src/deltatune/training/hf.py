"""``transformers.Trainer`` that saves and resumes a deltatune adapter in PEFT's file format.

``transformers.Trainer`` trains a deltatune ``PeftModel`` as it is (an ordinary ``nn.Module``), but its
``save_model`` recognises only ``PreTrainedModel`` and ``peft.PeftModel``: for anything else it writes the
whole ``state_dict()`` (frozen base included) as ``model.safetensors``, and its checkpoints resume from
that file only. :class:`AdapterTrainer` writes ``adapter_config.json`` + ``adapter_model.safetensors``
instead (in ``save_model`` and in every ``checkpoint-N``) and resumes from them.

Usage::

    from deltatune.training.hf import AdapterTrainer
    trainer = AdapterTrainer(model=peft_model, args=training_args, train_dataset=data)
    trainer.train()
    trainer.save_model("out")          # out/adapter_config.json, out/adapter_model.safetensors
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer

from deltatune.core.io import load_adapter_weights
from deltatune.peft_model import PeftModel

TRAINING_ARGS_NAME = "training_args.bin"


class AdapterTrainer(Trainer):
    """``transformers.Trainer`` that saves and resumes adapter files when the model is a deltatune ``PeftModel``."""

    def _adapter_model(self) -> PeftModel | None:
        model = self.accelerator.unwrap_model(self.model)
        return model if isinstance(model, PeftModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._adapter_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # Every rank calls this: with FSDP2 the shards are gathered inside save_pretrained; rank 0 writes.
        model.save_pretrained(output_dir, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return None
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not isinstance(target, PeftModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name in target.peft_config:
            directory = resume_from_checkpoint if name == "default" else os.path.join(resume_from_checkpoint, name)
            target._load_weights(load_adapter_weights(directory, device=next(target.parameters()).device), name)
        return None


__all__ = ["AdapterTrainer"]
