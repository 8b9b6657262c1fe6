"""Tiny models and a deterministic training loop for the AdaLoRA tests.

``Branches`` is a regression net whose layers differ in importance by construction: layer ``i``'s output is
multiplied by ``gains[i]`` before the sum, so its gradients (and the sensitivity ``|w · grad|`` AdaLoRA
scores by) scale with ``gains[i]``.
"""

from __future__ import annotations

import torch
from torch import nn

import deltatune as dt

DIM = 16


class Branches(nn.Module):
    """``y = Σ_i gains[i] · branch_i(x)`` with ``branch_i: Linear(16, 16)``; ``x, y: (B, 16)``."""

    def __init__(self, gains: tuple[float, ...]) -> None:
        super().__init__()
        self.gains = gains
        self.branch = nn.ModuleList(nn.Linear(DIM, DIM) for _ in gains)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(g * layer(x) for g, layer in zip(self.gains, self.branch, strict=True))


def branches(gains: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0), seed: int = 0) -> Branches:
    torch.manual_seed(seed)
    return Branches(gains).eval()


def config(**overrides) -> dt.AdaLoraConfig:
    kw = dict(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=1, total_step=15, lora_alpha=6,
              target_modules=["branch.0", "branch.1", "branch.2", "branch.3"])
    kw.update(overrides)
    return dt.AdaLoraConfig(**kw)


def adalora_model(gains=(1.0, 1.0, 1.0, 1.0), seed: int = 0, **overrides) -> dt.PeftModel:
    n = len(gains)
    overrides.setdefault("target_modules", [f"branch.{i}" for i in range(n)])
    torch.manual_seed(seed + 1)
    return dt.get_peft_model(branches(gains, seed), config(**overrides))


def target_map(seed: int = 0) -> torch.Tensor:
    """The regression target ``y = x M`` with ``M: (16, 16)``: a change every branch could make."""
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(DIM, DIM, generator=g) / DIM ** 0.5


def batch(step: int, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    return torch.randn(size, DIM, generator=g)


def train(model: dt.PeftModel, steps: int, *, first_step: int = 1, lr: float = 0.02, allocate: bool = True,
          after_optimizer_step=None, optimizer: torch.optim.Optimizer | None = None) -> torch.optim.Optimizer:
    """Adam on ``||model(x) - x M||² + regulariser`` for ``steps`` steps (numbered from ``first_step``).

    After each ``optimizer.step()``: ``after_optimizer_step(model, step)`` (to look at the raw update),
    then ``update_and_allocate(step)`` unless ``allocate`` is false, then ``zero_grad()``.
    """
    m = target_map()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer or torch.optim.Adam(params, lr=lr)
    for step in range(first_step, first_step + steps):
        x = batch(step)
        loss = ((model(x) - x @ m) ** 2).mean()
        reg = model.regularization_loss()
        (loss if reg is None else loss + reg).backward()
        opt.step()
        if after_optimizer_step is not None:
            after_optimizer_step(model, step)
        if allocate:
            model.update_and_allocate(step)
        opt.zero_grad()
    model.eval()
    return opt


def layers(model: dt.PeftModel, adapter: str = "default"):
    from deltatune.adalora import adalora_layers

    return adalora_layers(model.base_model, adapter)


def orth_distance(model: dt.PeftModel, adapter: str = "default") -> float:
    """``mean over layers of (||PᵀP - I||_F + ||QQᵀ - I||_F) / 2``, computed here from scratch."""
    total, n = 0.0, 0
    for _, layer in layers(model, adapter):
        p, q = layer.lora_B[adapter].detach().double(), layer.lora_A[adapter].detach().double()
        r = p.shape[1]
        total += float(((p.T @ p - torch.eye(r, dtype=p.dtype)) ** 2).sum().sqrt())
        total += float(((q @ q.T - torch.eye(r, dtype=q.dtype)) ** 2).sum().sqrt())
        n += 2
    return total / n
