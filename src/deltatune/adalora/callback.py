"""``AdaLoraCallback``: drives AdaLoRA's rank allocation inside a ``transformers.Trainer`` (``AdapterTrainer``).

``Trainer`` runs ``optimizer.step()``, then ``on_optimizer_step``, then ``zero_grad()`` and only then
``global_step += 1`` and ``on_step_end``. The allocator reads the gradients, so it must run in
``on_optimizer_step`` (by ``on_step_end`` they are gone); the step it passes is ``state.global_step + 1``,
the optimizer steps taken including this one, the count ``total_step`` refers to.

Usage::

    from deltatune.integrations.transformers import AdapterTrainer
    trainer = AdapterTrainer(model=peft_model, args=args, train_dataset=ds, callbacks=[AdaLoraCallback()])
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn
from transformers import TrainerCallback


def _peft_model(model: nn.Module | None) -> Any:
    """The object with ``update_and_allocate`` (unwrapping DDP-style ``.module`` wrappers)."""
    while model is not None and not hasattr(model, "update_and_allocate") and hasattr(model, "module"):
        model = model.module
    return model if model is not None and hasattr(model, "update_and_allocate") else None


class AdaLoraCallback(TrainerCallback):
    """Calls ``model.update_and_allocate(step)`` after every optimizer step, before the gradients are zeroed."""

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs: Any) -> None:
        peft_model = _peft_model(model)
        if peft_model is None:
            raise TypeError("AdaLoraCallback needs a deltatune PeftModel with an AdaLoRA adapter as the Trainer's "
                            f"model, got {type(model).__name__}")
        for name, config in peft_model.peft_config.items():
            total = getattr(config, "total_step", None)
            if total is not None and not config.inference_mode and state.max_steps and total != state.max_steps:
                warnings.warn(
                    f"AdaLoRA adapter {name!r} has total_step={total} but the Trainer runs max_steps="
                    f"{state.max_steps} optimizer steps: the rank schedule will "
                    f"{'not finish' if total > state.max_steps else 'finish early'}; set "
                    f"AdaLoraConfig(total_step={state.max_steps})", stacklevel=2,
                )

    def on_optimizer_step(self, args, state, control, model: nn.Module | None = None, **kwargs: Any) -> None:
        peft_model = _peft_model(model)
        if peft_model is not None:
            peft_model.update_and_allocate(state.global_step + 1)
