"""LoRA on ``nn.MultiheadAttention`` (PEFT's ``lora.MultiheadAttention``), with PEFT's state-dict keys.

``nn.MultiheadAttention`` keeps its query/key/value projection as one packed parameter ``in_proj_weight:
(3E, E)`` (no ``nn.Linear`` to wrap) and reads ``out_proj.weight``/``out_proj.bias`` directly without calling
``out_proj.forward``. So LoRA adapts both weights, as PEFT does:

    W_in'  = W_in  + s · B_in A_in      A_in: (r, E),  B_in: (3E, r)   (this layer's lora_A / lora_B)
    W_out' = W_out + s · B_out A_out    A_out: (r, E), B_out: (E, r)   (a LoraLinear in place of out_proj)

and the attention runs with ``W_in'``, ``W_out'``. PEFT gets there by merging before and unmerging after every
forward; here the base module is called functionally (``torch.func.functional_call``) with the summed weights
swapped in, so nothing is written and gradients reach A and B through the sum. Keys match PEFT's:
``<mha>.lora_A.<adapter>.weight`` and ``<mha>.base_layer.out_proj.lora_A.<adapter>.weight``, so files cross both
ways. ``lora_dropout`` has no effect here (as in PEFT: the adapter acts on weights, not on inputs). Merging folds
``W_in`` here and ``W_out`` in the out_proj layer, which the model's merge reaches as it reaches every adapter layer.
Not supported (as in PEFT): separate q/k/v weights (``kdim``/``vdim`` != ``embed_dim``), DoRA, ``lora_bias``,
mixed-adapter batches.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from deltatune.errors import ConfigError, MixedBatchTypeError, TargetModuleError
from deltatune.lora.layer import LoraLayer, LoraLinear
from deltatune.lora.variants import variant_for


class LoraMultiheadAttention(LoraLayer):
    """Wraps ``nn.MultiheadAttention`` (packed q/k/v); its ``out_proj`` becomes a :class:`LoraLinear`.

    Attributes:
        in_features, out_features: ``embed_dim`` and ``3 * embed_dim`` (the packed projection; PEFT's values).
    """

    def __init__(self, base_layer: nn.MultiheadAttention) -> None:
        if not base_layer._qkv_same_embed_dim:
            raise ConfigError("Only same embed for query/key/value is supported as of now for MultiheadAttention. "
                              "LoRA on nn.MultiheadAttention needs one packed q/k/v projection (kdim == vdim == "
                              "embed_dim); this layer has separate q/k/v weights")
        if not isinstance(base_layer.out_proj, nn.Linear):
            raise ConfigError(f"LoRA on nn.MultiheadAttention needs out_proj to be an nn.Linear, got "
                              f"{type(base_layer.out_proj).__name__}")
        super().__init__(base_layer)
        self.fan_in_fan_out = False
        self.in_features, self.out_features = base_layer.embed_dim, 3 * base_layer.embed_dim

    # ---- the base layer's public attributes (PEFT exposes them on its wrapper too) ---------------------------
    @property
    def out_proj_lora(self) -> LoraLinear:
        """The LoRA layer in place of ``out_proj``."""
        return self.base_layer.out_proj

    @property
    def out_proj(self) -> nn.Module:
        return self.out_proj_lora.base_layer

    def __setattr__(self, name: str, value) -> None:
        if name == "out_proj":  # the injection loop, when target_modules names out_proj too
            raise TargetModuleError("the out_proj of an nn.MultiheadAttention gets LoRA together with the attention "
                                    "module (its forward never calls out_proj); remove 'out_proj' from target_modules")
        super().__setattr__(name, value)

    @property
    def weight(self) -> torch.Tensor:  # the adapted weight of this layer: the packed projection
        return self.base_layer.in_proj_weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.in_proj_bias

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _FORWARDED:
                return getattr(self.base_layer, name)
            raise

    # ---- creating an adapter -----------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights: bool | str = True, use_rslora: bool = False, use_dora: bool = False,
                     lora_bias: bool = False, **variant_flags: bool) -> None:
        """Create ``adapter_name`` on the packed projection and on ``out_proj`` (PEFT adapts both, always); plain
        LoRA only (no variant: ``use_dora`` and the other flags of :mod:`deltatune.lora.variants` are refused)."""
        if use_dora:
            raise ConfigError("MultiheadAttention does not support DoRA (yet), please set use_dora to False. (Or "
                              "leave this layer out of target_modules.)")
        if variant := variant_for(variant_flags):
            raise ConfigError(f"MultiheadAttention does not support {variant.label}; set {variant.flag}=False, or "
                              "leave this layer out of target_modules")
        if lora_bias:
            raise ConfigError("lora_bias is not supported on nn.MultiheadAttention; set lora_bias=False or leave "
                              "this layer out of target_modules")
        kwargs = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, init_lora_weights=init_lora_weights,
                      use_rslora=use_rslora)
        base = self.base_layer
        plain_out = base.out_proj if not isinstance(base.out_proj, LoraLinear) else None
        try:
            super().update_layer(adapter_name, **kwargs)
            if plain_out is not None:  # first adapter: out_proj becomes a LoRA layer (keys <mha>.base_layer.out_proj.)
                base.out_proj = LoraLinear(plain_out)
            base.out_proj.update_layer(adapter_name, **kwargs)
        except BaseException:
            if plain_out is not None:  # the user's module is left as it was
                base.out_proj = plain_out
            raise

    def _create_adapter(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        embed = self.base_layer.embed_dim
        self.lora_A[adapter_name] = nn.Linear(embed, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, 3 * embed, bias=False)

    def _place_adapter(self, adapter_name: str) -> None:
        """On the projection's device; fp32 over a half-precision base (as every LoRA layer)."""
        weight = self.base_layer.in_proj_weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A[adapter_name].to(weight.device, dtype)
        self.lora_B[adapter_name].to(weight.device, dtype)

    # ---- the packed projection as "the base weight" (merge, unmerge, safe_merge, MiCA read it) ------------
    def read_base_weight(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight.data

    def write_base_weight(self, weight: torch.Tensor) -> None:
        self._clear_row_cache()
        self.base_layer.in_proj_weight.data = weight.contiguous()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s · B_in A_in: (3E, E)``."""
        return (self.lora_B[adapter_name].weight @ self.lora_A[adapter_name].weight) * self.scaling[adapter_name]

    def unloaded(self, merge: bool, adapter_names: list[str] | None = None) -> nn.Module:
        """The plain ``nn.MultiheadAttention``, with a plain ``out_proj`` (merged first if ``merge``)."""
        out = self.base_layer.out_proj
        if isinstance(out, LoraLinear):
            self.base_layer.out_proj = out.unloaded(merge, adapter_names)
        return super().unloaded(merge, adapter_names)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete from both projections; once ``out_proj`` holds no adapter it is the plain layer again."""
        super().delete_adapter(adapter_name)
        out = self.base_layer.out_proj
        if isinstance(out, LoraLinear):
            out.delete_adapter(adapter_name)
            if not out.adapter_names():
                self.base_layer.out_proj = out.base_layer

        # ---- forward -----------------------------------------------------------------------------------------
    def forward(self, query: torch.Tensor, *args, **kwargs):
        """``nn.MultiheadAttention``'s forward (same arguments and outputs) with ``W_in'``, ``W_out'``.

        Not :meth:`AdapterLayer.forward`'s choice of path: mixed batches are refused even with adapters disabled,
        and with some adapters merged the unmerged ones still apply (``out_proj`` is a LoRA layer of its own with
        its own merge state, so "merged" is per projection and per adapter here)."""
        if self.row_adapters is not None:
            raise MixedBatchTypeError("lora.MultiheadAttention does not support mixed adapter batches. Run one "
                                      "adapter per batch (set_adapter), or leave the attention out of "
                                      "target_modules")
        base = self.base_layer
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(query, *args, **kwargs)
        out = self.out_proj_lora
        in_names = [a for a in self._active_lora() if a not in self.merged_adapters]
        out_names = [a for a in out._active_lora() if a not in out.merged_adapters] if not out.disable_adapters \
            else []
        swapped: dict[str, torch.Tensor] = {}
        if in_names:
            w = base.in_proj_weight
            swapped["in_proj_weight"] = w + sum(self.get_delta_weight(n) for n in in_names).to(w.dtype)
        if out_names:
            w = out.base_layer.weight
            swapped["out_proj.base_layer.weight"] = w + sum(out.get_delta_weight(n) for n in out_names).to(w.dtype)
        if not swapped:
            return base(query, *args, **kwargs)
        return functional_call(base, swapped, (query, *args), kwargs)


# nn.MultiheadAttention attributes read through the wrapper (PEFT's wrapper exposes the same ones).
_FORWARDED = frozenset({"embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first",
                        "head_dim", "in_proj_weight", "in_proj_bias", "bias_k", "bias_v", "add_zero_attn",
                        "merge_masks"})
