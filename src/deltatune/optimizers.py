"""LoRA+ (Hayou et al., 2024): ``B`` learns ``loraplus_lr_ratio`` times faster than ``A``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *, lr: float,
                              loraplus_lr_ratio: float, loraplus_lr_embedding: float = 1e-6,
                              **kwargs: Any) -> torch.optim.Optimizer:
    """An optimizer with four parameter groups, as in PEFT:

    - ``A`` and every other trainable matrix: ``lr``, with weight decay;
    - ``lora_B``: ``lr * loraplus_lr_ratio``, with weight decay;
    - 1-D parameters (biases, DoRA magnitudes): ``lr * loraplus_lr_ratio``, no weight decay;
    - embedding adapters (``lora_embedding_*``): ``loraplus_lr_embedding``.
    """
    weight_decay = kwargs.pop("weight_decay", 0.0)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "B": [], "B_no_decay": [], "embedding": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_embedding" in name:
            groups["embedding"].append(p)
        elif "lora_B" in name and p.ndim > 1:
            groups["B"].append(p)
        elif p.ndim == 1 or "lora_B" in name:
            groups["B_no_decay"].append(p)
        else:
            groups["A"].append(p)
    param_groups = [
        {"params": groups["A"], "lr": lr, "weight_decay": weight_decay},
        {"params": groups["embedding"], "lr": loraplus_lr_embedding, "weight_decay": weight_decay},
        {"params": groups["B"], "lr": lr * loraplus_lr_ratio, "weight_decay": weight_decay},
        {"params": groups["B_no_decay"], "lr": lr * loraplus_lr_ratio, "weight_decay": 0.0},
    ]
    return optimizer_cls([g for g in param_groups if g["params"]], lr=lr, **kwargs)
