"""Poly / MHR layers: an inventory of LoRA skills mixed per row by the row's task (PEFT's ``poly.Linear``).

Shapes, for one adapter (PEFT's layout, so files cross):

- ``A: (n_splits, n_skills, in / n_splits, r)``, ``B: (n_splits, n_skills, r, out / n_splits)``: split ``q`` of
  skill ``s`` holds the ``q``-th block of input rows of that skill's ``A`` and the ``q``-th block of output
  columns of its ``B``;
- ``w: (batch, n_splits, n_skills)``: the router's mixing weights for each row's task (:mod:`.router`);
- ``x: (batch, ..., in)``.

For row ``b``, each split's factors are the weighted sums of the skills',
``A_b[q] = Σ_s w[b, q, s] A[q, s]`` and ``B_b[q] = Σ_s w[b, q, s] B[q, s]``; stacking the splits' blocks gives
``A_b: (in, r)`` (input blocks one above the other) and ``B_b: (r, out)`` (output blocks side by side), and

    y_b = base(x_b) + (1 / r) · x_b A_b B_b

(no ``alpha``: the scale is ``1/r``, PEFT's). With ``B = 0`` at init the adapter starts as the identity. The
update depends on each row's task id, so no single weight holds it: merging is refused.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.errors import ConfigError, MergeError
from deltatune.poly.router import PolyRouter

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None


class PolyLayer(AdapterLayer):
    """Poly on ``nn.Linear`` (PEFT's) or ``transformers``' ``Conv1D`` (GPT-2; the adapter sees features only, so
    the transposed base weight does not matter).

    Attributes:
        poly_lora_A: ``adapter -> A: (n_splits, n_skills, in / n_splits, r)``.
        poly_lora_B: ``adapter -> B: (n_splits, n_skills, r, out / n_splits)``.
        poly_router: ``adapter -> PolyRouter`` (its ``module_logits: (n_tasks, n_splits · n_skills)``).
        r, n_tasks, n_skills, n_splits, poly_type: ``adapter -> value`` (the config's).
    """

    adapter_layer_names = ("poly_lora_A", "poly_lora_B", "poly_router")
    other_param_names = ("r", "n_tasks", "n_skills", "n_splits", "poly_type")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.poly_lora_A = nn.ParameterDict()
        self.poly_lora_B = nn.ParameterDict()
        self.poly_router = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.n_tasks: dict[str, int] = {}
        self.n_skills: dict[str, int] = {}
        self.n_splits: dict[str, int] = {}
        self.poly_type: dict[str, str] = {}

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, n_tasks: int = 1, n_skills: int = 4, n_splits: int = 1,
                     poly_type: str = "poly", init_weights: bool = True) -> None:
        """Create ``adapter_name``'s skills and router.

        Init (PEFT's, drawn in PEFT's order so a seeded run gives PEFT's tensors): each skill's and split's ``A``
        block as ``nn.Linear``'s weight (Kaiming-uniform, ``a = √5``, of an ``(r, in / n_splits)`` matrix, stored
        transposed); ``B = 0`` (``init_weights``) or drawn as ``A``; router logits ``U(-1e-3, 1e-3)``.

        Raises:
            ConfigError: ``r <= 0`` (PEFT's sentence), or ``n_splits`` not dividing the features.
        """
        if r <= 0:
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {r}")
        if self.in_features % n_splits or self.out_features % n_splits:
            raise ConfigError(f"n_splits={n_splits} must divide the layer's in_features ({self.in_features}) and "
                              f"out_features ({self.out_features}); pick a common divisor")
        if poly_type != "poly":  # PEFT's sentence
            raise ConfigError(f"Unsupported poly_type: {poly_type}. Currently, only the following types are "
                              "supported: `poly`.")
        self.r[adapter_name], self.n_tasks[adapter_name] = r, n_tasks
        self.n_skills[adapter_name], self.n_splits[adapter_name] = n_skills, n_splits
        self.poly_type[adapter_name] = poly_type
        d_in, d_out = self.in_features // n_splits, self.out_features // n_splits
        self.poly_lora_A[adapter_name] = nn.Parameter(_linear_init(n_splits, n_skills, r, d_in))
        if init_weights:
            self.poly_lora_B[adapter_name] = nn.Parameter(torch.zeros(n_splits, n_skills, r, d_out))
        else:
            self.poly_lora_B[adapter_name] = nn.Parameter(_linear_init(n_splits, n_skills, d_out, r))
        router = PolyRouter(n_tasks, n_skills, n_splits)
        router.reset()
        self.poly_router[adapter_name] = router
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    # ---- the update --------------------------------------------------------------------------
    def delta(self, adapter_name: str, x: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        """``(1/r) · x_b A_b B_b: (batch, ..., out)`` for ``x: (batch, ..., in)`` and ``task_ids: (batch,)``, in the
        adapter's dtype."""
        a, b = self.poly_lora_A[adapter_name], self.poly_lora_B[adapter_name]
        r = self.r[adapter_name]
        w = self.poly_router[adapter_name](task_ids)                           # (batch, q, s)
        batch = x.shape[0]
        a_rows = torch.einsum("bqs,qsdr->bqdr", w, a).reshape(batch, self.in_features, r)   # (batch, in, r)
        b_rows = torch.einsum("bqs,qsrd->bqrd", w, b)                          # (batch, q, r, out / q)
        b_rows = b_rows.transpose(1, 2).reshape(batch, r, self.out_features)  # (batch, r, out)
        x = x.to(a.dtype) if self.cast_input_dtype_enabled else x
        h = x.reshape(batch, -1, self.in_features)                            # (batch, T, in)
        return (h.bmm(a_rows).bmm(b_rows) / r).reshape(*x.shape[:-1], self.out_features)

    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + Σ_active (1/r) · x_b A_b B_b``; ``x: (batch, ..., in)``, with the call's ``task_ids``
        (``row_input``).

        Raises:
            ConfigError: the call gave no ``task_ids`` (PEFT's sentence first), or an id out of range.
        """
        result = self.base_layer(x, *args, **kwargs)
        names = [n for n in self.active_adapters if n in self.poly_lora_A]
        if not names:
            return result
        task_ids = self.row_input("task_ids", x.shape[0])
        for name in names:
            result = result + self.delta(name, x, task_ids).to(result.dtype)
        return result

    # ---- merging -----------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Refused: ``A_b B_b`` depends on each row's task, so no fixed ``ΔW`` exists."""
        raise MergeError(f"adapter {adapter_name!r} (POLY) cannot be merged: its mixture of LoRA skills is chosen "
                         "per row by the task id, so no single weight holds it; keep it unmerged")


def _linear_init(n_splits: int, n_skills: int, rows: int, cols: int) -> torch.Tensor:
    """``(n_splits, n_skills, cols, rows)``: for each skill, then each split (PEFT's loop order), an ``(rows,
    cols)`` matrix initialised as ``nn.Linear``'s weight (Kaiming-uniform, ``a = √5``: ``U(±1/√cols)``), stored
    transposed."""
    out = torch.empty(n_splits, n_skills, cols, rows)
    for skill in range(n_skills):
        for split in range(n_splits):
            block = torch.empty(rows, cols)
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
            out[split, skill] = block.T
    return out


def supported_types() -> tuple[type, ...]:
    return (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
