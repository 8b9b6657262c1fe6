"""Checks an adapter's files must pass before deltatune builds or uses the adapter.

One place for them, so every command that loads an adapter (``eval``, ``generate``, ``merge``, a future
``serve``) refuses the same bad files with the same one-line message:

* :func:`check_config_fits_file`: the sizes ``adapter_config.json`` asks for (``r``, ``num_virtual_tokens``...)
  must appear in the weight file's tensor shapes. Run before the adapter is built, so a config that says
  ``r: 1000000000`` is refused at once instead of allocating hundreds of gigabytes first.
* :func:`check_finite` / :func:`check_adapter_finite`: no NaN or Inf in any tensor. ``PeftModel.from_pretrained``
  loads such files as PEFT does (a user may want to look at them); the CLI refuses them, since every number it
  would print or write from them is meaningless.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from deltatune.core.io import BIN_NAME, SAFETENSORS_NAME, load_adapter_weights
from deltatune.errors import AdapterLoadError

# Config fields that are a tensor dimension of the adapter they build, per peft_type (prompt-learning methods:
# num_virtual_tokens). Each value must then be a dimension of some tensor in the file. Fields that do not
# always become a dimension are left out: LoKr's r (ignored when a factor is too small to decompose), AdaLoRA's
# r (unused; init_r is what it builds), OFT's oft_block_size (packed in newer files).
_SIZE_FIELDS: dict[str, tuple[str, ...]] = {
    "LORA": ("r", "rank_pattern"),
    "LOHA": ("r", "rank_pattern"),
    "ADALORA": ("init_r",),
    "VERA": ("r",),
    "OFT": ("r",),
}


def weights_file(directory: str) -> str:
    """The weight file :func:`~deltatune.core.io.load_adapter_weights` reads in ``directory`` (safetensors first)."""
    st_path = os.path.join(directory, SAFETENSORS_NAME)
    return st_path if os.path.exists(st_path) else os.path.join(directory, BIN_NAME)


def _size_values(config: Any) -> list[tuple[str, int]]:
    """``(field as written, value)`` for every size field of ``config`` that holds a positive integer."""
    fields = list(_SIZE_FIELDS.get(str(getattr(config, "peft_type", "")).upper(), ()))
    if getattr(config, "is_prompt_learning", False):
        fields.append("num_virtual_tokens")
    out: list[tuple[str, int]] = []
    for name in fields:
        value = getattr(config, name, None)
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for key, v in items:
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                out.append((f"{name}[{key!r}]" if key is not None else name, v))
    return out


def check_config_fits_file(config: Any, weights: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse a config whose sizes no tensor of the file has, before anything is built from it.

    Every size field in ``_SIZE_FIELDS`` becomes a dimension of the tensors the adapter holds (``r`` is the
    first dimension of each ``lora_A``), and the file must hold every such tensor to load, so a value larger
    than every dimension in the file cannot load. Checked as a bound, not an equality, so no valid adapter is
    refused (an exact per-module check is :func:`~deltatune.core.state_dict.check_and_load`'s, after building).

    Raises:
        AdapterLoadError: names the field, its value, and the file's largest tensor (key and shape).
    """
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    if not shapes or not any(shapes.values()):
        return
    key, shape = max(((k, s) for k, s in shapes.items() if s), key=lambda item: max(item[1]))
    largest = max(shape)
    for field_name, value in _size_values(config):
        if value > largest:
            module = key.removeprefix("base_model.model.")
            raise AdapterLoadError(
                f"{where}: adapter_config.json says {field_name}={value}, but no tensor in the weight file has a "
                f"dimension that large (the largest is {largest}: {module} has shape {shape}); the config does "
                f"not belong to these weights: fix {field_name.split('[')[0]} in adapter_config.json or re-save "
                "the adapter"
            )


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The first key (in the file's order) of a floating-point tensor holding NaN or Inf, else ``None``."""
    for key, value in tensors.items():
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            return key
    return None


def check_finite(tensors: Mapping[str, torch.Tensor], path: str) -> None:
    """Refuse adapter tensors with NaN or Inf values.

    Raises:
        AdapterLoadError: names the file and the first bad tensor.
    """
    bad = first_non_finite(tensors)
    if bad is not None:
        value = tensors[bad].detach().float()
        what = ", ".join(n for n, t in (("NaN", value.isnan()), ("Inf", value.isinf())) if bool(t.any()))
        raise AdapterLoadError(
            f"{path}: tensor {bad} holds {what} values, so every output of this adapter would be meaningless "
            "(did its training diverge?); deltatune will not use it: retrain it (a lower learning rate) or use an "
            "earlier checkpoint"
        )


def check_adapter_finite(directory: str) -> None:
    """:func:`check_finite` on the weight file of the adapter directory ``directory``."""
    check_finite(load_adapter_weights(directory), weights_file(directory))


__all__ = ["check_config_fits_file", "first_non_finite", "check_finite", "check_adapter_finite", "weights_file"]
