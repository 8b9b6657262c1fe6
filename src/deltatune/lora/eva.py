"""EVA, Explained Variance Adaptation (Paischer et al., 2024, https://arxiv.org/abs/2410.07170): LoRA's ``A``
from the principal directions of each adapted layer's inputs on a calibration set, ranks shared out by explained
variance.

For a layer ``W: (out, in)`` with inputs ``X: (N, in)`` (every unmasked token of the calibration batches), the
right singular vectors of the centred ``X`` are the directions the layer's inputs vary most along. EVA sets

* ``A = V_k^T: (k, in)``, the top ``k`` of them (optionally whitened, ``A_i /= sqrt(s_i)``), and ``B = 0``, so
  the adapted model starts equal to the base;
* ``k`` per layer from one budget ``sum_l r_l``: every layer offers its first ``round(rho r_l)`` components, each
  worth its explained-variance ratio ``s_i^2 / sum_j ||X_j - mean_j||^2``; the budget's largest ratios win. A
  layer may so end with any rank in ``0 .. rho r_l``; rank 0 drops its adapter. With ``adjust_scaling_factors``
  the layer's ``lora_alpha`` follows its rank (``alpha k / r``), keeping ``alpha / r`` (the update's scale).

``X`` is too large to hold for a real calibration set, so the SVD is built batch by batch
(:class:`IncrementalSVD`, Ross et al. 2008) until, for every layer, the components it needs point where they
did one batch earlier (cosine similarity ``>= tau``). Layers that see the very same input (Llama's
``q/k/v_proj``, ``gate/up_proj``) share one SVD.

The results are PEFT 0.21's: :func:`get_eva_state_dict` and :func:`initialize_lora_eva_weights` have its names,
arguments and numbers (same randomised SVD, seed and stopping rule), and the initialised adapter's
``rank_pattern``/``alpha_pattern``/``target_modules`` are what PEFT writes, so it loads in PEFT and back.
Where deltatune differs, it is more lenient: a state dict computed on the plain base model (names without
``base_model.model.``) loads too; batches with too few unmasked tokens, or components that never settle, end
with a :class:`~deltatune.errors.ConfigError` instead of a loop that never ends; whitening divides each
layer's components once (PEFT 0.21 divides a group of layers that share an input again for each member).
"""

from __future__ import annotations

import hashlib
import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from deltatune.errors import ConfigError

# A batch stream that has not settled after this many forward passes will not: stop and say what to change.
MAX_SVD_STEPS = 1000
# PEFT's: with at least this many adapted modules, target_modules is saved as the shortest distinguishing suffixes.
MIN_TARGETS_TO_CONDENSE = 20
_PREFIX = "base_model.model."


@dataclass
class EvaConfig:
    """PEFT's ``EvaConfig`` (``LoraConfig.eva_config`` takes it, or the dict PEFT saves).

    Args:
        rho: A layer may get up to ``round(rho r)`` ranks (``>= 1``; 1 = no redistribution).
        tau: A component has converged when its cosine similarity to the previous step's is ``>= tau``.
        use_label_mask: Leave out tokens whose label is ``label_mask_value`` (prompts, padding).
        label_mask_value: The ignored label.
        whiten: Divide each component by the square root of its singular value.
        adjust_scaling_factors: ``lora_alpha`` follows the new rank (``alpha k / r``), keeping the scale.
    """

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        if self.rho < 1.0:
            raise ConfigError(f"EvaConfig.rho must be >= 1.0 (the largest rank is rho * r), got {self.rho}")
        if not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"EvaConfig.tau is a cosine similarity threshold in [0, 1], got {self.tau}")


def as_eva_config(value: Any, init_lora_weights: Any = "eva") -> EvaConfig | None:
    """``LoraConfig.eva_config`` as an :class:`EvaConfig`, as PEFT converts it: a dict (as ``adapter_config.json``
    holds it; keys EvaConfig does not take are dropped, as PEFT does), the dataclass (ours or PEFT's), or ``None``
    (PEFT's default, with its warning, when the init is ``"eva"``).

    Raises:
        ConfigError: a value that is none of these, or one EvaConfig rejects (``rho < 1``, ``tau`` outside [0, 1]).
    """
    from deltatune.lora.init import as_init_config

    return as_init_config(value, init_lora_weights, "eva", EvaConfig, "EVA")


def eva_config_of(config: Any) -> EvaConfig:
    """``config.eva_config`` as an :class:`EvaConfig` (converted and stored back if it is not one yet)."""
    value = getattr(config, "eva_config", None)
    if not isinstance(value, EvaConfig):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LoraConfig warned when it was built
            value = as_eva_config(value)
        config.eva_config = value
    return value


# ---- the incremental SVD ----------------------------------------------------------------------------------------
class IncrementalSVD:
    """The top ``k`` principal directions of rows that arrive in batches (incremental PCA, Ross et al. 2008, as
    scikit-learn's ``IncrementalPCA``), with PEFT's numerics: a randomised SVD (``torch.svd_lowrank``,
    ``q = 2k``, 4 power iterations, seed 42) and each direction's sign fixed by its largest entry.

    After a batch ``X: (n, d)``, the SVD of

        [ diag(S) V^T        ]   (k, d)  what the previous batches kept
        [ X - mean(X)        ]   (n, d)
        [ sqrt(m n / (m + n)) (mean_old - mean(X)) ]   (1, d)  the shift between the two means

    (``m`` rows seen before) gives the new ``S, V`` of all ``m + n`` rows about their joint mean (the first batch is
    simply centred). The per-feature mean and sum of squares about it are kept exactly (Chan et al.'s update, in
    float64), for the explained-variance ratio ``s_i^2 / sum_j M2_j``.

    Attributes:
        components: ``(k, d)`` the directions, rows of ``V^T`` (``None`` before the first batch).
        singular_values: ``(k,)``.
        explained_variance_ratio: ``(k,)``.
    """

    def __init__(self, n_components: int, seed: int = 42, power_iterations: int = 4) -> None:
        self.n_components = n_components
        self.oversampled = 2 * n_components
        self.seed = seed
        self.power_iterations = power_iterations
        self.components: torch.Tensor | None = None
        self.singular_values: torch.Tensor | None = None
        self.explained_variance_ratio: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None  # (d,) float64
        self.sum_sq: torch.Tensor | None = None  # (d,) float64, sum over rows of (x - mean)^2
        self.n_seen = 0

    def update(self, x: torch.Tensor) -> None:
        """Fold the rows ``x: (n, d)`` in (``n >= k``)."""
        x = x.to(torch.float32, copy=True)
        n = x.shape[0]
        batch_sum = x.sum(0, dtype=torch.float64)
        dev = x - batch_sum / n  # float64
        # sum of squares about the batch mean, minus the rounding error of that mean (a two-pass correction)
        batch_sq = dev.square().sum(0) - dev.sum(0).square() / n
        total = self.n_seen + n
        if self.components is None:
            mean, sum_sq = batch_sum / n, batch_sq
            stacked = x.sub_(mean)  # centred, kept in float32 (as PEFT: the first SVD runs in float32)
        else:
            old_mean = self.mean
            mean = (old_mean * self.n_seen + batch_sum) / total
            sum_sq = self.sum_sq + batch_sq + (old_mean - batch_sum / n).square() * (self.n_seen * n / total)
            batch_mean = x.mean(0)
            correction = (self.n_seen * n / total) ** 0.5 * (old_mean - batch_mean)  # (d,) float64
            stacked = torch.cat([self.singular_values[:, None] * self.components, x - batch_mean, correction[None]])
        _, s, vt = self._svd(stacked)
        self.components = vt[: self.n_components]
        self.singular_values = s[: self.n_components]
        self.explained_variance_ratio = (s.square() / sum_sq.sum())[: self.n_components]
        self.mean, self.sum_sq, self.n_seen = mean, sum_sq, total

    def _svd(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``U, S, V^T`` of ``m`` by the seeded randomised SVD; each row of ``V^T`` signed so that its largest
        entry is positive (the SVD alone fixes a direction only up to sign)."""
        devices = [m.device.index or 0] if m.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            u, s, v = torch.svd_lowrank(m, q=self.oversampled, niter=self.power_iterations)
        vt = v.mH
        signs = torch.sign(vt.gather(1, vt.abs().argmax(1, keepdim=True)))  # (q, 1)
        return u * signs.T, s, vt * signs


# ---- what each layer's SVD sees ---------------------------------------------------------------------------------
def forward_fn_dict(model: nn.Module, inputs: Mapping[str, Any]) -> Any:
    """PEFT's default ``forward_fn``: ``model(**inputs)``."""
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: Mapping[str, torch.Tensor], peft_config: Any
                                              ) -> torch.Tensor:
    """The ``(batch, position)`` pairs whose activations EVA uses: ``(N, 2)`` indices of the tokens that are not
    padding (``attention_mask``) and, with ``eva_config.use_label_mask``, whose label is not
    ``label_mask_value`` (token labels ``(B, T)`` only; class ids ``(B,)`` mask nothing)."""
    if not isinstance(model_input, Mapping):
        raise ConfigError("prepare_model_inputs_fn_language_modeling needs dict batches (input_ids, attention_mask, "
                          f"labels), got {type(model_input).__name__}; pass prepare_model_inputs_fn=None")
    ids = model_input["input_ids"]
    mask = model_input.get("attention_mask", torch.ones_like(ids)).bool()
    settings = eva_config_of(peft_config)
    labels = model_input.get("labels")
    if settings.use_label_mask and labels is not None and labels.shape == mask.shape:
        mask = mask & (labels != settings.label_mask_value)
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(layer_input: Any, model_input: torch.Tensor, layer_name: str
                                              ) -> torch.Tensor:
    """``(N, in)``: the layer's input ``(B, T, in)`` at the ``(N, 2)`` positions that
    :func:`prepare_model_inputs_fn_language_modeling` kept."""
    x = _first_tensor(layer_input, layer_name)
    return x[model_input[:, 0], model_input[:, 1]]


def _flatten_layer_input(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    """The input for ``prepare_layer_inputs_fn=None``: every position, ``(..., in)`` flattened to ``(N, in)``."""
    x = _first_tensor(layer_input, layer_name)
    return x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x


def _first_tensor(layer_input: Any, layer_name: str) -> torch.Tensor:
    if isinstance(layer_input, (tuple, list)) and layer_input:
        layer_input = layer_input[0]
    if not isinstance(layer_input, torch.Tensor):
        raise ConfigError(f"EVA: the input of {layer_name} is a {type(layer_input).__name__}, not a tensor; pass a "
                          "prepare_layer_inputs_fn that returns its (N, in) activations")
    return layer_input


def _gather(x: torch.Tensor) -> torch.Tensor:
    """``x: (n_rank, d)`` of every process, concatenated in rank order (shapes may differ by rank)."""
    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class _LayerInputs:
    """Forward hook on one adapted layer: turns its input into rows ``(N, in)`` (``prepare``), then either
    fingerprints them (first batch: which layers share an input) or folds them into the layer's SVD and tracks which
    components have settled (``converged[i]``: cosine similarity to the previous step's component ``>= tau``)."""

    def __init__(self, name: str, prepare: Callable, gather: bool) -> None:
        self.name = name
        self.prepare = prepare
        self.gather = gather
        self.model_input: Any = None
        self.fingerprint: str | None = None
        self.svd: IncrementalSVD | None = None
        self.tau = 1.0
        self.converged = torch.zeros(0, dtype=torch.bool)

    def start_svd(self, n_components: int, tau: float) -> None:
        self.svd = IncrementalSVD(n_components)
        self.tau = tau
        self.converged = torch.zeros(n_components, dtype=torch.bool)

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        rows = self.prepare(args, self.model_input, self.name)
        if self.gather and dist.is_available() and dist.is_initialized():
            rows = _gather(rows)
        if self.svd is None:
            data = rows.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            self.fingerprint = f"{tuple(rows.shape)}:{hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()}"
            return
        if rows.shape[0] < self.svd.n_components:
            return  # too few rows for k components: this batch is skipped for this layer (as PEFT)
        before = self.svd.components
        self.svd.update(rows.float())
        if before is not None:
            self.converged = F.cosine_similarity(self.svd.components, before, dim=1).cpu() >= self.tau


def _redistribute(ratios: dict[str, torch.Tensor], offered: dict[str, int], budget: int,
                  shares_with: dict[str, str]) -> dict[str, int]:
    """Ranks per layer: the ``budget`` largest explained-variance ratios among each layer's first ``offered``
    components, counted by layer (0 for a layer that wins none). A layer reading another's SVD (``shares_with``)
    has the same ratios; when the budget splits such a tie, the layer that owns the SVD keeps the larger count."""
    names, values = [], []
    for name, ratio in ratios.items():
        part = ratio[: offered[name]]
        names += [name] * len(part)
        values.append(part)
    order = torch.cat(values).argsort(descending=True)[:budget].tolist()
    ranks = dict.fromkeys(ratios, 0)
    for i in order:
        ranks[names[i]] += 1
    for name, owner in shares_with.items():
        if ranks[owner] < ranks[name]:
            ranks[owner], ranks[name] = ranks[name], ranks[owner]
    return ranks


# ---- the public functions ---------------------------------------------------------------------------------------
def _unsupported_layer_types() -> tuple[type, ...]:
    from deltatune.lora.layer import LoraConv, LoraEmbedding
    from deltatune.lora.mha import LoraMultiheadAttention

    return LoraEmbedding, LoraConv, LoraMultiheadAttention


def _eva_targets(model: nn.Module, config: Any, adapter_name: str, is_peft: bool) -> list[str]:
    """Names of the layers EVA initialises: in a PeftModel, its LoRA Linear layers holding ``adapter_name``; in a
    plain model, the Linear/Conv1D modules ``config`` targets (the architecture's defaults, ``all-linear``)."""
    from deltatune.lora.layer import LoraLayer

    if is_peft:
        skip = _unsupported_layer_types()
        return [n for n, m in model.named_modules()
                if isinstance(m, LoraLayer) and adapter_name in m.r and not isinstance(m, skip)]
    from deltatune.core import targeting

    resolved = deepcopy(config)
    targeting.resolve_target_modules(model, resolved, targeting.DEFAULT_LORA_TARGETS)
    linear = targeting._linear_types()
    return [n for n, m in model.named_modules() if n and isinstance(m, linear) and targeting.is_target(n, resolved)]


def _model_device(model: nn.Module) -> torch.device | None:
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    return next(iter(devices)) if len(devices) == 1 else None


def _to_device(inputs: Any, device: torch.device | None) -> Any:
    if device is None:
        return inputs
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _to_device(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    return inputs


@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable,
    peft_config: Any = None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """EVA's ``A`` for every layer to adapt: ``{module name: (k, in)}`` (``k`` may be 0), as PEFT's function.

    Args:
        model: A ``PeftModel`` (its adapters are disabled while this runs) or the plain model with ``peft_config``.
        dataloader: Batches, re-read in a cycle until the SVDs settle (needs ``len``; a generator is read into a
            list first).
        peft_config: The ``LoraConfig`` (default: ``model.peft_config[adapter_name]``).
        forward_fn: ``(model, batch) -> Any``; default ``model(**batch)``.
        prepare_model_inputs_fn: ``(batch, peft_config) -> x`` handed to every layer's ``prepare_layer_inputs_fn``;
            the default gives the ``(N, 2)`` positions of unpadded (and, with ``use_label_mask``, labelled) tokens.
            ``None``: a copy of the batch.
        prepare_layer_inputs_fn: ``(layer_input, x, layer_name) -> (N, in)``, one for all layers or a dict by
            layer name; the default picks the positions above. ``None``: every position.
        adapter_name: The adapter whose config and layers to use, for a ``PeftModel``.
        gather_distributed_inputs: Under ``torch.distributed``, run the SVD on every process's rows.
        show_progress_bar: A tqdm bar of converged layers.

    Returns:
        ``{name: A}`` with ``A: (k, in)`` float, in the order PEFT gives (layers owning an SVD, then the layers
        that share one). Names are ``model``'s module names.

    Raises:
        ConfigError: no config, no batches, ``round(rho r)`` above a layer's input size, batches with too few
            usable tokens, or components that do not settle in ``MAX_SVD_STEPS`` batches.
    """
    is_peft = hasattr(model, "peft_config")
    if peft_config is None:
        if not is_peft:
            raise ConfigError("get_eva_state_dict needs peft_config (the LoraConfig) for a model that is not a "
                              "PeftModel")
        peft_config = model.peft_config[adapter_name]
    settings = eva_config_of(peft_config)
    batches = dataloader if hasattr(dataloader, "__len__") else list(dataloader)
    if len(batches) == 0:
        raise ConfigError("EVA needs at least one batch of calibration data; the dataloader is empty")
    if dist.is_available() and dist.is_initialized() and gather_distributed_inputs:
        warnings.warn("torch.distributed is initialised and gather_distributed_inputs=True: EVA gathers every "
                      "process's layer inputs; give each process different batches", stacklevel=2)
    targets = _eva_targets(model, peft_config, adapter_name, is_peft)
    if not targets:
        raise ConfigError("EVA found no Linear layer to initialise; check target_modules")
    context = model.disable_adapter() if is_peft else nullcontext()
    with context:
        return _collect(model, batches, peft_config, settings, targets, forward_fn, prepare_model_inputs_fn,
                        prepare_layer_inputs_fn, gather_distributed_inputs, show_progress_bar)


def _collect(model: nn.Module, batches: Iterable, config: Any, settings: EvaConfig, targets: list[str],
             forward_fn: Callable | None, prepare_model_inputs_fn: Callable | None,
             prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None, gather: bool,
             show_progress_bar: bool) -> dict[str, torch.Tensor]:
    forward_fn = forward_fn or forward_fn_dict
    rho = settings.rho
    if rho > 1000:  # "no cap": PEFT limits it to what the largest weight could hold
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // config.r)
    if isinstance(prepare_layer_inputs_fn, Mapping):
        unknown = sorted(set(prepare_layer_inputs_fn) - set(targets))
        if unknown:
            raise ConfigError(f"prepare_layer_inputs_fn names layers that EVA does not initialise: {unknown}; "
                              f"EVA's layers are e.g. {targets[:3]}")
    modules = dict(model.named_modules())
    hooks: dict[str, _LayerInputs] = {}
    offered: dict[str, int] = {}
    budget = 0
    for name in targets:
        fn = (prepare_layer_inputs_fn.get(name) if isinstance(prepare_layer_inputs_fn, Mapping)
              else prepare_layer_inputs_fn) or _flatten_layer_input
        hooks[name] = _LayerInputs(name, fn, gather)
        rank = config.rank_for(name)
        offered[name] = round(rank * rho)
        budget += rank
        in_features = getattr(modules[name], "in_features", None)
        if in_features is not None and offered[name] > in_features:
            raise ConfigError(f"EVA: {name} would offer round(rho * r) = {offered[name]} components but its input "
                              f"has only {in_features} features; lower eva_config rho or r")

    device = _model_device(model)
    training = model.training
    model.eval()
    handles: dict[str, Any] = {}

    def feed(batch: Any) -> Any:
        batch = _to_device(batch, device)
        hook_input = prepare_model_inputs_fn(batch, config) if prepare_model_inputs_fn else deepcopy(batch)
        return batch, hook_input

    try:
        # 1. One batch, fingerprinted: layers with the very same input share one SVD (the first of them owns it).
        first, hook_input = feed(next(iter(batches)))
        for name, hook in hooks.items():
            hook.model_input = hook_input
            handles[name] = modules[name].register_forward_hook(hook)
        forward_fn(model, first)
        for handle in handles.values():
            handle.remove()
        handles.clear()
        unused = [n for n, h in hooks.items() if h.fingerprint is None]
        if unused:
            raise ConfigError(f"EVA: {unused[0]} did not run in the model's forward pass, so it has no inputs to "
                              "learn from; exclude it from target_modules")
        groups: dict[str, list[str]] = {}
        for name, hook in hooks.items():
            groups.setdefault(hook.fingerprint, []).append(name)
        shares_with = {n: group[0] for group in groups.values() for n in group[1:]}  # PEFT's order
        for name, owner in shares_with.items():  # a shared SVD offers the most any of its layers may take
            offered[owner] = offered[name] = max(offered[owner], offered[name])
        owners = [n for n in targets if n not in shares_with]
        for name in owners:
            hooks[name].start_svd(offered[name], settings.tau)
        for name in shares_with:
            del hooks[name]
        layers = owners + list(shares_with)  # PEFT's order, which also breaks the ties of _redistribute
        svd_of = {**{n: n for n in owners}, **shares_with}

        # 2. Fold batches into the SVDs, cycling through them, until every layer's first ranks[layer] components
        # have settled; the ranks are re-shared after every batch, and a layer whose ranks grew is fed again.
        ranks = dict(offered)
        settled = dict.fromkeys(owners, False)
        progress = _progress(show_progress_bar, len(layers))
        for step, batch in enumerate(itertools.cycle(batches)):
            batch, hook_input = feed(batch)
            for name in owners:
                hook = hooks[name]
                now = bool(hook.converged[: ranks[name]].all())
                if now and not settled[name]:
                    handles.pop(name).remove()
                    settled[name] = True
                    continue
                if settled[name] and not now:
                    handles[name] = modules[name].register_forward_hook(hook)
                    settled[name] = False
                elif name not in handles and not settled[name]:
                    handles[name] = modules[name].register_forward_hook(hook)
                hook.model_input = hook_input
            if progress is not None:
                done = sum(settled[svd_of[n]] for n in layers)
                progress.set_description(f"{done}/{len(layers)} layers have converged")
            if all(settled.values()):
                break
            if step >= MAX_SVD_STEPS:
                open_layers = [n for n in owners if not settled[n]]
                raise ConfigError(f"EVA: the SVD of {len(open_layers)} layer(s) (e.g. {open_layers[0]}) did not "
                                  f"settle in {MAX_SVD_STEPS} batches; lower eva_config tau (now {settings.tau}) or "
                                  "give more varied calibration data")
            forward_fn(model, batch)
            if progress is not None:
                progress.update(1)
            empty = [n for n in owners if hooks[n].svd.components is None]
            if empty:
                if step + 1 >= len(batches):  # a whole pass, and a layer never had k usable rows in one batch
                    raise ConfigError(
                        f"EVA: no batch holds {offered[empty[0]]} usable tokens for {empty[0]} (it needs "
                        "round(rho * r) per batch, counting only unpadded tokens and, with use_label_mask, "
                        "labelled ones); use larger batches, set eva_config use_label_mask=False, or lower rho or r")
                continue
            ratios = {n: hooks[svd_of[n]].svd.explained_variance_ratio for n in layers}
            ranks = _redistribute(ratios, offered, budget, shares_with)
        if progress is not None:
            progress.close()
    finally:
        for handle in handles.values():
            handle.remove()
        model.train(training)

    state: dict[str, torch.Tensor] = {}
    for name in layers:
        hook = hooks[svd_of[name]]
        k = ranks[name]
        a = hook.svd.components[:k].clone()
        if settings.whiten:
            a = a / hook.svd.singular_values[:k].sqrt()[:, None]
        state[name] = a if device is None else a.to(device)
    return state


def _progress(show: bool, total_layers: int):
    if not show or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        return None
    from tqdm.auto import tqdm

    return tqdm(desc=f"0/{total_layers} layers have converged", leave=False, unit="batch")


@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Iterable | None = None,
    eva_state_dict: dict[str, torch.Tensor] | None = None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> nn.Module:
    """Give a ``PeftModel`` made with ``init_lora_weights="eva"`` its EVA ``A`` (``B`` stays 0), as PEFT's function:
    each layer's rank becomes its EVA rank (rank 0 removes the layer's adapter), ``lora_alpha`` follows it with
    ``adjust_scaling_factors``, and the config's ``rank_pattern``, ``alpha_pattern`` and ``target_modules`` are
    rewritten to describe the result (so the saved adapter loads in PEFT).

    Args:
        model: The ``PeftModel``; one active adapter.
        dataloader: Calibration batches (see :func:`get_eva_state_dict`), unless ``eva_state_dict`` is given.
        eva_state_dict: A result of :func:`get_eva_state_dict`, for this model or for its base model.
        forward_fn, prepare_model_inputs_fn, prepare_layer_inputs_fn, gather_distributed_inputs,
        show_progress_bar: As :func:`get_eva_state_dict`.
        adapter_name: The adapter to initialise.

    Returns:
        ``model``, initialised in place.

    Raises:
        ConfigError: not a ``PeftModel``, several active adapters, an adapter not made with ``"eva"``, or
            neither ``dataloader`` nor ``eva_state_dict``.
    """
    if not hasattr(model, "peft_config"):
        raise ConfigError("initialize_lora_eva_weights needs a PeftModel: get_peft_model(model, LoraConfig("
                          "init_lora_weights='eva', ...)) first")
    if len(model.active_adapters) > 1:
        raise ConfigError(f"initialize_lora_eva_weights works with one active adapter, found {model.active_adapters}; "
                          "set_adapter() the one to initialise")
    config = model.peft_config[adapter_name]
    if config.init_lora_weights != "eva":
        raise ConfigError(f"initialize_lora_eva_weights needs an adapter made with init_lora_weights='eva', "
                          f"{adapter_name!r} has {config.init_lora_weights!r}")
    if eva_state_dict is None:
        if dataloader is None:
            raise ConfigError("initialize_lora_eva_weights needs a dataloader (or an eva_state_dict)")
        eva_state_dict = get_eva_state_dict(model, dataloader, forward_fn=forward_fn,
                                            prepare_model_inputs_fn=prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn=prepare_layer_inputs_fn,
                                            adapter_name=adapter_name,
                                            gather_distributed_inputs=gather_distributed_inputs,
                                            show_progress_bar=show_progress_bar)
    _load_eva_state_dict(model, eva_state_dict, adapter_name)
    return model


def _load_eva_state_dict(model: nn.Module, eva_state_dict: Mapping[str, torch.Tensor], adapter_name: str) -> None:
    from deltatune.core.tuner import replace_module
    from deltatune.lora.layer import LoraLayer

    config = model.peft_config[adapter_name]
    settings = eva_config_of(config)
    remaining = dict(eva_state_dict)
    initialised, missing, others = [], [], []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for name, layer in list(model.named_modules()):
        short = name.removeprefix(_PREFIX)
        if not (isinstance(layer, LoraLayer) and adapter_name in layer.r):
            others.append(short)
            continue
        r, alpha = config.rank_for(name), config.alpha_for(name)
        a = remaining.pop(name, None)
        if a is None:
            a = remaining.pop(short, None)  # computed on the base model (PEFT 0.21 would not find it)
        kwargs = {"lora_dropout": config.lora_dropout, "use_rslora": config.use_rslora,
                  "use_dora": config.use_dora, "lora_bias": config.lora_bias}
        if a is None:  # a layer EVA does not initialise (Embedding, Conv, MHA): the default init, as PEFT
            layer.update_layer(adapter_name, r=r, lora_alpha=alpha, init_lora_weights=True, **kwargs)
            missing.append(short)
            k = r
        else:
            k = a.shape[0]
            if k == 0:  # no share of the budget: the layer goes back to the base layer
                if len(layer.r) == 1:
                    replace_module(model, name, layer.base_layer)
                else:
                    layer.delete_adapter(adapter_name)
                continue
            if k != r:
                if settings.adjust_scaling_factors:
                    alpha = alpha * k / r  # keeps alpha / r, the update's scale
                layer.update_layer(adapter_name, r=k, lora_alpha=alpha, init_lora_weights="eva", **kwargs)
            layer.lora_A[adapter_name].weight.copy_(a)
            initialised.append(short)
        if k != config.r:
            rank_pattern[short] = k
        if alpha != config.lora_alpha:
            alpha_pattern[short] = alpha
    targets = initialised + missing
    if len(targets) >= MIN_TARGETS_TO_CONDENSE:
        targets = shortest_suffixes(targets, others)
    config.target_modules = set(targets)
    config.rank_pattern = rank_pattern
    config.alpha_pattern = alpha_pattern
    if missing:
        warnings.warn(f"EVA does not initialise {missing} (Embedding, Conv and MultiheadAttention layers are not "
                      "supported): they got init_lora_weights=True", stacklevel=3)


def shortest_suffixes(targets: list[str], others: list[str]) -> list[str]:
    """Dotted name suffixes that match every name in ``targets`` and nothing in ``others``, few and short (PEFT's
    condensed ``target_modules``, e.g. 200 ``model.layers.<i>.self_attn.q_proj`` -> ``q_proj``)."""

    def suffixes(name: str) -> list[str]:  # shortest first
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]

    taken = {s for name in others for s in suffixes(name)}
    chosen: list[str] = []
    for name in sorted(targets, key=suffixes):
        if any(name.endswith("." + s) for s in chosen):
            continue
        pick = next((s for s in suffixes(name) if s not in taken and s not in chosen), None)
        if pick is not None:
            chosen.append(pick)
    return chosen


# ---- the interface of deltatune.lora.init -----------------------------------------------------------------------
def check_creatable(model: nn.Module, config: Any) -> None:
    """An EVA adapter can always be created (``B = 0``, ``A`` random until :func:`initialize_lora_eva_weights`);
    only ``eva_config`` is checked (and stored as an :class:`EvaConfig`, PEFT's default when unset)."""
    eva_config_of(config)


def init_layer(layer: nn.Module, adapter_name: str) -> None:
    """``init_lora_weights="eva"`` at creation: ``B = 0`` (the model is unchanged) and ``A`` left as created
    (``nn.Linear``'s Kaiming-uniform, PEFT's too), until the data gives ``A``. Other layer types get the default
    initialisation (EVA leaves them to it)."""
    if adapter_name not in layer.lora_A:
        layer._init_weights(adapter_name, True)
        return
    b = layer.lora_B[adapter_name]
    nn.init.zeros_(b.weight)
    if getattr(b, "bias", None) is not None:
        nn.init.zeros_(b.bias)


def get_peft_model_with_data(model: nn.Module, config: Any, batches: Iterable[Mapping[str, torch.Tensor]],
                             adapter_name: str = "default", *, create: Callable[..., nn.Module]):
    """``create`` (``get_peft_model``) then :func:`initialize_lora_eva_weights` on ``batches`` (PEFT's two steps
    as one)."""
    batches = list(batches)
    if not batches:
        raise ConfigError("init_lora_weights='eva' needs calibration batches; none were given")
    peft_model = create(model, config, adapter_name=adapter_name)
    # the caller's batches are the whole calibration set on every process: nothing to gather
    initialize_lora_eva_weights(peft_model, batches, adapter_name=adapter_name, gather_distributed_inputs=False,
                                show_progress_bar=False)
    return peft_model
