"""``deltatune inspect``: what an adapter directory holds, read from its files without loading a model.

Works on directories written by deltatune or by ``peft`` (the same two files).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections import Counter
from typing import TYPE_CHECKING, Any

# read_safetensors_header lives in common (which reads heads' sizes too), so common never imports this module
from deltatune.cli.common import UsageError, human_bytes
from deltatune.cli.loading import check_adapter_dir, read_safetensors_header

if TYPE_CHECKING:
    from deltatune.registry import Method


def describe(directory: str) -> dict[str, Any]:
    """A summary of the adapter in ``directory`` (see :func:`main` for the fields).

    Raises:
        UsageError: not an adapter directory, a config of an unknown method, or weight files that cannot be read
            (truncated, or a ``.bin`` that holds pickled code): one line each.
    """
    from deltatune.errors import ConfigError
    from deltatune.registry import method_for

    config = check_adapter_dir(directory, None)
    try:
        method = method_for(config.get("peft_type"))
    except ConfigError as exc:
        raise UsageError(f"{os.path.join(directory, 'adapter_config.json')}: {exc}") from None
    st_path = os.path.join(directory, "adapter_model.safetensors")
    bin_path = os.path.join(directory, "adapter_model.bin")
    if os.path.exists(st_path):
        path = st_path
        tensors = {k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in read_safetensors_header(st_path).items()}
    elif os.path.exists(bin_path):
        from deltatune.core.io import load_adapter_weights

        path = bin_path
        state = load_adapter_weights(directory)  # weights only: a pickle holding code is refused in one line
        tensors = {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)} for k, v in state.items()}
    else:
        raise UsageError(f"{directory} has no adapter_model.safetensors or adapter_model.bin")
    peft_type = str(config.get("peft_type", "?"))
    labels = getattr(method.config_cls, "variant_labels", None)  # LoRA's: DoRA, rsLoRA (lora/variants.py)
    variants = labels(config) if labels is not None else []
    save_names = config.get("modules_to_save") or []
    saved = {k for k in tensors if "modules_to_save" in k or any(re.search(rf"(^|\.){re.escape(m)}\.", k)
                                                                 for m in save_names)}
    # Per-layer tensors live under base_model.model.<layer>; model-wide ones (VeRA's shared projections,
    # a soft prompt) do not.
    layer_keys = [k for k in tensors if k not in saved and k.startswith("base_model.model.")]
    split = {k: _split_key(k, method) for k in layer_keys}  # (module, container), None for a full weight
    modules = sorted({hit[0] for hit in split.values() if hit})
    ranks = Counter(tensors[k]["shape"][0] for k, hit in split.items()
                    if hit and hit[1] == method.hooks.rank_container != "" and tensors[k]["shape"])
    n_params = sum(math.prod(v["shape"]) for v in tensors.values())
    n_saved = sum(math.prod(tensors[k]["shape"]) for k in saved)
    info = {
        "directory": directory,
        "method": peft_type + (f" ({', '.join(variants)})" if variants else ""),
        "task_type": config.get("task_type"),
        "base_model": config.get("base_model_name_or_path"),
        "target_modules": config.get("target_modules"),
        "adapted_modules": len(modules),
        "module_suffixes": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "module_names": modules,
        "r": config.get("r"),
        "num_virtual_tokens": config.get("num_virtual_tokens"),
        "lora_alpha": config.get("lora_alpha"),
        "init_lora_weights": config.get("init_lora_weights"),
        "ranks_in_file": dict(sorted(ranks.items())),
        "modules_to_save": save_names,
        "parameters": n_params,
        "parameters_in_modules_to_save": n_saved,
        "dtypes": sorted({v["dtype"] for v in tensors.values()}),
        "file": os.path.basename(path),
        "file_bytes": os.path.getsize(path),
        "tensors": len(tensors),
        "written_by": "deltatune" if os.path.exists(os.path.join(directory, "run_config.json"))
        else ("peft " + str(config["peft_version"]) if config.get("peft_version") else "unknown"),
    }
    shapes = {k: v["shape"] for k, v in tensors.items()}
    info["size"] = method.hooks.inspect_size(config, shapes) if method.hooks.inspect_size is not None else None
    if method.hooks.inspect_targets is not None:  # no layer in the file, no virtual tokens (X-LoRA's classifier)
        info["targets_note"] = method.hooks.inspect_targets(config)
    others = sorted(d for d in os.listdir(directory)
                    if os.path.isfile(os.path.join(directory, d, "adapter_config.json")))
    if others:
        info["other_adapters"] = others
    return info


def _container_names(method: Method) -> list[list[str]]:
    """The method's container paths as they appear in file keys, split at the dots: its layers' containers,
    the file names PEFT gives some of them (``file_suffixes``) and the ones nested a module down."""
    names = {*method.containers, *method.hooks.nested_containers,
             *(suffix.split(".")[0] for suffix in method.file_suffixes.values())}
    return [name.split(".") for name in sorted(names)]


def _split_key(key: str, method: Method) -> tuple[str, str] | None:
    """``(module, container)`` of a file key: ``base_model.model.x.q_proj.lora_A.weight`` -> ``("x.q_proj",
    "lora_A")``, at the earliest container of ``method`` in the key; ``None`` for a key that holds none (a full
    weight saved beside the adapter, e.g. an embedding PEFT saves when it is a target)."""
    parts = key.removeprefix("base_model.model.").split(".")
    hits = [(i, name) for name in _container_names(method) for i in range(1, len(parts) - len(name) + 1)
            if parts[i:i + len(name)] == name]
    if not hits:
        return None
    i, name = min(hits, key=lambda hit: (hit[0], -len(hit[1])))
    return ".".join(parts[:i]), ".".join(name)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="what an adapter directory holds (also peft's)",
                              description="Method, targets, ranks, parameter count, file size and the base model an "
                                          "adapter expects, read from its files.")
    p.add_argument("adapter", help="adapter directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=main)


def _base_note(base: str | None) -> str:
    """The recorded base, and the built-in model it stands for when it is one (a hub id or a cache path)."""
    if not base:
        return "unknown"
    from deltatune.builtin.models import builtin_alias

    alias = builtin_alias(base)
    return f"{base} (the built-in {alias})" if alias and alias != base else base


def main(args: argparse.Namespace) -> int:
    info = describe(args.adapter)
    if args.json:
        print(json.dumps(info))
        return 0
    targets = info["target_modules"]
    if isinstance(targets, list):
        # "all-linear" is saved expanded to every full module name (PEFT's format): hundreds of names.
        targets = ", ".join(sorted(targets)) if len(targets) <= 8 else f"{len(targets)} module names"
    if info["adapted_modules"]:
        targets = (f"{targets} ({_plural(info['adapted_modules'], 'layer')}: "
                   f"{', '.join(info['module_suffixes'])})")
    elif info["num_virtual_tokens"]:
        targets = "no layer: the adapter is virtual tokens fed to the model"
    elif info.get("targets_note"):
        targets = info["targets_note"]
    rank = f"r={info['r']}" if info["r"] is not None else ""
    if info["lora_alpha"] is not None:
        rank += f", lora_alpha={info['lora_alpha']}"
    if info["init_lora_weights"] not in (None, True):  # how it started: not needed to load it (issue 19)
        rank += f", init_lora_weights={info['init_lora_weights']}"
    if info["ranks_in_file"]:
        rank += "; in the file: " + ", ".join(f"r={r} x{n}" for r, n in info["ranks_in_file"].items())
    saved_note = ""
    if info["parameters_in_modules_to_save"]:
        saved_note = (f" (of which modules_to_save {', '.join(info['modules_to_save'])}: "
                      f"{info['parameters_in_modules_to_save']:,d})")
    rows = [
        ("adapter", info["directory"]),
        ("method", info["method"]),
        ("task type", info["task_type"] or "none"),
        ("base model", _base_note(info["base_model"])),
        ("targets", str(targets)),
        ("rank", rank.lstrip(", ") or "n/a"),
        ("parameters in file", f"{info['parameters']:,d}" + saved_note),
        ("file", f"{info['file']}, {human_bytes(info['file_bytes'])}, {info['tensors']} tensors, "
                 f"{'/'.join(info['dtypes'])}"),
        ("written by", info["written_by"]),
    ]
    if info["num_virtual_tokens"]:
        rows[5] = ("virtual tokens", str(info["num_virtual_tokens"]))
    elif info.get("size"):
        rows[5] = ("size", info["size"])
    if info.get("other_adapters"):
        rows.append(("other adapters", ", ".join(info["other_adapters"])))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0
