"""AdaMSS layers: low-rank updates in clustered subspaces of the weight's singular directions (Zheng et al., 2025,
"AdaMSS: Adaptive Multi-Subspace Approach for Parameter-Efficient Fine-Tuning"; PEFT's ``adamss``).

For a base ``W: (out, in)`` with bias ``b`` write ``W̃ = [W | b]: (out, n)``, ``n = in + 1`` (``n = in`` without a
bias) and ``x̃ = [x; 1]``. At creation (frozen afterwards)::

    W̃ ≈ U S V                 randomised SVD of rank R = min(r, out, n): U: (out, R), V: (R, n)
    S_1 ... S_K                K-means clusters of the rows of U (K = min(num_subspaces, out)): a partition of
                               the output rows, |S_k| rows each
    A_k = Qᵀ,  Q R' = qr(U[S_k]ᵀ E_k)    E_k: top r_k eigenvectors of U[S_k] U[S_k]ᵀ; A_k: (r_k, R)
    B_k = 0                    (|S_k|, r_k); r_k = min(|S_k|, subspace_rank) (or the count of large singular
                               values with use_dynamic_rank)

and the layer computes (``y[S_k]``: the rows of the output in cluster ``k``)::

    y = W x + b + Δ(x̃),   Δ(x̃)[S_k] = B_k A_k V x̃         (x: (..., in), y: (..., out))
    ΔW̃[S_k] = B_k A_k V                                       (|S_k|, n): the update of [W | b]

So each cluster of output rows learns a rank-``r_k`` update inside the span of the top singular directions ``V``;
only ``A_k`` and ``B_k`` train (``Σ_k r_k (R + |S_k|)`` values). Here the K products are one chain of three
matmuls: ``A = [A_1; ...; A_K]: (Σ r_k, R)`` and ``B: (out, Σ r_k)``, ``B[S_k]`` holding ``B_k`` in its own columns
(zeros elsewhere), so ``Δ = B A V x̃`` (PEFT loops over the subspaces and scatters; the numbers are the same).

Tensor names are PEFT's, so files cross: ``adamss_A.<k>: (r_k, R)`` and ``adamss_B.<k>: (|S_k|, r_k)`` (trained),
``adamss_newB: (R, n)`` (= ``V``, a saved buffer). The clusters are not in the file: they are rebuilt from ``W``
(seeded SVD, :func:`deltatune.adamss.kmeans.cluster_rows` = scikit-learn's K-means), as PEFT rebuilds them.

Merging adds ``ΔW̃[:, :in]`` to ``W`` and ``ΔW̃[:, in]`` to ``b`` (PEFT's). Besides PEFT's ``nn.Linear``,
transformers' ``Conv1D`` (GPT-2; ``W`` stored ``(in, out)``) is adapted too, with the same tensors: such a file
does not load in PEFT.

ASA (adaptive subspace allocation, :mod:`deltatune.adamss.asa`) keeps per subspace the EMAs of the importance
``|p ⊙ ∇p|`` of ``A_k``, ``B_k`` and of its uncertainty, and freezes the least important subspaces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.adamss.config import AdamssConfig
from deltatune.adamss.kmeans import cluster_rows
from deltatune.core.buffers import BufferDict
from deltatune.core.layer import AdapterLayer

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None

KMEANS_ITERATIONS = 10  # PEFT's clustering_Z(..., iternum=10)
KMEANS_SEED = 123456789  # PEFT's KMeans random_state


def seeded_svd(matrix: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``slice_pca``: ``torch.svd_lowrank(matrix, q=rank, niter=2)`` with the generator of ``matrix``'s device
    seeded by ``seed`` inside a fork (the caller's random stream is left as it was). Returns ``U: (out, rank)`` and
    ``V: (rank, n)`` (``Vᵀ`` of torch's result)."""
    device = matrix.device
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            u, _, v = torch.svd_lowrank(matrix, q=rank, niter=2)
    else:
        with torch.random.fork_rng(devices=[device], device_type=device.type):
            torch.manual_seed(seed)
            u, _, v = torch.svd_lowrank(matrix, q=rank, niter=2)
    return u[:, :rank], v[:, :rank].T


class AdamssLayer(AdapterLayer):
    """AdaMSS on ``nn.Linear`` and transformers' ``Conv1D``.

    Attributes:
        adamss_A, adamss_B: ``adapter -> ParameterList`` of the ``K`` factors ``A_k: (r_k, R)``, ``B_k: (|S_k|, r_k)``.
        adamss_newB: ``adapter -> V: (R, n)`` (frozen, saved).
        num_subspaces: ``adapter -> K``; ``seg_result``: ``adapter -> {k: rows of S_k}``;
        train_subspace_index: ``adapter -> [0, ..., K-1]`` (PEFT's); ``scatter_index``: ``adapter -> (out,)`` the
            output row of each entry of ``[B_1 A_1 V x̃; ...; B_K A_K V x̃]``.
        exp_avg_ipt_A/B, exp_avg_unc_A/B: ``adapter -> [K tensors or None]``, ASA's EMAs (``use_asa`` only).
        asa_active: ``adapter -> [K bools]``: subspaces ASA keeps trainable (``use_asa`` only).
        asa_config: ``adapter -> AdamssConfig`` (``use_asa`` only): the schedule, for a callback that holds the
            base model rather than the ``PeftModel`` (``AdapterTrainer`` trains the base model).
    """

    adapter_layer_names = ("adamss_A", "adamss_B")
    other_param_names = ("num_subspaces", "train_subspace_index", "seg_result", "scatter_index", "exp_avg_ipt_A",
                         "exp_avg_ipt_B", "exp_avg_unc_A", "exp_avg_unc_B", "adamss_newB", "asa_active", "asa_config")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adamss_A = nn.ModuleDict()
        self.adamss_B = nn.ModuleDict()
        self.adamss_newB = BufferDict(persistent=True)
        self.num_subspaces: dict[str, int] = {}
        self.train_subspace_index: dict[str, list[int]] = {}
        self.seg_result: dict[str, dict[int, torch.Tensor]] = {}
        self.scatter_index: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt_A: dict[str, list[torch.Tensor | None]] = {}
        self.exp_avg_ipt_B: dict[str, list[torch.Tensor | None]] = {}
        self.exp_avg_unc_A: dict[str, list[torch.Tensor | None]] = {}
        self.exp_avg_unc_B: dict[str, list[torch.Tensor | None]] = {}
        self.asa_active: dict[str, list[bool]] = {}
        self.asa_config: dict[str, AdamssConfig] = {}
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """The update is additive (``W' = W + ΔW``, ``b' = b + Δb``), so plain LoRA (with ``lora_bias``) holds it."""
        return True

    @property
    def float_dtype(self) -> torch.dtype:
        """The base weight's dtype, or its compute dtype (float32 if none) for a quantised base."""
        weight = self.base_layer.weight
        return weight.dtype if weight.is_floating_point() else getattr(self.base_layer, "compute_dtype", None) \
            or torch.float32

    # ---- ASA's statistics (PEFT's layer methods; the schedule and the masks: deltatune.adamss.asa) ---------------
    def update_importance(self, adapter_name: str, importance_beta: float = 0.85,
                          uncertainty_beta: float = 0.85) -> None:
        """The EMAs of ``I = |p ⊙ ∇p|`` and of ``|I - Ī|`` (the uncertainty first, against the previous ``Ī``) for
        every ``A_k``/``B_k`` of ``adapter_name`` that has a gradient; statistics start at zero."""
        if adapter_name not in self.exp_avg_ipt_A or adapter_name not in self.adamss_A:
            return
        for params, ipt, unc in ((self.adamss_A[adapter_name], self.exp_avg_ipt_A[adapter_name],
                                  self.exp_avg_unc_A[adapter_name]),
                                 (self.adamss_B[adapter_name], self.exp_avg_ipt_B[adapter_name],
                                  self.exp_avg_unc_B[adapter_name])):
            for i in range(self.num_subspaces[adapter_name]):
                p = params[i]
                if p.grad is None:
                    continue
                if ipt[i] is None:
                    ipt[i], unc[i] = torch.zeros_like(p, requires_grad=False), torch.zeros_like(p, requires_grad=False)
                with torch.no_grad():
                    current = (p * p.grad).abs()
                    unc[i].mul_(uncertainty_beta).add_((current - ipt[i]).abs(), alpha=1 - uncertainty_beta)
                    ipt[i].mul_(importance_beta).add_(current, alpha=1 - importance_beta)

    def reset_importance(self, adapter_name: str) -> None:
        """Forget the statistics (after each pruning: the next window starts afresh)."""
        if adapter_name in self.exp_avg_ipt_A:
            n = len(self.exp_avg_ipt_A[adapter_name])
            for stats in (self.exp_avg_ipt_A, self.exp_avg_ipt_B, self.exp_avg_unc_A, self.exp_avg_unc_B):
                stats[adapter_name] = [None] * n

    # ---- creating an adapter -----------------------------------------------------------------
    def _weight_with_bias(self) -> torch.Tensor:
        """``W̃ = [W | b]: (out, n)`` in float32 (``W`` alone without a bias)."""
        weight = self.read_base_weight()
        weight = weight.T if self.fan_in_fan_out else weight
        bias = self.bias
        if bias is not None:
            weight = torch.cat((weight, bias.detach().unsqueeze(1).to(weight.dtype)), dim=1)
        return weight.to(torch.float32)

    def update_layer(self, adapter_name: str, config: AdamssConfig) -> None:
        """Create adapter ``adapter_name``: the seeded SVD, the clusters, ``A_k`` by QR and ``B_k`` (PEFT's
        ``update_layer``, the random draws in its order: one ``svd_lowrank`` per subspace (two with
        ``use_dynamic_rank``), then ``B_k``'s draw when ``init_weights`` is ``None``)."""
        weight = self._weight_with_bias()
        dtype, device = self.float_dtype, weight.device
        rank = min(config.r, *weight.shape)
        u, v = seeded_svd(weight, rank, config.random_seed)
        k = min(config.num_subspaces, u.shape[0])
        labels = torch.from_numpy(cluster_rows(u.detach().cpu().numpy(), k, KMEANS_ITERATIONS, KMEANS_SEED))
        seg = {i: torch.where(labels == i)[0] for i in range(int(labels.max()) + 1)}
        a_list, b_list = [], []
        for i in range(k):
            rows = seg[i].to(device)
            sub = u[rows, :rank]  # (|S_k|, R)
            gram = sub @ sub.T
            if config.use_dynamic_rank:
                _, s_row, _ = torch.svd_lowrank(gram, q=min(gram.shape), niter=2)
                r_k = min(int((s_row > config.svd_threshold * s_row[0]).sum()), config.subspace_rank, len(s_row))
            else:
                r_k = min(len(rows), config.subspace_rank)
            r_k = max(r_k, 1)
            e, _, _ = torch.svd_lowrank(gram, q=min(gram.shape[0], r_k), niter=2)
            q, _ = torch.linalg.qr(sub.T @ e[:, :r_k], mode="reduced")  # (R, r_k)
            if config.init_weights == "orthogonal":
                b = torch.zeros(len(rows), r_k, dtype=dtype, device=device)  # the identity at init
            else:
                b = torch.randn(len(rows), r_k, dtype=dtype, device=device) * 0.01
            a_list.append(nn.Parameter(q.T.contiguous().to(dtype)))
            b_list.append(nn.Parameter(b.to(dtype)))
        self.num_subspaces[adapter_name] = k
        self.train_subspace_index[adapter_name] = list(range(k))
        self.seg_result[adapter_name] = seg
        self.scatter_index[adapter_name] = torch.cat([seg[i] for i in range(k)]).long()
        self.adamss_newB[adapter_name] = v.detach().to(dtype)
        self.adamss_A[adapter_name] = nn.ParameterList(a_list)
        self.adamss_B[adapter_name] = nn.ParameterList(b_list)
        if config.use_asa:
            for stats in (self.exp_avg_ipt_A, self.exp_avg_ipt_B, self.exp_avg_unc_A, self.exp_avg_unc_B):
                stats[adapter_name] = [None] * k
            self.asa_active[adapter_name] = [True] * k
            self.asa_config[adapter_name] = config
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    # ---- ASA's masks survive switching ----------------------------------------------------------
    def set_adapter(self, adapter_names: str | list[str], trainable: bool = True) -> None:
        super().set_adapter(adapter_names, trainable)
        self._apply_asa_masks()

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad)
        self._apply_asa_masks()

    def _apply_asa_masks(self) -> None:
        """Subspaces ASA pruned stay frozen whatever switches the adapter's gradients back on (PEFT's
        ``set_adapter`` would train them again)."""
        for name, active in self.asa_active.items():
            if name not in self.adamss_A:
                continue
            for i, keep in enumerate(active):
                if not keep:
                    self.adamss_A[name][i].requires_grad_(False)
                    self.adamss_B[name][i].requires_grad_(False)

    # ---- the update --------------------------------------------------------------------------
    def _factors(self, adapter_name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B: (out, Σ r_k), A: (Σ r_k, R), V: (R, n))`` in ``dtype``: ``B[S_k]`` holds ``B_k`` in the columns of
        ``A_k`` (the output rows ordered back from the clusters' order)."""
        a = torch.cat([p.to(dtype) for p in self.adamss_A[adapter_name]], dim=0)
        stacked = torch.block_diag(*[p.to(dtype) for p in self.adamss_B[adapter_name]])  # rows in cluster order
        scatter = self.scatter_index[adapter_name].to(stacked.device)
        order = torch.empty_like(scatter)
        order[scatter] = torch.arange(scatter.numel(), device=scatter.device)  # output row -> stacked row
        b = stacked.index_select(0, order)
        return b, a, self.adamss_newB[adapter_name].to(dtype)

    def _delta_with_bias(self, adapter_name: str) -> torch.Tensor:
        """``ΔW̃ = B A V: (out, n)``: the update of ``[W | b]`` (float32 for a half-precision base on the CPU, as
        PEFT merges)."""
        dtype = self.float_dtype
        if self.base_layer.weight.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        b, a, v = self._factors(adapter_name, dtype)
        return b @ (a @ v)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW``: the weight columns of ``ΔW̃``, shaped like ``base_layer.weight`` (``(in, out)`` for ``Conv1D``)."""
        delta = self._delta_with_bias(adapter_name)[:, : self.in_features]
        delta = delta.T if self.fan_in_fan_out else delta
        return delta.to(self.float_dtype)

    def get_delta_bias(self, adapter_name: str) -> torch.Tensor:
        """``Δb``: the last column of ``ΔW̃`` (zeros without a bias), PEFT's ``get_delta_bias``."""
        if self.bias is None:
            return torch.zeros(self.out_features, dtype=self.float_dtype, device=self.base_layer.weight.device)
        return self._delta_with_bias(adapter_name)[:, self.in_features].to(self.float_dtype)

    def merged_bias(self, bias: torch.Tensor | None, adapter_name: str) -> torch.Tensor | None:
        return None if bias is None else bias + self.get_delta_bias(adapter_name).to(bias.dtype)

    def _merge_bias(self, adapter_name: str, sign: int) -> None:
        if self.bias is not None:
            self.bias.data += sign * self.get_delta_bias(adapter_name).to(self.bias.dtype)

    # ---- forward -----------------------------------------------------------------------------
    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + Σ_active B A V x̃``; ``V x̃ = V[:, :in] x + V[:, in]`` (no concatenation of a ones column).
        Computed in the base weight's dtype, as PEFT. ``x: (..., in)`` -> ``(..., out)``."""
        previous = x.dtype
        x = x.to(self.float_dtype) if self.cast_input_dtype_enabled else x
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name not in self.adamss_A:
                continue
            b, a, v = self._factors(name, x.dtype)
            bias = v[:, self.in_features] if self.bias is not None else None
            projected = F.linear(x, v[:, : self.in_features], bias)  # (..., R)
            result = result + F.linear(F.linear(projected, a), b)  # (..., Σ r_k) -> (..., out)
        return result.to(previous)


def make_adamss_layer(target: nn.Module) -> AdamssLayer | None:
    """The AdaMSS wrapper for ``target``, or ``None`` if AdaMSS cannot adapt its type."""
    return AdamssLayer(target) if isinstance(target, supported_types()) else None


def supported_types() -> tuple[type, ...]:
    return (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
