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

Loading a LoftQ adapter saved as created rebuilds ``Q`` from the original float base, as PEFT's load does
(:func:`rebuild_base`), so it loads onto the original model or onto ``Q`` alike; :func:`quantize_loftq_base` then
puts that base in 4 bits (QLoRA on LoftQ's base).

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


@torch.no_grad()
def rebuild_base(model: nn.Module, adapter_name: str, config: object) -> None:
    """After loading a LoftQ adapter saved as created (``init_lora_weights="loftq"``), make its layers' base
    weights LoftQ's ``Q``, as PEFT 0.21.2's load does: it re-runs LoftQ on the base it is given while building the
    adapter, then loads the file's ``A, B`` over the fitted factors. LoftQ is deterministic, so the original float
    model ``W`` gets PEFT's ``Q`` bit for bit (same NF4/LLM.int8 rounding, same SVD), and a float base that already
    is ``Q`` keeps it (quantising ``Q`` gives ``Q``; the SVD of ``Q - Q = 0`` gives ``B A = 0``).

    A layer whose base is already bitsandbytes-quantised is left as given, with a warning: re-running LoftQ needs
    the float weights, and on NF4 values it would change nothing anyway, so the base must already hold the LoftQ
    base (``unload()`` of the created model, quantised; or ``quantize_loftq_base`` after a float load). PEFT cannot
    load there: on a 4-bit base it runs LoftQ on the packed storage (a size-mismatch error), on an 8-bit base it
    overwrites the int8 codes with wrapped-around values (silently).

    Raises:
        ConfigError: ``loftq_config`` missing or invalid, bitsandbytes missing, or a layer of the adapter that
            LoftQ cannot rebuild (not ``nn.Linear``, ``fan_in_fan_out``, or with adapters merged into it):
            before any weight changes. On any later error the original base weights are restored.
    """
    from deltatune.lora.layer import LoraLayer, LoraLinear

    settings = _read_settings(getattr(config, "loftq_config", None))
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.r]
    for name, layer in layers:
        if not isinstance(layer, LoraLinear) or adapter_name not in layer.lora_A or layer.fan_in_fan_out:
            raise ConfigError(f"{name}: a LoftQ adapter's base is rebuilt on nn.Linear layers only (PEFT cannot load "
                              f"it on {type(layer.base_layer).__name__} either); save the adapter with "
                              "init_lora_weights=True onto its LoftQ base instead")
        if layer.merged_adapters:
            raise ConfigError(f"{name}: LoftQ's base is computed from the unmerged weight, but adapters "
                              f"{layer.merged_adapters} are merged into it; unmerge_adapter() before loading")
    quantised = [n for n, m in layers if m.quantized]
    if quantised:
        warnings.warn(f"adapter {adapter_name!r} was initialised with 'loftq' and the base of {len(quantised)} of its "
                      f"layers (e.g. {quantised[0]}) is already quantised: loaded onto it as given, so that base must "
                      "be the LoftQ base quantised (LoftQ is rebuilt from float weights; PEFT cannot load it here)",
                      stacklevel=5)
    floats = [m for _, m in layers if not m.quantized]
    if not floats:
        return
    try:
        require_bnb()
    except Exception as exc:
        raise ConfigError(f"loading a LoftQ adapter rebuilds its quantised base with bitsandbytes: {exc}") from None
    saved: list[tuple[LoraLinear, torch.Tensor]] = []
    try:
        for layer in floats:
            weight = layer.base_layer.weight
            q, _, _ = loftq_factors(weight.data, settings.loftq_bits, layer.r[adapter_name], settings.loftq_iter)
            # Only the rebuilt layers' originals are kept (off the accelerator) until every layer is done.
            saved.append((layer, weight.data if weight.device.type == "cpu" else weight.data.to("cpu")))
            layer.write_base_weight(q.to(weight.device, weight.dtype))
    except BaseException:
        for layer, original in reversed(saved):
            layer.write_base_weight(original.to(layer.base_layer.weight.device))
        raise


def quantize_loftq_base(model: nn.Module, quant_type: str = "nf4") -> nn.Module:
    """QLoRA after LoftQ: quantise the frozen base of ``model`` (a ``PeftModel`` whose LoftQ adapter made its base
    ``Q``, at creation or by :func:`rebuild_base` at load) to bitsandbytes NF4 in place, blocks of 64 with fp32
    scales (no double quantisation). NF4 of ``Q`` is ``Q`` exactly, so the model computes what it did in float,
    with the base in 4 bits. The adapters' own layers (``lora_A``, ``lora_B``, ...), ``modules_to_save`` and
    the output head stay in full precision; linear layers LoftQ did not touch get plain NF4 (QLoRA's base).

    Raises:
        ConfigError: ``quant_type`` other than ``"nf4"`` (LoftQ's 4-bit base is NF4; quantising it otherwise
            would lose what LoftQ fitted the adapter to).
    """
    from deltatune.core.layer import AdapterLayer
    from deltatune.core.modules_to_save import ModulesToSaveWrapper
    from deltatune.quantization import quantize

    if quant_type != "nf4":
        raise ConfigError(f"a LoftQ base is quantised to NF4 (loftq_bits=4), not {quant_type!r}: quantise with 'nf4'")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    owned: set[str] = set()  # linear layers that are the adapters', not the base's
    for name, module in base.named_modules():
        if isinstance(module, AdapterLayer | ModulesToSaveWrapper):
            owned.update(f"{name}.{sub}" for sub, m in module.named_modules() if sub and isinstance(m, nn.Linear)
                         and not (isinstance(module, AdapterLayer) and sub.split(".")[0] == "base_layer"))
        elif isinstance(module, nn.Linear) and any(p.requires_grad for p in module.parameters()):
            owned.add(name)
    quantize(base, "nf4", double_quant=False, skip_modules=sorted(owned))
    for module in base.modules():
        if isinstance(module, AdapterLayer):
            module.quantized = is_quantized_layer(module.base_layer)
            module._clear_row_cache()
    return model


def get_peft_model_with_data(model: nn.Module, config: object, batches: Iterable[Mapping[str, torch.Tensor]],
                             adapter_name: str = "default", *, create: Callable[..., PeftModel]) -> PeftModel:
    """LoftQ needs no data: ``create(model, config)`` (``get_peft_model``; ``batches`` is ignored)."""
    return create(model, config, adapter_name=adapter_name)


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
           "quantize_loftq_base", "rebuild_base", "replace_lora_weights_loftq"]
