"""FRoD layers: the adapted weight rewritten over a basis shared by the layers of one role, a trainable diagonal
plus a few trainable off-diagonal entries in that basis (AAAI 2026, https://doi.org/10.1609/aaai.v40i31.39813).

For ``W: (out, in)`` (GPT-2's ``Conv1D`` stores ``Wᵀ``; everything here is in the ``(out, in)`` layout)::

    B = W V⁻ᵀ: (out, in),   λ0 = ‖B[:, j]‖ (column norms),   U = B diag(λ0)⁻¹,   so  W = U diag(λ0) Vᵀ
    W' = U (diag(λ) + S) Vᵀ,    y = W' x + b = ((z ⊙ λ) + z Sᵀ) Uᵀ + b   with  z = x V: (..., in)

``V: (in, in)`` is shared by every adapted layer of one role (``self_attn_q_proj`` of every block:
:func:`category_from_key`); ``U`` is frozen; ``λ: (in,)`` (``frod_lambda_l``, starts at ``λ0``) and the ``nnz``
values of ``S`` (``frod_lambda_s_values``) train. ``S: (in, in)`` is zero but at ``nnz = ⌊in² · sparse_rate⌋``
off-diagonal positions drawn once per role (``frod_s_indices: (2, nnz)``, rows then columns). ``S = 0`` at init,
so ``W' = W`` up to rounding: the adapter starts as the identity.

The shared basis (:func:`shared_basis`), for the role's weights ``W_1 .. W_L`` stacked as ``[W_1; ..; W_L] = Q R``
(``Q_l`` the rows of ``Q`` of layer ``l``, ``R: (in, in)``)::

    T = mean_l (Q_lᵀ Q_l + α I)⁻¹ = E Λ Eᵀ (eigendecomposition),   V = Rᵀ E

so ``B_l = W_l V⁻ᵀ = Q_l E``: ``E`` nearly diagonalises every ``Q_lᵀ Q_l`` at once, so each layer's ``U`` has nearly
orthogonal columns. With fewer stacked rows than ``in``, ``V`` is the right singular vectors of the stack instead.

As PEFT, one active adapter without dropout computes ``W' x + b`` alone (the base product is never formed);
otherwise ``base(x) + Σ_a (W'_a h_a - W h_a)``, ``h_a = dropout_a(x)``. Merging adds ``W'_a - W`` for each
adapter, ``W`` the weight before the first merge (kept, on the CPU, until the last unmerge restores it exactly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.buffers import BufferDict
from deltatune.core.layer import AdapterLayer

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None


# ---- the shared projections (one per role, built by the model before any layer) ----------------------------
def category_from_key(key: str) -> str:
    """The role that shares a basis, from a module's dotted name (PEFT's rule): its last two components,
    ``model.layers.0.self_attn.q_proj -> self_attn_q_proj``; only the last one after a block index
    (``h.0.fc -> fc``); BERT's attention output ``...attention.output.dense -> attention_output`` (apart from the
    MLP's ``output.dense``)."""
    parts = key.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    category = f"{parts[-2]}_{parts[-1]}"
    if category == "output_dense" and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return category


def layer_index_from_key(key: str, fallback: int) -> int:
    """The block index of a module (PEFT's rule): the number after ``layers``, else the first number in the name,
    else ``fallback`` (the module's position among the targets)."""
    parts = key.split(".")
    if "layers" in parts:
        try:
            return int(parts[parts.index("layers") + 1])
        except (ValueError, IndexError):
            pass
    return next((int(p) for p in parts if p.isdigit()), fallback)


def shared_basis(matrices: list[torch.Tensor], regularization_alpha: float) -> torch.Tensor:
    """``V: (in, in)`` for the role's weights ``matrices`` (each ``(out_l, in)``, float32, in block order); see the
    module docstring. The operations are PEFT's, in its order, so both libraries build the same ``V``."""
    stacked = torch.cat(matrices, dim=0)
    if stacked.shape[0] < stacked.shape[1]:  # fewer rows than in: no (in, in) R; the right singular vectors
        return torch.linalg.svd(stacked, full_matrices=True)[2].T
    q, r = torch.linalg.qr(stacked)
    dim = r.shape[1]
    t = torch.zeros((dim, dim), dtype=r.dtype)
    start = 0
    for matrix in matrices:
        q_l = q[start : start + matrix.shape[0], :]
        start += matrix.shape[0]
        # Blocks of one role are often highly correlated: the ridge α keeps each inverse stable
        t += torch.linalg.inv(q_l.T @ q_l + regularization_alpha * torch.eye(dim, dtype=r.dtype))
    t /= len(matrices)
    return r.T @ torch.linalg.eigh(t)[1]


def sparse_positions(in_dim: int, sparse_rate: float, generator: torch.Generator) -> torch.Tensor:
    """``(2, nnz)`` rows then columns of ``S``'s trainable entries: ``nnz = min(⌊in² · rate⌋, in² - in)`` (at least
    one when ``rate > 0``) off-diagonal positions, the first ``nnz`` of a ``randperm`` of them in row-major order.

    The ``p``-th off-diagonal position (row-major) is ``(p // (in-1), c + (c >= row))`` with ``c = p % (in-1)``, so
    no ``(in², 2)`` table of candidates is built; the draws are PEFT's (same ``randperm``), and so the positions."""
    off_diagonal = in_dim * in_dim - in_dim
    nnz = min(int(in_dim * in_dim * sparse_rate), off_diagonal)
    if sparse_rate > 0 and off_diagonal > 0:
        nnz = max(1, nnz)
    if not nnz:
        return torch.empty(2, 0, dtype=torch.long)
    picked = torch.randperm(off_diagonal, generator=generator)[:nnz]
    rows, cols = picked // (in_dim - 1), picked % (in_dim - 1)
    cols = cols + (cols >= rows).long()  # skip the diagonal entry of the row
    return torch.stack([rows, cols])


def factor_weight(basis: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``U: (out, in)`` and ``λ0: (in,)`` (float32) with ``weight = U diag(λ0) basisᵀ``, in float64 on the CPU.

    ``B = weight basis⁻ᵀ`` solves ``basis Bᵀ = weightᵀ`` (a pseudo-inverse if ``basis`` is singular); ``λ0`` are
    ``B``'s column norms and ``U`` its normalised columns (a zero column stays zero)."""
    w = weight.detach().to(torch.float64).cpu()
    v = basis.detach().to(torch.float64).cpu()
    try:
        b = torch.linalg.solve(v, w.T).T
    except RuntimeError:  # singular basis (e.g. a zero weight among the role's)
        b = w @ torch.linalg.pinv(v, rtol=1e-6).T
    lambda0 = torch.linalg.norm(b, dim=0)
    u = torch.zeros_like(b)
    nonzero = lambda0 > 1e-12
    u[:, nonzero] = b[:, nonzero] / lambda0[nonzero]
    return u.float(), lambda0.float()


# ---- the layer ----------------------------------------------------------------------------------------------
class FrodLayer(AdapterLayer):
    """FRoD on ``nn.Linear`` or ``transformers``' ``Conv1D`` (see the module docstring).

    Attributes:
        frod_lambda_l: ``adapter -> λ: (in,)``, the diagonal in the shared basis (trained).
        frod_lambda_s_values: ``adapter -> (nnz,)``, the values of the off-diagonal ``S`` (trained).
        frod_U: ``adapter -> U: (out, in)`` frozen, in the base weight's dtype; rebuilt from ``W`` and ``V``, never
            saved.
        frod_V, frod_s_indices, frod_s_size: The model's shared projections, ``adapter -> role -> tensor``
            (references, not submodules: the model owns and saves them).
        category: The role whose projections this layer uses.
        r: Per adapter, PEFT's bookkeeping: ``out``.
        runtime_offload_base_weight: Per adapter, keep the base weight on the CPU while the adapter replaces it.
    """

    adapter_layer_names = ("frod_lambda_l", "frod_lambda_s_values")
    other_param_names = ("r", "frod_U", "frod_dropout", "runtime_offload_base_weight")

    def __init__(self, base_layer: nn.Module, frod_V: nn.ModuleDict, frod_s_indices: nn.ModuleDict,
                 frod_s_size: nn.ModuleDict, category: str) -> None:
        super().__init__(base_layer)
        self.frod_lambda_l = nn.ParameterDict()
        self.frod_lambda_s_values = nn.ParameterDict()
        self.frod_U = BufferDict()
        self.frod_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.runtime_offload_base_weight: dict[str, bool] = {}
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)
        rows, cols = base_layer.weight.shape
        self.out_features, self.in_features = (cols, rows) if self.fan_in_fan_out else (rows, cols)
        self.category = category
        # Plain attributes (bypassing nn.Module registration): the model owns the projections.
        self.__dict__["frod_V"] = frod_V
        self.__dict__["frod_s_indices"] = frod_s_indices
        self.__dict__["frod_s_size"] = frod_s_size
        # W (the (out, in) layout, CPU) before the first merge: every merge adds W'_a - W, the last unmerge
        # restores it exactly
        self._weight_before_merge: torch.Tensor | None = None

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, frod_dropout: float = 0.0, init_weights: bool = True,
                     runtime_offload_base_weight: bool = False) -> None:
        """Create ``λ`` and ``S``'s values for ``adapter_name`` from its shared projections (already in
        ``frod_V[adapter_name]``) and the current weight: ``λ = λ0``, ``S = 0`` (``init_weights=False``: both moved
        by ``N(0, 0.1²)``, PEFT's test init)."""
        self.r[adapter_name] = self.out_features
        self.runtime_offload_base_weight[adapter_name] = runtime_offload_base_weight
        self.frod_dropout[adapter_name] = nn.Dropout(p=frod_dropout) if frod_dropout > 0 else nn.Identity()
        weight = self._weight()
        u, lambda0 = factor_weight(self._basis(adapter_name).to(weight.dtype), weight)
        nnz = self.frod_s_indices[adapter_name][self.category].shape[1]
        self.frod_lambda_l[adapter_name] = nn.Parameter(lambda0)
        self.frod_lambda_s_values[adapter_name] = nn.Parameter(torch.zeros(nnz))
        if not init_weights:
            with torch.no_grad():
                nn.init.normal_(self.frod_lambda_s_values[adapter_name], std=0.1)
                self.frod_lambda_l[adapter_name].add_(torch.randn_like(lambda0) * 0.1)
        self.frod_U.add(adapter_name, u.to(weight.device, weight.dtype), persistent=False)
        self._place_adapter(adapter_name)
        device = next((p.device for n, p in self.frod_lambda_l.items() if n != adapter_name), None)
        if device is not None and device != weight.device:  # an offloaded base weight: join the other adapters
            for container in (self.frod_lambda_l, self.frod_lambda_s_values):
                item = container[adapter_name]
                container[adapter_name] = nn.Parameter(item.data.to(device), requires_grad=item.requires_grad)
            self.frod_U.add(adapter_name, self.frod_U[adapter_name].to(device), persistent=False)
        self.set_adapter(self.active_adapters or [adapter_name])

    def refactor(self, adapter_name: str) -> None:
        """Rebuild ``U`` from the weight before any merge and the adapter's current ``V`` (loaded from a file,
        which may differ from the one built here); ``λ`` and ``S`` stay as they are."""
        weight = self._reference_weight()
        u, _ = factor_weight(self._basis(adapter_name).to(weight.dtype), weight)
        old = self.frod_U[adapter_name]
        self.frod_U.add(adapter_name, u.to(old.device, old.dtype), persistent=False)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """``False``, as PEFT: the adapter replaces the weight (``W' - W`` depends on the base)."""
        return False

    # ---- the pieces --------------------------------------------------------------------------
    def _weight(self) -> torch.Tensor:
        """The base weight ``W: (out, in)`` (``Conv1D``'s transposed), without gradient."""
        weight = self.read_base_weight()
        return weight.T if self.fan_in_fan_out else weight

    def _reference_weight(self) -> torch.Tensor:
        """``W`` before the first merge (the current weight when nothing is merged)."""
        weight = self._weight()
        if self._weight_before_merge is None:
            return weight
        return self._weight_before_merge.to(weight.device, weight.dtype)

    def _basis(self, adapter_name: str) -> torch.Tensor:
        return self.frod_V[adapter_name][self.category]

    def _positions(self, adapter_name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``S``'s rows and columns, ``(nnz,)`` each, on ``device``."""
        indices = self.frod_s_indices[adapter_name][self.category].to(device)
        return indices[0], indices[1]

    def _dropout_on(self, adapter_name: str) -> bool:
        dropout = self.frod_dropout[adapter_name]
        return isinstance(dropout, nn.Dropout) and dropout.training

    def _adapted(self, adapter_name: str, h: torch.Tensor) -> torch.Tensor:
        """``W' h = ((z ⊙ λ) + z Sᵀ) Uᵀ`` with ``z = h V``; ``h: (..., in) -> (..., out)``, in ``λ``'s dtype.

        ``z Sᵀ`` is a sparse product (``S`` as a COO tensor of its ``nnz`` values: the fastest of gather/scatter,
        dense ``S`` and this on the CPU); half precision densifies ``S``, which CUDA's sparse kernels lack."""
        lam, values = self.frod_lambda_l[adapter_name], self.frod_lambda_s_values[adapter_name]
        basis = self._basis(adapter_name).to(lam.device, lam.dtype)
        u = self.frod_U[adapter_name].to(lam.device, lam.dtype)
        z = h.reshape(-1, self.in_features).to(lam.dtype) @ basis  # (tokens, in)
        coords = z * lam
        if values.numel():
            indices = self.frod_s_indices[adapter_name][self.category].to(z.device)
            s = torch.sparse_coo_tensor(indices, values, (self.in_features,) * 2, check_invariants=False).coalesce()
            if z.dtype in (torch.float16, torch.bfloat16):
                coords = coords + z @ s.to_dense().T
            else:
                coords = coords + torch.sparse.mm(s, z.T).T
        return F.linear(coords, u).reshape(*h.shape[:-1], self.out_features)

    def adapted_weight(self, adapter_name: str) -> torch.Tensor:
        """``W' = U (diag(λ) + S) Vᵀ: (out, in)``, in ``λ``'s dtype."""
        lam, values = self.frod_lambda_l[adapter_name], self.frod_lambda_s_values[adapter_name]
        rows, cols = self._positions(adapter_name, lam.device)
        middle = torch.diag(lam).index_put((rows, cols), values, accumulate=True)  # diag(λ) + S
        basis = self._basis(adapter_name).to(lam.device, lam.dtype)
        return self.frod_U[adapter_name].to(lam.device, lam.dtype) @ middle @ basis.T

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if (self.disable_adapters or self.merged) and self._offloading():
            self._move_base_weight(x.device)  # the base layer alone runs
        return super().forward(x, *args, **kwargs)

    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``W' x + b`` for one active adapter without dropout (``W x`` is never computed, as PEFT); otherwise
        ``base(x) + Σ_a (W'_a h_a - W h_a)`` with ``h_a = dropout_a(x)``. ``x: (..., in)``."""
        names = [n for n in self.active_adapters if n in self.frod_lambda_l]
        bias = self.base_layer.bias
        if len(names) == 1 and not self._dropout_on(names[0]):
            if self.runtime_offload_base_weight[names[0]]:
                self._move_base_weight(torch.device("cpu"))
            result = self._adapted(names[0], x)
            return (result if bias is None else result + bias).to(x.dtype)
        if self._offloading():
            self._move_base_weight(x.device)
        result = self.base_layer(x, *args, **kwargs)
        base_out = result if bias is None else result - bias  # W x
        for name in names:
            h = self.frod_dropout[name](x)
            if self._dropout_on(name):
                weight = self._weight()
                base_h = F.linear(h.to(weight.dtype), weight)  # W h on the dropped input
            else:
                base_h = base_out
            result = result + self._adapted(name, h) - base_h
        return result.to(x.dtype)

    # ---- runtime offload of the base weight -------------------------------------------------------
    def _offloading(self) -> bool:
        return any(self.runtime_offload_base_weight.values())

    def _move_base_weight(self, device: torch.device) -> None:
        """Put the base weight (and its gradient) on ``device`` if it is not there (runtime offload only moves it
        between the CPU and the adapter's device)."""
        weight = self.base_layer.weight
        if weight.is_meta or weight.device == device:
            return
        weight.data = weight.data.to(device)
        if weight.grad is not None:
            weight.grad = weight.grad.to(device)

    def _adapter_device(self) -> torch.device | None:
        return next((p.device for p in self.frod_lambda_l.values()), None)

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        if self._offloading():  # model.to(device) moves everything; the offloaded weight goes back to the CPU
            self._move_base_weight(torch.device("cpu"))
        return result

    # ---- merging -----------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        device = self._adapter_device()
        if device is not None:  # an offloaded weight comes back before it is written
            self._move_base_weight(device)
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unloaded(self, merge: bool, adapter_names: list[str] | None = None) -> nn.Module:
        device = self._adapter_device()
        if device is not None:  # the plain layer handed back lives with the rest of the model
            self._move_base_weight(device)
        return super().unloaded(merge, adapter_names)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``W' - W`` (``W`` before the first merge), shaped like ``base_layer.weight`` (transposed for
        ``Conv1D``)."""
        delta = self.adapted_weight(adapter_name) - self._reference_weight().to(self.frod_lambda_l[adapter_name])
        return delta.T if self.fan_in_fan_out else delta

    def merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``weight + W'_a - W``; the first merge keeps ``W`` (on the CPU, as PEFT)."""
        if self._weight_before_merge is None:
            w = weight.T if self.fan_in_fan_out else weight
            self._weight_before_merge = w.detach().to("cpu", copy=True)
        return weight + self.get_delta_weight(adapter_name).to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``weight - (W'_a - W)``; the last unmerge gives ``W`` back exactly."""
        if self._weight_before_merge is not None and not self.merged_adapters:  # unmerge() popped the last one
            w0 = self._weight_before_merge
            self._weight_before_merge = None
            w0 = w0.to(weight.device, weight.dtype)
            return w0.T if self.fan_in_fan_out else w0
        return weight - self.get_delta_weight(adapter_name).to(weight.dtype)

    def _forget_merge_state(self, adapter_name: str) -> None:
        if not self.merged_adapters:  # a check or an export computed a merge that did not happen
            self._weight_before_merge = None


def supported_types() -> tuple[type, ...]:
    return (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
