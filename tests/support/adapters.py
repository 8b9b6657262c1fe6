"""Adapter folders on disk, as the interop, CLI and loading tests read and break them."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence both libraries' warnings (fan_in_fan_out on GPT-2's Conv1D, save_projection=False, ...) where a
    test checks numbers, not warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def adapter_dir(root, adapter_name: str) -> str:
    """Where save_pretrained puts an adapter: the root for "default", a sub-folder otherwise (PEFT's rule)."""
    return str(root) if adapter_name == "default" else os.path.join(str(root), adapter_name)


def edit_adapter_config(directory: str, **changes) -> None:
    """Rewrite fields of ``directory``'s adapter_config.json in place."""
    path = os.path.join(directory, "adapter_config.json")
    with open(path) as fh:
        config = json.load(fh)
    config.update(changes)
    with open(path, "w") as fh:
        json.dump(config, fh)
