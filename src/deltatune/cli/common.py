"""What every subcommand shares: the usage error, the names of a run's files, reading JSON, and printing.

The rest lives in modules named for what they do, and is importable from here too, as before:
:mod:`~deltatune.cli.settings` (a run's settings and their layering), :mod:`~deltatune.cli.options` (flags from
config dataclasses), :mod:`~deltatune.cli.loading` (models, data, quantisation, devices, adapters) and
:mod:`~deltatune.cli.evaluation` (a task and its metric).
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

from deltatune.errors import DeltatuneError

BUILTIN_MODELS = ("smollm2-135m", "minilm-l6")
RUN_CONFIG_NAME = "run_config.json"
SUMMARY_NAME = "summary.json"


class UsageError(DeltatuneError, ValueError):
    """A command-line option or setting that cannot work."""

def read_json(path: str) -> dict[str, Any]:
    """The JSON object in ``path``; ``{}`` when there is no such file."""
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        raise UsageError(f"{path} is not valid JSON ({reason}); re-save it") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} must hold a JSON object, found a {type(value).__name__}; re-save it")
    return value


def human_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def human_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Names that moved to the modules named for them, importable from here as before (``common.load_model``).
_MOVED = {
    "settings": ("RunSettings", "DEFAULTS", "RECIPES", "ENCODER_RECIPES", "HARMLESS", "CHANGEABLE_ON_RESUME",
                 "load_config_file", "layer_settings", "recipe_for"),
    "options": ("QUANTIZE_CHOICES", "method_table", "method_entry", "shared_options_for", "default_lr",
                "method_fields", "value_parser", "add_method_options", "build_peft_config", "fill_method_defaults"),
    "loading": ("ModelSpec", "resolve_model", "model_kind", "load_tokenizer", "load_model", "check_quantize",
                "run_quantize", "quantize_base", "pick_device", "load_data", "check_adapter_dir",
                "check_adapter_weights", "adapter_base_and_labels", "read_safetensors_header", "load_with_adapter",
                "base_with_adapter", "attach_adapter", "recorded_base"),
    "evaluation": ("Task", "make_task", "general_text_examples", "forgetting_texts"),
}
_HOME = {name: module for module, names in _MOVED.items() for name in names}


def __getattr__(name: str) -> Any:
    """A moved name, from its module (imported on first use: those modules import this one)."""
    if name == "data_mod":
        return importlib.import_module("deltatune.training.data")
    if name in _HOME:
        return getattr(importlib.import_module(f"deltatune.cli.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
