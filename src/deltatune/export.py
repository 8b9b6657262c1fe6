"""Export any weight adapter as a plain LoRA adapter, for serving engines that only take LoRA (vLLM, LoRAX).

For every adapted layer, ``ΔW = W' - W`` where ``W'`` is the weight the method's own merge would write
(``merged_weight``: DoRA's magnitude rescaling, OFT/BOFT's rotation and IA3's scaling are multiplicative, but
``ΔW`` is still a matrix). A truncated SVD ``ΔW ≈ U_k S_k V_kᵀ`` gives ``B = U_k √S_k``, ``A = √S_k V_kᵀ`` with
``lora_alpha = r`` (scaling 1); by Eckart-Young no rank-``k`` LoRA is closer in Frobenius norm. Each layer's
relative error ``‖ΔW - B A‖_F / ‖ΔW‖_F`` is reported. The result is PEFT's LoRA format: one rank ``r`` for all
layers (a layer that needs fewer directions has zero rows, so engines that take one ``max_lora_rank`` load it),
no ``rank_pattern``; a changed bias (IA3 on an output layer, BitFit, LoRA's ``lora_bias``) becomes ``lora_B``'s
bias (``lora_bias=True``); ``modules_to_save`` are carried as PEFT LoRA carries them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltatune.errors import ConfigError

__all__ = ["export_to_lora", "ExportedLora"]


@dataclass
class ExportedLora:
    """A plain LoRA adapter: its ``config`` (a :class:`deltatune.LoraConfig`), its tensors under PEFT's file keys,
    and ``report``: ``{"rank", "energy", "layers": {name: {"rank", "rel_error", "delta_norm"}}, "max_rel_error",
    "mean_rel_error"}``."""

    config: Any
    state: dict[str, torch.Tensor]
    report: dict[str, Any] = field(default_factory=dict)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's LoRA format) as one pair."""
        from deltatune.core.io import save_adapter_files

        os.makedirs(directory, exist_ok=True)
        save_adapter_files(os.fspath(directory), {k: v.contiguous() for k, v in self.state.items()},
                           self.config.to_dict())

    def to_peft_model(self, base_model: nn.Module, adapter_name: str = "default") -> Any:
        """``base_model`` (the same base the source adapter was on, without adapters) with this LoRA on it."""
        import copy

        from deltatune import get_peft_model, set_peft_model_state_dict

        model = get_peft_model(base_model, copy.deepcopy(self.config), adapter_name=adapter_name)
        set_peft_model_state_dict(model, self.state, adapter_name=adapter_name)
        return model


def _rank_for(singular: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """Directions kept for one layer: ``rank`` (at most the matrix's), or the fewest whose squared singular values
    hold ``energy`` of ``‖ΔW‖_F²``."""
    if rank is not None:
        return min(rank, singular.numel())
    power = singular.double() ** 2
    total = float(power.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(power, 0) / total
    found = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype)).item()) + 1
    return min(found, singular.numel())  # energy=1.0 may sit a rounding above the last cumulative value


def _layer_kind(layer: nn.Module) -> str:
    """``linear`` / ``conv1d`` (transformers' (in, out) Conv1D) / ``embedding`` / ``conv``; else refused."""
    base = layer.base_layer
    if isinstance(base, nn.Embedding):
        return "embedding"
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if base.groups > 1:
            raise ConfigError("exporting a grouped convolution (groups > 1) as LoRA is not supported")
        return "conv"
    if getattr(layer, "fan_in_fan_out", False) or type(base).__name__ == "Conv1D":
        return "conv1d"
    if isinstance(base, nn.Linear) or getattr(layer, "quantized", False):
        return "linear"
    raise ConfigError(f"{type(base).__name__} layers cannot be written as LoRA (PEFT's LoRA takes Linear, "
                      "Conv1D, Embedding and Conv layers)")


def _delta(layer: nn.Module, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W' - W, b' - b or None)`` in the base weight's storage layout, fp32, from the method's merge."""
    with torch.no_grad():
        weight = layer.read_base_weight().detach().float().clone()
        try:
            merged = layer.merged_weight(weight.clone(), adapter_name).float()
            bias = getattr(layer.base_layer, "bias", None)
            bias = None if bias is None else bias.detach().float().clone()
            new_bias = layer.merged_bias(bias, adapter_name)
        finally:
            layer._forget_merge_state(adapter_name)  # nothing is merged: drop what an unmerge would use
    bias_delta = None
    if new_bias is not None and bias is not None and not torch.equal(new_bias.float(), bias):
        bias_delta = new_bias.float() - bias
    return merged - weight, bias_delta


def export_to_lora(peft_model: Any, rank: int | None = None, energy: float | None = None,
                   adapter_name: str | None = None) -> ExportedLora:
    """The adapter ``adapter_name`` (default: the active one) of ``peft_model`` as a plain LoRA adapter.

    Args:
        peft_model: A deltatune ``PeftModel`` holding a weight adapter (LoRA/DoRA/rsLoRA, LoHa, LoKr, OFT, BOFT,
            IA3, VeRA, AdaLoRA, ...), not merged.
        rank: Keep the top-``rank`` singular directions of every layer's ``ΔW``; or
        energy: keep, per layer, the fewest directions holding this fraction of ``‖ΔW‖_F²`` (0 < energy <= 1);
            the adapter's ``r`` is then the largest of those ranks.
        adapter_name: Which adapter.

    Returns:
        :class:`ExportedLora` (``save_pretrained(dir)`` writes PEFT's files; ``report`` has each layer's
        relative Frobenius error).

    Raises:
        ConfigError: neither or both of ``rank``/``energy``, a bad value, an adapter that is merged, a virtual-token
            or bottleneck adapter (no weight delta), trainable tokens, or a layer type LoRA cannot hold.
    """
    from deltatune.config import PeftType
    from deltatune.core.layer import AdapterLayer
    from deltatune.core.modules_to_save import ModulesToSaveWrapper
    from deltatune.lora.config import LoraConfig
    from deltatune.registry import method_for
    from deltatune.save_and_load import get_peft_model_state_dict

    if (rank is None) == (energy is None):
        raise ConfigError("export_to_lora needs exactly one of rank= (e.g. 16) or energy= (e.g. 0.99)")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    if energy is not None and not 0.0 < float(energy) <= 1.0:
        raise ConfigError(f"energy must be in (0, 1], got {energy!r}; 0.99 keeps 99% of each ‖ΔW‖_F²")
    name = adapter_name or peft_model.active_adapter
    if name not in peft_model.peft_config:
        raise ConfigError(f"no adapter named {name!r}; the model has {sorted(peft_model.peft_config)}")
    source = peft_model.peft_config[name]
    method = method_for(source.peft_type)
    if method.layer_cls is None or not method.mergeable:
        raise ConfigError(f"a {source.peft_type} adapter has no weight delta (it adds virtual tokens or modules), so "
                          "it cannot be written as LoRA; serve it with deltatune or PEFT")
    if source.peft_type == PeftType.TRAINABLE_TOKENS or getattr(source, "trainable_token_indices", None):
        raise ConfigError("trainable tokens (trainable_token_indices) are not part of plain LoRA; serving engines "
                          "would drop them: export an adapter without them")
    root = peft_model.base_model.model
    layers = [(n, m) for n, m in root.named_modules()
              if isinstance(m, AdapterLayer) and name in m.adapter_names()]
    if not layers:
        raise ConfigError(f"adapter {name!r} adapts no layer; nothing to export")
    merged = [n for n, m in layers if m.merged_adapters]
    if merged:
        raise ConfigError(f"{merged[0]} has adapters merged into its weight; unmerge_adapter() before exporting")

    factors: dict[str, dict[str, Any]] = {}
    for module_name, layer in layers:
        kind = _layer_kind(layer)
        delta, bias_delta = _delta(layer, name)
        shape = delta.shape
        if kind == "conv1d":
            mat = delta.T  # (in, out) storage -> (out, in)
        elif kind == "embedding":
            mat = delta.T  # LoRA's embedding ΔW is (B A)ᵀ with B: (dim, r), A: (r, num)
        else:
            mat = delta.reshape(shape[0], -1)
        # fp32 SVD (1.5-2x faster than fp64 on CPU; its rounding, ~1e-7 of ‖ΔW‖, is far below any truncation).
        # The truncation error of an SVD is the energy it drops: ‖ΔW - B A‖² = Σ_{i>k} s_i² (no extra matmul).
        u, s, vh = torch.linalg.svd(mat.float(), full_matrices=False)
        k = _rank_for(s, rank, energy)
        root_s = torch.sqrt(s[:k])
        b, a = u[:, :k] * root_s, root_s[:, None] * vh[:k]
        power = s.double() ** 2
        norm = float(power.sum().sqrt())
        error = float(power[k:].sum().sqrt())
        factors[module_name] = {"kind": kind, "a": a, "b": b, "k": k, "shape": shape, "bias": bias_delta,
                                "rel_error": error / norm if norm > 0 else 0.0, "delta_norm": norm}

    r = rank if rank is not None else max(1, max(f["k"] for f in factors.values()))
    lora_bias = any(f["bias"] is not None for f in factors.values())
    state: dict[str, torch.Tensor] = {}
    for module_name, f in factors.items():
        a = torch.zeros(r, f["a"].shape[1])
        b = torch.zeros(f["b"].shape[0], r)
        a[: f["k"]], b[:, : f["k"]] = f["a"], f["b"]  # zero directions beyond this layer's rank: one r for all
        key = f"base_model.model.{module_name}"
        if f["kind"] == "embedding":
            state[f"{key}.lora_embedding_A"] = a.float()
            state[f"{key}.lora_embedding_B"] = b.float()
            if f["bias"] is not None:
                raise ConfigError(f"{module_name}: an embedding bias change cannot be written as LoRA")
            continue
        if f["kind"] == "conv":
            shape = f["shape"]
            a = a.reshape(r, *shape[1:])
            b = b.reshape(shape[0], r, *([1] * (len(shape) - 2)))
        state[f"{key}.lora_A.weight"] = a.float().contiguous()
        state[f"{key}.lora_B.weight"] = b.float().contiguous()
        if lora_bias and f["kind"] != "embedding":
            out = f["b"].shape[0]
            state[f"{key}.lora_B.bias"] = (f["bias"] if f["bias"] is not None else torch.zeros(out)).float()

    saved = list(getattr(source, "modules_to_save", None) or [])
    if saved:  # the trained copies, under the keys PEFT's LoRA files use for them
        source_state = get_peft_model_state_dict(peft_model, adapter_name=name)
        wrappers = [n for n, m in root.named_modules() if isinstance(m, ModulesToSaveWrapper)]
        for key, value in source_state.items():
            inner = key.removeprefix("base_model.model.")
            if any(inner.startswith(w + ".") for w in wrappers):
                state[key] = value.detach().clone()

    config = LoraConfig(
        r=r, lora_alpha=r, target_modules=sorted(factors), lora_dropout=0.0,
        fan_in_fan_out=any(f["kind"] == "conv1d" for f in factors.values()), lora_bias=lora_bias,
        modules_to_save=saved or None, task_type=source.task_type,
        base_model_name_or_path=source.base_model_name_or_path, revision=getattr(source, "revision", None),
        inference_mode=True,
    )
    if config.fan_in_fan_out and any(f["kind"] == "linear" for f in factors.values()):
        raise ConfigError("the adapter spans Conv1D and Linear layers; one LoRA config holds one fan_in_fan_out")
    errors = [f["rel_error"] for f in factors.values()]
    report = {
        "rank": r, "energy": energy, "source_method": str(source.peft_type), "lora_bias": lora_bias,
        "layers": {n: {"rank": f["k"], "rel_error": f["rel_error"], "delta_norm": f["delta_norm"]}
                   for n, f in factors.items()},
        "max_rel_error": max(errors), "mean_rel_error": sum(errors) / len(errors),
        "parameters": sum(v.numel() for k, v in state.items() if ".lora_" in k),
    }
    bad = [n for n, f in factors.items() if not math.isfinite(f["rel_error"])]
    if bad:
        raise ConfigError(f"{bad[0]}: the adapter's ΔW holds NaN/Inf; its tensors are broken, nothing exported")
    return ExportedLora(config=config, state=state, report=report)
