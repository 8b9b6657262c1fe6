"""LoRA+ (Hayou et al., 2024): ``B`` learns ``loraplus_lr_ratio`` times faster than ``A``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _no_decay_names(model: nn.Module) -> set[str]:
    """Biases and LayerNorm parameters: the usual exemptions from weight decay."""
    names = {n for n, _ in model.named_parameters() if "bias" in n}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            names |= {f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters()}
    return names


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *, lr: float,
                              loraplus_lr_ratio: float, **kwargs: Any) -> torch.optim.Optimizer:
    """An optimizer with PEFT's four LoRA+ parameter groups:

    - ``A`` and every other trainable matrix: ``lr``;
    - embedding adapters (``lora_embedding_A/B``): ``loraplus_lr_embedding`` (default ``1e-6``);
    - ``lora_B`` and other 1-D parameters (e.g. DoRA magnitudes): ``lr * loraplus_lr_ratio``;
    - the same, for biases and LayerNorm parameters, without weight decay.

    ``loraplus_weight_decay`` (default 0) is the decay of the decayed groups; other ``kwargs`` go to
    ``optimizer_cls``.
    """
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    no_decay = _no_decay_names(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_embedding_" in name:
            groups["embedding"].append(p)
        elif "lora_B" in name or p.ndim == 1:
            groups["B_no_decay" if name in no_decay else "B"].append(p)
        else:
            groups["A"].append(p)
    param_groups = [
        {"params": groups["A"], "lr": lr, "weight_decay": weight_decay},
        {"params": groups["embedding"], "lr": lr_embedding, "weight_decay": weight_decay},
        {"params": groups["B"], "lr": lr * loraplus_lr_ratio, "weight_decay": weight_decay},
        {"params": groups["B_no_decay"], "lr": lr * loraplus_lr_ratio, "weight_decay": 0.0},
    ]
    return optimizer_cls(param_groups, lr=lr, **kwargs)
