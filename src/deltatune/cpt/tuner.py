"""``CPTTuner``: the prompt tuner plus CPT's labels and loss (PEFT's ``PeftModelForCausalLM._cpt_forward`` and
``CPTEmbedding.calculate_loss``).

The prompt goes in as any soft prompt's (:class:`~deltatune.prompt.soft.SoftPrompt`, through
:class:`~deltatune.prompt.tuner.PromptTuner`); with ``labels`` the loss is CPT's own. For a batch ``(B, T)``
with type mask ``τ: (B, T)`` (``input_type_mask``, default all 4: every token a label of one example):

    types  = [cpt_tokens_type_mask; τ + max(cpt_tokens_type_mask) where τ > 0]          (B, n + T)
    labels = [cpt_token_ids; labels], set to -100 where not (types > 0 and types ≡ 0 mod 4)
    loss   = mean over the kept positions j of  w_j · CE(logits_{j-1}, labels_j)

So the context's own label tokens are trained on too. ``w_j = 1`` (``opt_weighted_loss_type="none"``), or
``γ^r`` with ``r`` the number of the row's label types above ``types_j`` (``"decay"``: the last example weighs
1, the one before ``γ``, ...). The mean divides by the count of kept positions, not by the sum of weights
(PEFT's rule).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.cpt.config import CPTConfig
from deltatune.cpt.encoder import CPTEmbedding
from deltatune.prompt.inputs import as_kwargs
from deltatune.prompt.tuner import PromptTuner

IGNORE = -100


def cpt_labels_and_types(config: CPTConfig, labels: torch.Tensor, input_type_mask: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels, types)``, both ``(B, n + T)`` long, as in the module docstring (the caller's tensors are not
    changed; PEFT shifts ``input_type_mask`` in place)."""
    batch, device = labels.shape[0], labels.device
    prompt_types = torch.tensor(config.cpt_tokens_type_mask, dtype=torch.long, device=device)
    if input_type_mask is None:
        input_type_mask = torch.full(labels.shape, 4, dtype=torch.long, device=device)
    tau = input_type_mask.to(device=device, dtype=torch.long)
    tau = torch.where(tau > 0, tau + prompt_types.max(), tau)
    types = torch.cat([prompt_types.expand(batch, -1), tau], dim=1)
    prompt_ids = torch.tensor(config.cpt_token_ids, dtype=labels.dtype, device=device)
    out = torch.cat([prompt_ids.expand(batch, -1), labels], dim=1)
    is_label = (types > 0) & (torch.remainder(types, 4) == 0)
    return out.masked_fill(~is_label, IGNORE), types


def label_weights(config: CPTConfig, types: torch.Tensor) -> torch.Tensor:
    """``w: (B, L)`` float: ``γ^r`` at label positions under ``"decay"`` (module docstring), else ones."""
    weights = torch.ones(types.shape, dtype=torch.float32, device=types.device)
    if config.opt_weighted_loss_type != "decay":
        return weights
    is_label = (types > 0) & (torch.remainder(types, 4) == 0)
    for row in range(types.shape[0]):
        kinds = torch.unique(types[row][is_label[row]])  # this row's examples, by label type
        above = (kinds.view(1, -1) > types[row].view(-1, 1)).sum(dim=1)  # examples after position j's
        decayed = torch.tensor(config.opt_loss_decay_factor, dtype=torch.float32, device=types.device) ** above
        weights[row] = torch.where(is_label[row], decayed, weights[row])
    return weights


def cpt_loss(logits: torch.Tensor, labels: torch.Tensor, types: torch.Tensor, config: CPTConfig) -> torch.Tensor:
    """CPT's weighted next-token loss: ``logits: (B, L, V)``, ``labels``/``types: (B, L)`` -> a scalar."""
    logits, labels = logits[:, :-1], labels[:, 1:].to(logits.device)
    weights = label_weights(config, types[:, 1:].to(logits.device))
    per_token = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                            reduction="none", ignore_index=IGNORE).view(labels.shape)
    kept = labels != IGNORE
    return (per_token[kept] * weights[kept]).mean()


class CPTTuner(PromptTuner):
    """:class:`PromptTuner` whose forward, for an active CPT adapter, takes ``input_type_mask`` and computes
    CPT's loss from ``labels`` (module docstring); every other path is the prompt tuner's."""

    @staticmethod
    def build(peft_model: nn.Module, model: nn.Module, config: CPTConfig, adapter_name: str,
              autocast_adapter_dtype: bool = True) -> CPTTuner:
        """The tuner of a new ``PeftModel`` whose first adapter is CPT (``PromptTuner.build``'s signature)."""
        return CPTTuner(model, config, adapter_name)

    def _cpt_active(self) -> bool:
        return not self.disabled and self.active_adapter is not None and isinstance(
            self.peft_config[self.active_adapter], CPTConfig)

    def forward(self, args: tuple, kwargs: dict[str, Any], task_ids: torch.Tensor | None = None,
                adapter_names: list[str] | None = None) -> Any:
        kwargs = as_kwargs(self.base_model.forward, args, kwargs)
        input_type_mask = kwargs.pop("input_type_mask", None)
        if not self._cpt_active():
            return super().forward((), kwargs, task_ids=task_ids, adapter_names=adapter_names)
        labels = kwargs.pop("labels", None)
        # the model runs without labels: its own loss would be replaced anyway (PEFT's is)
        output = super().forward((), kwargs, task_ids=task_ids, adapter_names=adapter_names)
        if labels is None:
            return output
        config = self.peft_config[self.active_adapter]
        full_labels, types = cpt_labels_and_types(config, labels, input_type_mask)
        output.loss = cpt_loss(output.logits, full_labels, types, config)
        return output

    def generate(self, args: tuple, kwargs: dict[str, Any], adapter_names: list[str] | None = None) -> Any:
        """The prompt tuner's ``generate``; an ``input_type_mask`` (a training input) is dropped."""
        kwargs = dict(kwargs)
        kwargs.pop("input_type_mask", None)
        return super().generate(args, kwargs, adapter_names=adapter_names)

    def update_and_allocate(self, global_step: int) -> None:
        """After an optimizer step: project every CPT prompt's ``Δ`` back into its ball."""
        for encoder in self.prompt_encoder.values():
            if isinstance(encoder, CPTEmbedding):
                encoder.project_()
