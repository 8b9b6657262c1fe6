"""LoftQ (Li et al., 2023, https://arxiv.org/abs/2310.08659): quantise the base and start LoRA from the error.

QLoRA quantises the frozen base ``W: (out, in)`` to ``Q`` and starts the adapter at zero, so training begins from
the model ``Q``, which is off from ``W`` by the quantisation error. LoftQ picks ``Q`` and the starting
``B: (out, r)``, ``A: (r, in)`` together so that ``Q + B A`` is close to ``W``, alternating ``T = loftq_iter``
times::

    Q_t      = dequant(quant(W - B_{t-1} A_{t-1}))      (B_0 A_0 = 0: the first Q is plain QLoRA's)
    B_t, A_t = rank-r SVD of W - Q_t:  U_r sqrt(S_r),  sqrt(S_r) V_r^T

and installs ``Q_T`` as the base weight (dense, in the base's dtype: load it in 4 bits afterwards; NF4 re-quantises
it to itself) with ``A_T, B_T`` as the adapter. ``quant`` is bitsandbytes' NF4 (blocks of 64, scales not
double-quantised) for ``loftq_bits=4`` and its LLM.int8 row-wise absmax for ``loftq_bits=8``, as PEFT 0.21.2.

The factors approximate ``W - Q`` without the LoRA scaling ``s = lora_alpha / r`` (PEFT's choice, kept so the
numbers are PEFT's): the model starts at ``Q + s B A``, which is LoftQ's approximation when ``s = 1``
(``lora_alpha = r``, PEFT's default). Other scalings get a warning.

:func:`replace_lora_weights_loftq` does one step of the same (``T = 1``, the base unchanged) for a model that is
already quantised with bitsandbytes NF4, reading the original weights from the model's safetensors file.
"""

from __future__ import annotations

import contextvars
import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, is_dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.quantization import dequantize_weight, is_quantized_layer, require_bnb

if TYPE_CHECKING:
    from deltatune.peft_model import PeftModel

LOFTQ_BITS = (4, 8)
NF4_BLOCKSIZE = 64  # bitsandbytes' Params4bit default, which PEFT's LoftQ quantises with


@dataclass
class LoftQConfig:
    """PEFT's ``LoftQConfig``: ``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(...))``.

    Args:
        loftq_bits: Bits of the quantised base: 4 (NF4) or 8 (LLM.int8).
        loftq_iter: Alternations ``T`` of quantise / SVD (1 = quantise ``W`` once and fit the adapter to the error).
    """

    loftq_bits: int = 4
    loftq_iter: int = 1


# The LoftQ settings of the adapter being created. ``check_creatable`` validates the config and sets them right
# before the layers are built (LoraLayer.update_layer -> init_layer sees only the layer, not the config); a
# ContextVar so that threads creating adapters at the same time each see their own.
_settings: contextvars.ContextVar[LoftQConfig | None] = contextvars.ContextVar("loftq_settings", default=None)


def _read_settings(loftq_config: object) -> LoftQConfig:
    """``LoraConfig.loftq_config`` (a dict as PEFT saves it, or a ``LoftQConfig``) as a checked ``LoftQConfig``."""
    if is_dataclass(loftq_config):
        loftq_config = {k: getattr(loftq_config, k) for k in ("loftq_bits", "loftq_iter") if hasattr(loftq_config, k)}
    if not loftq_config:
        raise ConfigError("init_lora_weights='loftq' needs loftq_config, e.g. "
                          "LoraConfig(init_lora_weights='loftq', loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1))")
    if not isinstance(loftq_config, Mapping):
        raise ConfigError(f"loftq_config must be a LoftQConfig or a dict, got {loftq_config!r}")
    unknown = sorted(set(loftq_config) - {"loftq_bits", "loftq_iter"})
    if unknown:
        raise ConfigError(f"loftq_config has unknown keys {unknown}; LoftQConfig takes loftq_bits and loftq_iter")
    settings = LoftQConfig(**loftq_config)
    if settings.loftq_bits not in LOFTQ_BITS:
        raise ConfigError(f"loftq_bits={settings.loftq_bits!r} is not supported: LoftQ quantises to 4 bits (NF4) "
                          "or 8 bits (LLM.int8), as PEFT; use loftq_bits=4")
    if not isinstance(settings.loftq_iter, int) or isinstance(settings.loftq_iter, bool) or settings.loftq_iter <= 0:
        raise ConfigError(f"loftq_iter={settings.loftq_iter!r}: the number of alternations must be a positive "
                          "integer; 1 is LoftQ's default, 5 its paper's")
    return settings


def check_creatable(model: nn.Module, config: object) -> None:
    """Refuse, before ``model`` changes, a LoftQ adapter that cannot be created: ``loftq_config`` missing or
    invalid (PEFT raises ``ValueError`` too; ``ConfigError`` is one), bitsandbytes missing, a model that is
    already quantised (LoftQ quantises the float base itself), a Conv1D (``fan_in_fan_out``) model.

    Raises:
        ConfigError: with what to change.
    """
    settings = _read_settings(getattr(config, "loftq_config", None))
    try:
        require_bnb()
    except Exception as exc:
        raise ConfigError(f"init_lora_weights='loftq' quantises with bitsandbytes: {exc}") from None
    quantised = next((name for name, m in model.named_modules() if is_quantized_layer(m)), None)
    if quantised is not None or any(getattr(model, f"is_loaded_in_{n}bit", False) for n in (4, 8)):
        raise ConfigError(
            f"init_lora_weights='loftq' quantises the float model itself, but this model is already quantised "
            f"({quantised or 'is_loaded_in_4bit/8bit'}); pass the model in full precision (then save the LoftQ base "
            "and load it in 4 bits), or keep this one and call replace_lora_weights_loftq(peft_model) after "
            "creating a plain LoRA adapter")
    if getattr(config, "fan_in_fan_out", False):
        raise ConfigError("init_lora_weights='loftq' does not support fan_in_fan_out (Conv1D) layers, as PEFT; "
                          "use init_lora_weights=True")
    _settings.set(settings)


@torch.no_grad()
def quantize_dequantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``dequant(quant(weight))``: ``weight: (out, in)`` fp32 -> the same shape, the values the quantised base
    holds. 4 bits: bitsandbytes NF4, absmax per block of 64 consecutive values (row-major), fp32 scales;
    8 bits: LLM.int8's per-row absmax, ``round(127 w / max|w_row|)`` of ``w`` in fp16."""
    bnb = require_bnb()
    weight = weight.float().contiguous()
    if bits == 4:
        packed, state = bnb.functional.quantize_4bit(weight, blocksize=NF4_BLOCKSIZE, compress_statistics=False,
                                                     quant_type="nf4")
        return bnb.functional.dequantize_4bit(packed, state).float()
    # LLM.int8 layers (bitsandbytes' Int8Params) quantise the fp16 copy of the weight: so does PEFT's LoftQ.
    codes, row_absmax, _ = bnb.functional.int8_vectorwise_quant(weight.half())
    return bnb.functional.int8_vectorwise_dequant(codes, row_absmax).float()


def low_rank_factors(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A: (r, in)``, ``B: (out, r)`` with ``B A`` the best rank-``r`` approximation of ``residual: (out, in)``
    (full SVD ``U S V^T``; the singular values split as ``sqrt`` into both factors, as LoftQ)."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = s[:r].sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


@torch.no_grad()
def loftq_factors(weight: torch.Tensor, bits: int, r: int,
                  iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ's alternation on ``weight: (out, in)``: returns ``(Q, A, B)`` in fp32, ``Q: (out, in)`` the
    dequantised base, ``A: (r, in)``, ``B: (out, r)`` with ``Q + B A`` close to ``weight``."""
    w = weight.float()
    target = w  # what is quantised: W - B A (B A = 0 at first)
    for step in range(iters):
        q = quantize_dequantize(target, bits)
        a, b = low_rank_factors(w - q, r)
        if step + 1 < iters:
            target = w - b @ a
    return q, a, b


def init_layer(layer: nn.Module, adapter_name: str) -> None:
    """Initialise ``layer``'s new adapter with LoftQ (settings from the config :func:`check_creatable` read): the
    base weight becomes ``Q`` (in its dtype), ``lora_A``/``lora_B`` the fitted factors."""
    from deltatune.lora.layer import LoraLinear

    if not isinstance(layer, LoraLinear) or adapter_name not in layer.lora_A:
        raise ConfigError(f"init_lora_weights='loftq' is supported on Linear layers only, not "
                          f"{type(layer.base_layer).__name__}; exclude it from target_modules or use "
                          "init_lora_weights=True")
    if layer.quantized or layer.fan_in_fan_out:  # check_creatable refuses both for the whole model
        raise ConfigError("init_lora_weights='loftq' needs a float nn.Linear base; see replace_lora_weights_loftq")
    settings = _settings.get() or LoftQConfig()  # update_layer called directly: PEFT's defaults
    if layer.scaling[adapter_name] != 1:
        warnings.warn(f"LoftQ fits B A to W - Q, but the adapter adds s * B A with s = lora_alpha / r = "
                      f"{layer.scaling[adapter_name]:g}; set lora_alpha = r for LoftQ's starting error (PEFT does "
                      "the same)", stacklevel=2)
    base = layer.base_layer.weight
    q, a, b = loftq_factors(base.data, settings.loftq_bits, layer.r[adapter_name], settings.loftq_iter)
    a_mod, b_mod = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
    a_mod.weight.data = a.to(a_mod.weight.device, a_mod.weight.dtype).contiguous()
    b_mod.weight.data = b.to(b_mod.weight.device, b_mod.weight.dtype).contiguous()
    if b_mod.bias is not None:
        nn.init.zeros_(b_mod.bias)
    layer.write_base_weight(q.to(base.device, base.dtype))


def get_peft_model_with_data(model: nn.Module, config: object, batches: Iterable[Mapping[str, torch.Tensor]],
                             adapter_name: str = "default") -> PeftModel:
    """LoftQ needs no data: ``get_peft_model(model, config)`` (``batches`` is ignored)."""
    from deltatune.mapping import get_peft_model

    return get_peft_model(model, config, adapter_name=adapter_name)


# ---- replace_lora_weights_loftq: LoftQ on an already-quantised model -----------------------------------------
class _SafetensorsWeights:
    """Reads single tensors from a model's ``model.safetensors`` (or its shards) without loading the rest."""

    def __init__(self, model_path: str | os.PathLike, base_model_prefix: str | None) -> None:
        path = os.fspath(model_path)
        if os.path.isdir(path):
            path = os.path.join(path, "model.safetensors")
        self.prefix = base_model_prefix
        if os.path.isfile(path):
            self.file_of = lambda name: path
            return
        index = os.path.join(os.path.dirname(path), "model.safetensors.index.json")
        if not os.path.isfile(index):
            raise FileNotFoundError(f"no {os.path.basename(path)} (nor a sharded model.safetensors.index.json) in "
                                    f"{os.path.dirname(path) or '.'}; pass model_path= the directory of the "
                                    "original (unquantised) safetensors model")
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
        folder = os.path.dirname(index)
        self.file_of = lambda name: os.path.join(folder, weight_map[name]) if name in weight_map else None

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name``; if absent, ``name`` without the model's ``base_model_prefix`` (a checkpoint of the bare
        backbone), as PEFT's loader."""
        from safetensors import safe_open

        names = [name]
        if self.prefix and name.startswith(self.prefix + "."):
            names.append(name[len(self.prefix) + 1:])
        for candidate in names:
            file = self.file_of(candidate)
            if file is None:
                continue
            with safe_open(file, framework="pt", device="cpu") as fh:
                if candidate in fh.keys():  # noqa: SIM118 (safe_open has no __contains__)
                    return fh.get_tensor(candidate)
        raise KeyError(f"{name!r} is not in the safetensors model; pass model_path= the original model of this base")


@torch.no_grad()
def replace_lora_weights_loftq(peft_model: nn.Module, model_path: str | os.PathLike | None = None,
                               adapter_name: str = "default",
                               callback: Callable[[nn.Module, str], bool] | None = None) -> None:
    """PEFT's ``replace_lora_weights_loftq``: re-initialise ``adapter_name`` on every LoRA layer whose base is a
    bitsandbytes 4-bit layer so that ``Q + B A`` approximates the original weight ``W``: ``B, A`` = rank-r SVD
    of ``W - Q`` (one LoftQ step; the quantised base ``Q`` is kept).

    Args:
        peft_model: A ``PeftModel`` with LoRA layers on a 4-bit (``quantize(model, "nf4")``) base.
        model_path: The original model's directory (or its ``model.safetensors``); default: the base model's
            ``config._name_or_path`` when that is a local directory (deltatune never downloads).
        adapter_name: The adapter to replace.
        callback: ``callback(peft_model, module_name) -> bool`` after each layer; ``False`` rolls that layer back
            (e.g. keep a layer only if the logits moved closer to the float model's).

    Raises:
        ConfigError: no LoRA layer on a 4-bit base (PEFT raises ``ValueError`` too); no ``model_path`` to read.
    """
    from deltatune.lora.layer import LoraLinear

    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    prefix = "base_model.model."
    layers = [(name, m) for name, m in peft_model.named_modules()
              if isinstance(m, LoraLinear) and type(getattr(m.base_layer, "weight", None)).__name__ == "Params4bit"
              and adapter_name in m.lora_A]
    if not layers:
        raise ConfigError(f"no LoRA layer with adapter {adapter_name!r} on a bitsandbytes 4-bit base in this model; "
                          "replace_lora_weights_loftq works on quantize(model, 'nf4') + get_peft_model(...)")
    if model_path is None:
        model_path = getattr(getattr(base, "config", None), "_name_or_path", None)
        if not model_path or not os.path.isdir(model_path):
            raise ConfigError("replace_lora_weights_loftq needs the original weights: pass model_path= the "
                              "directory of the unquantised safetensors model (the base's config names "
                              f"{model_path!r}, which is not a local directory)")
    weights = _SafetensorsWeights(model_path, getattr(base, "base_model_prefix", None))
    for name, layer in layers:
        if not name.startswith(prefix):
            raise TypeError(f"{name}: the passed model does not appear to be a PeftModel (no {prefix!r} prefix)")
        module_name = name[len(prefix):]
        w = weights.get(module_name + ".weight").to(layer.base_layer.weight.device, torch.float32)
        q = dequantize_weight(layer.base_layer).to(w.device)
        a, b = low_rank_factors(w - q, layer.r[adapter_name])
        a_mod, b_mod = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        before = a_mod.weight.data, b_mod.weight.data
        a_mod.weight.data = a.to(before[0].dtype).contiguous()
        b_mod.weight.data = b.to(before[1].dtype).contiguous()
        layer._clear_row_cache()
        if callback is not None and not callback(peft_model, module_name):
            a_mod.weight.data, b_mod.weight.data = before
            layer._clear_row_cache()


__all__ = ["LoftQConfig", "check_creatable", "get_peft_model_with_data", "init_layer", "loftq_factors",
           "replace_lora_weights_loftq"]
