"""``deltatune inspect``: what an adapter directory holds, read from its files without loading a model.

Works on directories written by deltatune or by ``peft`` (the same two files).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import struct
from collections import Counter
from typing import Any

from deltatune.cli.common import UsageError, check_adapter_dir, human_bytes

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_safetensors_header(path: str) -> dict[str, dict[str, Any]]:
    """``{tensor name: {"dtype", "shape", "data_offsets"}}`` from a safetensors file's JSON header.

    The format is an 8-byte little-endian header length, the JSON header, then the raw bytes; reading
    the header costs nothing however large the file is. The header is checked as safetensors itself checks it
    (every entry a dtype, a shape and offsets that fit the file), so a truncated or corrupt file is one line.

    Raises:
        UsageError: the file is not a readable, complete safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    def broken(reason: str) -> UsageError:
        return UsageError(f"{path} is not a readable safetensors file ({reason}): it is truncated or corrupt; "
                          "re-save or re-download the adapter")

    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(fh.read(n))
        with safe_open(path, "pt"):  # validates the header against the file: offsets, sizes, dtypes
            pass
    except SafetensorError as exc:
        raise broken(str(exc).splitlines()[0][:200]) from None
    except (OSError, ValueError, struct.error) as exc:
        raise broken(type(exc).__name__) from None
    if not isinstance(header, dict):
        raise broken("its header is not a JSON object")
    header.pop("__metadata__", None)
    return header


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
        method_for(config.get("peft_type"))
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
    variants = [name for flag, name in (("use_dora", "DoRA"), ("use_rslora", "rsLoRA")) if config.get(flag)]
    save_names = config.get("modules_to_save") or []
    saved = {k for k in tensors if "modules_to_save" in k or any(re.search(rf"(^|\.){re.escape(m)}\.", k)
                                                                 for m in save_names)}
    # Per-layer tensors live under base_model.model.<layer>; model-wide ones (VeRA's shared projections,
    # a soft prompt) do not.
    layer_keys = [k for k in tensors if k not in saved and k.startswith("base_model.model.")]
    modules = sorted({_module_of(k) for k in layer_keys})
    ranks = Counter(v["shape"][0] for k, v in tensors.items() if re.search(r"\.lora_A(\.weight)?$", k)
                    and v["shape"])
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
    info["size"] = _method_size(config, {k: v["shape"] for k, v in tensors.items()})
    others = sorted(d for d in os.listdir(directory)
                    if os.path.isfile(os.path.join(directory, d, "adapter_config.json")))
    if others:
        info["other_adapters"] = others
    return info


def _method_size(config: dict[str, Any], shapes: dict[str, list[int]]) -> str | None:
    """The method's own size line (registry ``inspect_size``), for methods whose size is not a rank."""
    from deltatune.errors import ConfigError
    from deltatune.registry import method_for

    try:
        method = method_for(config.get("peft_type"))
    except ConfigError:
        return None
    return method.inspect_size(config, shapes) if method.inspect_size is not None else None


def _module_of(key: str) -> str:
    """``base_model.model.x.q_proj.lora_A.weight`` -> ``x.q_proj``: the layer that holds the tensor."""
    key = re.sub(r"^base_model\.model\.", "", key)
    parts = key.split(".")
    for i, part in enumerate(parts):
        if re.match(r"(lora_|hada_|lokr_|ia3_|vera_|oft_|boft_|ln_tuning|magnitude)", part):
            return ".".join(parts[:i])
    return ".".join(parts[:-1])


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
        targets = f"{targets} ({info['adapted_modules']} layers: {', '.join(info['module_suffixes'])})"
    elif info["num_virtual_tokens"]:
        targets = "no layer: the adapter is virtual tokens fed to the model"
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
