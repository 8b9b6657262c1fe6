"""Poly's router: per task, a distribution over the skills of each split (PEFT's ``PolyRouter``).

``module_logits: (n_tasks, n_splits · n_skills)`` are the trained routing logits ``Z``. For the task ``t`` of a
row, with ``z = Z[t]`` read as ``(n_splits, n_skills)``:

- evaluation: ``p = σ(z)``;
- training: ``p ~ RelaxedBernoulli(temperature 1, logits z)`` (a differentiable sample: skills are switched on
  and off at random while training, as the Polytropon paper's Gumbel-sigmoid);

and the mixing weights ``w = p / (Σ_skills p + ε)``, ``ε = 1e-12``: each split's weights sum to one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from deltatune.errors import ConfigError

EPS = 1e-12  # PEFT's: keeps w finite when every skill of a split is off


class PolyRouter(nn.Module):
    """The routing logits of one adapter in one layer and the mixing weights they give.

    Attributes:
        module_logits: ``Z: (n_tasks, n_splits · n_skills)`` (PEFT's name, so files cross).
    """

    def __init__(self, n_tasks: int, n_skills: int, n_splits: int) -> None:
        super().__init__()
        self.n_tasks, self.n_skills, self.n_splits = n_tasks, n_skills, n_splits
        self.module_logits = nn.Parameter(torch.empty(n_tasks, n_splits * n_skills))

    def reset(self) -> None:
        """PEFT's init: ``Z ~ U(-1e-3, 1e-3)``, so every skill starts near ``σ(0) = ½`` (an even mixture)."""
        nn.init.uniform_(self.module_logits, -1e-3, 1e-3)

    def forward(self, task_ids: torch.Tensor | None) -> torch.Tensor:
        """Mixing weights ``w: (batch, n_splits, n_skills)`` for ``task_ids: (batch,)``.

        Raises:
            ConfigError: no ``task_ids``, or one outside ``[0, n_tasks)`` (PEFT's sentences first).
        """
        if task_ids is None:
            raise ConfigError("task_ids should not be None. A Poly adapter mixes its skills per task: pass "
                              "task_ids (one task id per batch row) to the model's forward or generate call")
        task_ids = task_ids.to(self.module_logits.device)
        high, low = int(task_ids.max()), int(task_ids.min())
        if high >= self.n_tasks:
            raise ConfigError(f"Only {self.n_tasks} tasks available. Found task id = {high}. (Task ids run from 0 "
                              f"to n_tasks - 1 = {self.n_tasks - 1}.)")
        if low < 0:  # PEFT would index from the end; a negative id is almost surely a bug
            raise ConfigError(f"Found task id = {low}: task ids run from 0 to n_tasks - 1 = {self.n_tasks - 1}")
        logits = self.module_logits[task_ids].view(-1, self.n_splits, self.n_skills)
        if self.training:
            probs = RelaxedBernoulli(temperature=1.0, logits=logits).rsample()
        else:
            probs = torch.sigmoid(logits)
        return probs / (probs.sum(dim=-1, keepdim=True) + EPS)
