"""Small helpers PEFT users reach for in ``peft.helpers``: is a directory an adapter, and switching off the
input dtype cast of adapter layers for a while.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from torch import nn

from deltatune.config import PeftConfig
from deltatune.core.layer import AdapterLayer


def check_if_peft_model(model_name_or_path: str | os.PathLike) -> bool:
    """``True`` when ``model_name_or_path`` holds an adapter config deltatune can read (PEFT's meaning).

    A directory without ``adapter_config.json`` (a plain model, a hub id: deltatune does not download), a config
    naming no adapter method, or any other failure to read one answers ``False``: the question is "can this be
    loaded as an adapter?", never an error. An adapter saved under a non-default name lives in a sub-folder; ask
    about that folder.
    """
    try:
        PeftConfig.from_pretrained(model_name_or_path)
    except Exception:  # noqa: BLE001 - any reason it cannot be read means "not an adapter" (as PEFT answers)
        return False
    return True


@contextlib.contextmanager
def disable_input_dtype_casting(model: nn.Module, active: bool = True) -> Iterator[None]:
    """Within the block, adapter layers leave their input's dtype as it comes (PEFT's context manager).

    Normally an adapter layer casts its input ``x`` to its adapter weights' dtype before ``x @ Aᵀ``. Tools that
    cast weights themselves in forward hooks (diffusers' layerwise casting: fp16 storage, fp32 compute) need
    the input left alone, else the hook's upcast weight meets a downcast input. ``active=False`` makes the
    block a no-op, so callers can switch it with a flag. On exit every layer gets back the setting it had
    (even after an error).
    """
    if not active:
        yield
        return
    saved = {name: module.cast_input_dtype_enabled for name, module in model.named_modules()
             if isinstance(module, AdapterLayer)}
    for name, module in model.named_modules():
        if name in saved:
            module.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for name, module in model.named_modules():
            if name in saved and isinstance(module, AdapterLayer):
                module.cast_input_dtype_enabled = saved[name]
