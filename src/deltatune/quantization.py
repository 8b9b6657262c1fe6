"""Quantised frozen bases for QLoRA (Dettmers et al., 2023), through bitsandbytes.

``quantize`` turns an already-loaded model's linear layers into bitsandbytes ``Linear4bit`` (NF4/FP4, with
optional double quantisation of the scales) or ``Linear8bitLt`` (LLM.int8), one layer at a time so the peak
never holds a second full-precision copy of the model. Adapters then train on top in higher precision.
bitsandbytes is an optional extra: ``pip install 'deltatune[qlora]'``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from deltatune.core.targeting import output_head_name
from deltatune.errors import ConfigError, DeltatuneError

QUANT_TYPES = ("nf4", "fp4", "int8")


class _NoKernelHubNotice(logging.Filter):
    """Drops one import-time warning of bitsandbytes (>= 0.49): on a CPU with AVX512-BF16 it asks the
    ``kernels`` package for a bf16 4-bit GEMM from the Hugging Face hub and, when that fails (offline, or the
    publisher not trusted), logs "Failed to load CPU gemm_4bit_forward ..." and uses its own kernel, which
    is the documented fallback. Every other bitsandbytes message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


_NO_KERNEL_HUB_NOTICE = _NoKernelHubNotice()


def require_bnb():
    """Import bitsandbytes or say how to install it."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NO_KERNEL_HUB_NOTICE)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise DeltatuneError(
            "quantisation needs bitsandbytes, which is not installed; run: pip install 'deltatune[qlora]'"
        ) from None
    return bnb


def bnb_available() -> bool:
    """Whether bitsandbytes imports (quietly, as :func:`require_bnb` does)."""
    try:
        require_bnb()
    except DeltatuneError:
        return False
    return True


def is_quantized_layer(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return w is not None and type(w).__name__ in ("Params4bit", "Int8Params")


def dense_weight_shape(module: nn.Module) -> torch.Size:
    """The shape of ``module.weight`` as a dense tensor: ``(out, in)`` for a bitsandbytes layer (whose stored
    weight is packed), else the weight's own shape."""
    if is_quantized_layer(module):
        return torch.Size((module.out_features, module.in_features))
    return module.weight.shape


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The dense ``(out, in)`` float weight of a plain or bitsandbytes linear layer."""
    w = module.weight
    kind = type(w).__name__
    if kind == "Params4bit":
        bnb = require_bnb()
        data, state = w.data, w.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel on the first no-grad eval
            # forward; undo that on a copy (the inverse mutates the state it is given).
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        return bnb.functional.dequantize_4bit(data, state).to(torch.float32)
    if kind == "Int8Params":
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = getattr(module.state, "SCB", None)
        return w.data.to(torch.float32) * (scb.to(torch.float32)[:, None] / 127.0)
    return w.data


def requantize_like(param: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """A new bitsandbytes parameter holding ``dense: (out, in)``, quantised like ``param`` (lossy)."""
    bnb = require_bnb()
    kind = type(param).__name__
    if kind == "Params4bit":
        new = bnb.nn.Params4bit(dense.to(torch.float32).contiguous(), requires_grad=False,
                                quant_type=param.quant_type, compress_statistics=param.compress_statistics,
                                blocksize=param.blocksize)
        return new.to(param.device)
    raise ConfigError(
        "merging into an 8-bit (LLM.int8) base in place is not supported: use merge_and_unload(), which "
        "returns a dequantised model with the exact merge"
    )


def _quantized_linear(layer: nn.Linear, quant_type: str, double_quant: bool,
                      compute_dtype: torch.dtype | None) -> nn.Module:
    bnb = require_bnb()
    weight = layer.weight.data
    device = weight.device
    bias = layer.bias is not None
    if quant_type == "int8":
        q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias, has_fp16_weights=False,
                                threshold=6.0, device="meta")
        q.weight = bnb.nn.Int8Params(weight.to(torch.float16 if device.type == "cuda" else weight.dtype),
                                     requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias,
                              compute_dtype=compute_dtype or weight.dtype, compress_statistics=double_quant,
                              quant_type=quant_type, device="meta")
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant,
                                     quant_type=quant_type)
    if bias:
        q.bias = nn.Parameter(layer.bias.data.to(compute_dtype or layer.bias.dtype), requires_grad=False)
    return q.to(device)  # moving a bitsandbytes parameter is what quantises it


def quantize(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True,
             compute_dtype: torch.dtype | None = None, skip_modules: list[str] | None = None) -> nn.Module:
    """Quantise ``model``'s ``nn.Linear`` layers in place (all but the output head and ``skip_modules``).

    Args:
        quant_type: ``"nf4"`` (4-bit NormalFloat), ``"fp4"`` or ``"int8"`` (LLM.int8).
        double_quant: Quantise the 4-bit blocks' scales too (QLoRA's double quantisation).
        compute_dtype: Dtype of the matmuls of 4-bit layers (default: the layer's own dtype).
        skip_modules: Names or suffixes of linear layers to keep in full precision.

    Returns:
        ``model``, with ``model.is_loaded_in_4bit``/``is_loaded_in_8bit`` set as ``transformers`` does.
    """
    if quant_type not in QUANT_TYPES:
        raise ConfigError(f"quant_type={quant_type!r} is not supported; use one of {', '.join(QUANT_TYPES)}")
    require_bnb()
    skip = list(skip_modules or [])
    head = output_head_name(model)
    if head:
        skip.append(head)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear
             and not any(n == s or n.endswith("." + s) for s in skip)]
    if not names:
        conv1d = sorted({type(m).__name__ for m in model.modules() if type(m).__name__ == "Conv1D"})
        why = (" (its projections are transformers' Conv1D, stored transposed, which bitsandbytes' layers do not "
               "replace here; load the model with transformers' BitsAndBytesConfig instead)") if conv1d else ""
        raise ConfigError(f"the model has no nn.Linear layer to quantise (outside skip_modules){why}")
    for name in names:  # one layer at a time: the float weight is freed as soon as it is replaced
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quantized_linear(getattr(parent, child), quant_type, double_quant, compute_dtype))
    _release_mapped_checkpoint(model)
    if quant_type == "int8":
        model.is_loaded_in_8bit = True
    else:
        model.is_loaded_in_4bit = True
    return model


def _release_mapped_checkpoint(model: nn.Module) -> None:
    """Copy the tensors left in full precision (embeddings, norms, head) out of a memory-mapped checkpoint.

    ``from_pretrained`` maps the safetensors file; the pages quantisation read stay resident while any tensor
    still views the mapping, so a quantised model would keep the float weights' memory. Mapped storages are
    the non-resizable ones; copying them (a few tensors) lets the mapping go.
    """
    for module in model.modules():
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if t is None or is_quantized_layer(module) and name == "weight":
                continue
            if not t.untyped_storage().resizable():
                t.data = t.data.clone()


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every bitsandbytes layer of ``model`` (in place) by a dense ``nn.Linear`` holding its dequantised
    weight, in the layer's compute dtype (fp32 for int8). The inverse of :func:`quantize` up to its rounding."""
    names = [n for n, m in model.named_modules() if is_quantized_layer(m) and not hasattr(m, "base_layer")]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        dtype = getattr(layer, "compute_dtype", None) or torch.float32
        weight = dequantize_weight(layer)
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=weight.device, dtype=dtype)
        dense.weight.data = weight.to(dtype)
        if layer.bias is not None:
            dense.bias.data = layer.bias.data.to(dtype).clone()
        dense.requires_grad_(False)
        setattr(parent, child, dense)
    if not any(is_quantized_layer(m) for m in model.modules()):
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
            if getattr(model, flag, False):
                setattr(model, flag, False)
    return model


@contextlib.contextmanager
def exact_4bit_kernels(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model``'s 4-bit layers through bitsandbytes' dequantise-then-fp32-matmul path.

    On CPU, an eval-mode forward without grad repacks 4-bit weights for a bf16 kernel (and every later
    forward uses it), so outputs move by bf16 rounding. Inside this context the repacking is undone (with
    bitsandbytes' own inverse, as its ``state_dict`` does) and the layers report ``training=True``, which is
    all bitsandbytes looks at; 4-bit layers have no dropout, so nothing else changes.
    """
    layers = [m for m in model.modules() if type(getattr(m, "weight", None)).__name__ == "Params4bit"]
    modes = [m.training for m in layers]
    for m in layers:
        state = m.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(m.weight.data, state)
        m.training = True
    try:
        yield model
    finally:
        for m, mode in zip(layers, modes, strict=True):
            m.training = mode


def _logits(model: nn.Module, inputs: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    out = getattr(out, "logits", out)
    return (out[0] if isinstance(out, (tuple, list)) else out).float()


def merge_and_report(model: nn.Module, inputs: torch.Tensor | dict[str, torch.Tensor],
                     requantize: str | None = None, double_quant: bool = True,
                     dense: bool = False, dtype: torch.dtype | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """``model.merge_and_unload()`` over a quantised base, with the merge error measured on ``inputs``.

    The adapters are folded into the dequantised weights (exact), so the merged model's layers are dense;
    ``requantize`` (``"nf4"``, ``"fp4"``, ``"int8"``) quantises the merged model again, which costs that
    format's rounding of the new weights. ``dense=True`` also dequantises the layers no adapter touched;
    ``dtype`` casts the dense merged model (implies ``dense``) and is the compute dtype of a requantised one.

    The error is ``|merged(x) - unmerged(x)|`` over the logits of ``inputs`` (``(batch, seq)`` token ids or a
    dict of model inputs), both computed in eval mode under :func:`exact_4bit_kernels` so it measures the
    merge and nothing else.

    Returns:
        ``(merged_model, {"max_abs_diff", "mean_abs_diff", "requantized"})``.
    """
    if requantize is not None and requantize not in QUANT_TYPES:
        raise ConfigError(f"requantize={requantize!r} is not supported; use one of {', '.join(QUANT_TYPES)}")
    model.eval()
    with torch.no_grad(), exact_4bit_kernels(model):
        before = _logits(model, inputs)
    merged = model.merge_and_unload()
    if dense or dtype is not None or requantize is not None:
        merged = dequantize(merged)
    if dtype is not None:
        merged = merged.to(dtype)
    if requantize is not None:
        merged = quantize(merged, requantize, double_quant=double_quant, compute_dtype=dtype)
    merged.eval()
    with torch.no_grad(), exact_4bit_kernels(merged):
        after = _logits(merged, inputs)
    diff = (after - before).abs()
    return merged, {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
                    "requantized": requantize}


def use_exact_cpu_kernels(model: nn.Module) -> nn.Module:
    """Stop bitsandbytes from repacking ``model``'s 4-bit weights for its bf16 CPU kernel in eval forwards.

    The repacking rounds the block scales (it cannot be undone exactly) and makes eval outputs differ from
    training-mode ones; with it off, evaluation computes what training computed, so an evaluation after
    training and a later ``deltatune eval`` of the saved adapter give the same numbers.
    """
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def bnb_config(quant_type: str, double_quant: bool = True, compute_dtype: torch.dtype | None = None,
               skip_modules: list[str] | None = None):
    """The ``transformers.BitsAndBytesConfig`` describing what :func:`quantize` does, for a model's
    ``config.quantization_config``: with it, ``save_pretrained`` writes a model that ``from_pretrained`` loads
    back quantised (bitsandbytes' packed weights and statistics, no requantising)."""
    from transformers import BitsAndBytesConfig

    if quant_type not in QUANT_TYPES:
        raise ConfigError(f"quant_type={quant_type!r} is not supported; use one of {', '.join(QUANT_TYPES)}")
    if quant_type == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype or torch.float32,
                              llm_int8_skip_modules=skip_modules)


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, quantisation statistics included."""
    seen: set[int] = set()
    total = 0
    tensors: list[torch.Tensor] = [*model.parameters(), *model.buffers()]
    for m in model.modules():
        w = getattr(m, "weight", None)
        state = getattr(w, "quant_state", None)
        if state is not None:
            tensors += [t for t in (state.absmax, state.code) if isinstance(t, torch.Tensor)]
            nested = getattr(state, "state2", None)
            if nested is not None:
                tensors += [t for t in (nested.absmax, nested.code) if isinstance(t, torch.Tensor)]
        scb = getattr(w, "SCB", None)
        if isinstance(scb, torch.Tensor):
            tensors.append(scb)
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += t.untyped_storage().nbytes()
    return total


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
                                    auto_clear_cache: bool = True) -> nn.Module:
    """Get a quantised model ready for adapter training (PEFT's meaning).

    Freezes every parameter, upcasts fp16/bf16 parameters that are not quantised (norms, embeddings,
    head) to fp32 for stable training, and with gradient checkpointing makes the input embeddings' output
    require grad so checkpointed blocks over a frozen base still backpropagate into the adapters.
    ``auto_clear_cache`` (PEFT's default ``True``): after the upcasts, hand the CUDA allocator's cached blocks
    back (``torch.cuda.empty_cache()``), so the fp16 copies the casts freed do not stay reserved; ``False``
    leaves the cache alone.
    """
    kwargs = {"use_reentrant": True, **(gradient_checkpointing_kwargs or {})}  # PEFT's default, said explicitly
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16) and type(p).__name__ not in ("Params4bit", "Int8Params"):
            p.data = p.data.to(torch.float32)
    if auto_clear_cache and torch.cuda.is_available():
        torch.cuda.empty_cache()
    if use_gradient_checkpointing:
        if kwargs["use_reentrant"]:
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:
                model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        if not enable_checkpointing(model, kwargs):
            raise ConfigError("this model has no gradient_checkpointing_enable(); "
                              "pass use_gradient_checkpointing=False")
    return model


def enable_checkpointing(model: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Turn on a ``transformers`` model's activation (gradient) checkpointing with ``torch.utils.checkpoint``
    ``kwargs``; ``False`` if the model has no such switch. transformers 5 calls it
    ``activation_checkpointing_enable`` (the old name warns that it goes away in v6); older releases have only
    ``gradient_checkpointing_enable``."""
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
        model, "gradient_checkpointing_enable", None)
    if enable is None:
        return False
    params = inspect.signature(enable).parameters
    names = ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")
    name = next((n for n in names if n in params), None)
    enable(**({name: kwargs} if name else {}))
    return True
