"""``transformers.Trainer`` for deltatune models: adapter files in PEFT's format, and the base model's own behaviour.

``transformers.Trainer`` recognises a PEFT model only with ``isinstance(model, peft.PeftModel)`` (and only
when ``peft`` is installed), so a deltatune ``PeftModel`` handed to it directly is an unknown ``nn.Module``:
its signature columns, label-smoothing shift, quantized-model check and checkpoints all go wrong.

:class:`AdapterTrainerMixin` fixes that without patching ``transformers``: it gives the ``Trainer`` the
*base* model (a ``PreTrainedModel`` whose layers deltatune adapted in place, so its forward runs the
adapters) and keeps the deltatune wrapper for saving and loading. Everything the ``Trainer`` decides from
the model (``forward``'s signature for ``remove_unused_columns``, the causal-LM label shift of label
smoothing, ``accepts_loss_kwargs``, gradient checkpointing) then comes from the real model, as it does
for ``peft.PeftModel`` (``Trainer`` looks through it with ``get_base_model()``); checkpoints, ``save_model``
and ``load_best_model_at_end`` write and read ``adapter_config.json`` + ``adapter_model.safetensors``.

Prompt-learning adapters and AdaLoRA need the wrapper's own forward (virtual tokens; the orthogonality
penalty added to the loss), so for them the wrapper itself is given to the ``Trainer``.

Usage::

    from deltatune.integrations.transformers import AdapterTrainer
    trainer = AdapterTrainer(model=peft_model, args=training_args, train_dataset=data)
    trainer.train()
    trainer.save_model("out")          # out/adapter_config.json, out/adapter_model.safetensors
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from deltatune.config import PeftConfig, PeftType
from deltatune.core.io import load_adapter_weights
from deltatune.errors import ConfigError
from deltatune.peft_model import PeftModel

TRAINING_ARGS_NAME = "training_args.bin"

# Trainer + Accelerate's FSDP plugin decide adapter-only saving with isinstance(model, peft.PeftModel): for a
# deltatune model every checkpoint would hold the whole base model, and resuming would copy whole adapter tensors
# into FSDP-sharded parameters. Neither has been run (Accelerate turns the plugin into DDP on CPU, so no CPU test
# can reach it), so it is refused rather than left to chance.
FSDP_REFUSAL = ("FSDP through transformers.Trainer/Accelerate (fsdp=... / an FSDP plugin) is not supported for "
                "deltatune models: its checkpoints would hold the whole base model; use DDP (drop fsdp), or "
                "'deltatune train --fsdp' / deltatune.distributed.wrap_fsdp for sharded training")


def foreign_config_error(config: object) -> ConfigError | None:
    """The error for a config object from another library (``peft.LoraConfig``), naming both; else ``None``."""
    cls = type(config)
    module = cls.__module__.split(".")[0]
    if module == "deltatune" or isinstance(config, PeftConfig):
        return None
    return ConfigError(f"got {module}.{cls.__name__}; use deltatune.{cls.__name__} (same fields)")


def needs_wrapper_forward(model: PeftModel) -> bool:
    """True when training must call the wrapper's forward: virtual tokens, or AdaLoRA's loss penalty."""
    return model._is_prompt_learning or any(c.peft_type == PeftType.ADALORA for c in model.peft_config.values())


@contextlib.contextmanager
def _adapters_attached(model: nn.Module) -> Iterator[None]:
    """While ``Trainer.__init__`` runs, mark a quantized base as carrying adapters.

    ``transformers`` refuses "purely quantized models" unless the model is a ``peft.PeftModel`` or has
    ``_hf_peft_config_loaded`` (its own PEFT integration's flag). The flag also changes what the base's
    ``save_pretrained`` does (it would call into ``peft``), so it is set only for the check and removed after.
    """
    if not getattr(model, "is_quantized", False) or getattr(model, "_hf_peft_config_loaded", False):
        yield
        return
    model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        model._hf_peft_config_loaded = False


class AdapterTrainerMixin:
    """Put before a ``transformers.Trainer`` subclass: ``class T(AdapterTrainerMixin, Trainer)``.

    ``model`` may be a deltatune ``PeftModel``; the ``Trainer`` then trains its base model (adapted in place)
    and saves/loads the adapter files. Any other model passes through unchanged.
    """

    #: The deltatune wrapper being trained, or ``None`` when the model is not a deltatune ``PeftModel``.
    deltatune_model: PeftModel | None

    def __init__(self, model: Any = None, *args: Any, **kwargs: Any) -> None:
        self.deltatune_model = model if isinstance(model, PeftModel) else None
        if self.deltatune_model is not None:
            model = self._model_for_trainer(self.deltatune_model)
        with _adapters_attached(model) if isinstance(model, nn.Module) else contextlib.nullcontext():
            super().__init__(model, *args, **kwargs)
        if self.deltatune_model is not None and getattr(self, "is_fsdp_enabled", False):
            raise ConfigError(FSDP_REFUSAL)

    def _model_for_trainer(self, model: PeftModel) -> nn.Module:
        if needs_wrapper_forward(model):
            model._claimed_by_trainer = True  # the guard in PeftModel lets this Trainer take the wrapper
            return model
        return model.get_base_model()

    # ---- columns ---------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        # With the wrapper (prompt learning, AdaLoRA), keep what the base model's forward takes, not the
        # wrapper's fixed list (start_positions, pixel_values, ... would be dropped).
        if self.deltatune_model is not None and self._signature_columns is None and self.model is self.deltatune_model:
            base = self.deltatune_model.get_base_model()
            names = list(inspect.signature(base.forward).parameters)
            self._signature_columns = list(dict.fromkeys(names + ["label", "label_ids", *self.label_names]))
            return
        super()._set_signature_columns_if_needed()

    # ---- saving and loading ----------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.deltatune_model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # Every rank calls this: with FSDP2 the shards are gathered inside save_pretrained; rank 0 writes.
        self.deltatune_model.save_pretrained(output_dir, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return None
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if self.deltatune_model is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        target = self.deltatune_model
        device = next(target.parameters()).device
        for name in target.peft_config:
            directory = resume_from_checkpoint if name == "default" else os.path.join(resume_from_checkpoint, name)
            target._load_weights(load_adapter_weights(directory, device=device), name)
        return None

    def _load_best_model(self) -> None:
        # Trainer's version looks for model.safetensors / pytorch_model.bin, or a peft.PeftModel.
        if self.deltatune_model is None:
            return super()._load_best_model()
        self._load_from_checkpoint(self.state.best_model_checkpoint)
        return None


class AdapterTrainer(AdapterTrainerMixin, Trainer):
    """``transformers.Trainer`` that trains a deltatune ``PeftModel`` and saves/resumes its adapter files."""


__all__ = ["AdapterTrainer", "AdapterTrainerMixin", "foreign_config_error", "needs_wrapper_forward"]
