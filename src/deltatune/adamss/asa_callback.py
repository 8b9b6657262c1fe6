"""``AdamssAsaCallback``: drives AdaMSS's adaptive subspace allocation inside a ``transformers.Trainer``
(``AdapterTrainer`` or a plain ``Trainer``), imported as PEFT's is::

    from deltatune.adamss.asa_callback import AdamssAsaCallback   # peft.tuners.adamss.asa_callback
    trainer = AdapterTrainer(model=peft_model, args=args, train_dataset=ds, callbacks=[AdamssAsaCallback()])

``Trainer`` runs ``optimizer.step()``, then ``on_optimizer_step``, then ``zero_grad()`` and only then increments
``state.global_step``. ASA reads the gradients, so it runs in ``on_optimizer_step``, with ``state.global_step`` (the
steps taken before this one) as PEFT's callback passes it: the masks fall on the same steps as under PEFT.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import TrainerCallback

from deltatune.adamss.asa import allocate_in


class AdamssAsaCallback(TrainerCallback):
    """Runs ASA after every optimizer step (nothing to configure: the schedule is the adapter's ``AdamssConfig``):
    ``model.update_and_allocate(state.global_step)`` when the ``Trainer`` holds the ``PeftModel``; when it holds the
    adapted base model (``AdapterTrainer`` trains the base model in place), the same step on its AdaMSS layers."""

    def on_optimizer_step(self, args, state, control, model: nn.Module | None = None, **kwargs: Any) -> None:
        while model is not None and not hasattr(model, "update_and_allocate") and hasattr(model, "module"):
            model = model.module  # DDP-style wrappers
        if model is None:
            return
        if hasattr(model, "update_and_allocate"):
            model.update_and_allocate(state.global_step)
        else:
            allocate_in(model, state.global_step)
