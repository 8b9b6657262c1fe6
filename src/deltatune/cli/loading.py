"""Loading what a command works on: the base model and its tokenizer, the data, the quantised base (QLoRA), the
device, and an adapter directory (checked, then attached to its base)."""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.cli.common import BUILTIN_MODELS, RUN_CONFIG_NAME, UsageError, err, read_json
from deltatune.cli.options import QUANTIZE_CHOICES
from deltatune.cli.settings import DEFAULTS
from deltatune.errors import DeltatuneError
from deltatune.training import data as data_mod


# ---- models --------------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """Where a model is and what kind it is.

    Attributes:
        name: As the user gave it (a built-in name, a path, or a hub id): recorded in adapter configs.
        path: What ``from_pretrained`` gets.
        kind: ``"causal"`` (decoder LM) or ``"encoder"`` (BERT-like, used with a classification head).
        config: The ``transformers`` config.
    """

    name: str
    path: str
    kind: str
    config: Any


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_model(name: str) -> ModelSpec:
    """Find a model by built-in name, local directory, or hub id (online only), and tell its kind.

    Raises:
        UsageError: not any of those, or a directory without a readable ``config.json``.
    """
    from transformers import AutoConfig

    record_name = name
    if name in BUILTIN_MODELS:
        from deltatune.builtin.models import resolve_model_path

        path = os.fspath(resolve_model_path(name))
    elif os.path.isdir(name):
        path = name
        record_name = os.path.abspath(name)
        if not os.path.exists(os.path.join(path, "config.json")):
            raise UsageError(f"--model {name}: the directory has no config.json, so it is not a transformers "
                             "model directory (save one with model.save_pretrained)")
    elif os.path.exists(name):
        raise UsageError(f"--model {name} is a file; pass the model directory or a built-in name "
                         f"({', '.join(BUILTIN_MODELS)})")
    elif _HUB_ID.match(name) and not name.startswith((".", "/")):
        path = name
    else:
        raise UsageError(f"--model {name!r} is not a built-in model ({', '.join(BUILTIN_MODELS)}), a local "
                         "directory, or a hub id")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # many causes (bad JSON, unknown model_type, offline hub)
        hint = "is it a transformers model directory?" if os.path.isdir(path) else "the machine may be offline"
        from deltatune.builtin.models import builtin_alias

        if not os.path.isdir(path) and (alias := builtin_alias(name)):
            hint += f"; --model {alias} is the built-in copy of it"
        raise UsageError(f"--model {name}: cannot read its config ({type(exc).__name__}); {hint}") from None
    return ModelSpec(name=record_name, path=path, kind=model_kind(config, name), config=config)


def model_kind(config: Any, name: str) -> str:
    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "is_encoder_decoder", False):
        raise UsageError(f"--model {name}: encoder-decoder models ({config.model_type}) are not supported by the "
                         "CLI yet; use a decoder LM (smollm2-135m) or an encoder (minilm-l6)")
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal"
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    encoder_architecture = not architectures or any(
        a.endswith(("Model", "ForSequenceClassification", "ForMaskedLM")) for a in architectures)
    if (config.model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES and encoder_architecture
            and not getattr(config, "is_decoder", False)):
        return "encoder"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    raise UsageError(f"--model {name}: cannot use model type {config.model_type!r} (need a causal LM or an encoder)")


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()  # "some weights are newly initialised" is expected for heads
    transformers.utils.logging.disable_progress_bar()  # its per-file bars would bury the training bar


def load_tokenizer(spec: ModelSpec):
    """The model's tokenizer, with a pad token (EOS where the model has none)."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.path)
    except Exception as exc:
        raise UsageError(f"--model {spec.name}: cannot load its tokenizer ({type(exc).__name__}: {exc})"
                         .splitlines()[0]) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def load_model(spec: ModelSpec, labels: list[str] | None = None, device: torch.device | str = "cpu",
               tokenizer: Any = None) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` in fp32: a causal LM, or an encoder with a ``len(labels)``-way head."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    try:
        if spec.kind == "causal":
            model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch.float32)
        else:
            if not labels:
                raise UsageError(f"--model {spec.name} is an encoder: it needs classification (text+label) data")
            model = AutoModelForSequenceClassification.from_pretrained(
                spec.path, dtype=torch.float32, num_labels=len(labels),
                id2label=dict(enumerate(labels)), label2id={v: i for i, v in enumerate(labels)})
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"--model {spec.name}: cannot load the weights ({type(exc).__name__}: {exc})"
                         .splitlines()[0]) from None
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


def check_quantize(quant_type: str | None) -> str | None:
    """``None`` for no quantisation; otherwise the type, once bitsandbytes is known to import."""
    if quant_type in (None, "", "none"):
        return None
    if quant_type not in QUANTIZE_CHOICES:
        raise UsageError(f"--quantize {quant_type!r}: choose one of {', '.join(QUANTIZE_CHOICES)} (or none)")
    from deltatune.quantization import require_bnb

    try:
        require_bnb()
    except DeltatuneError as exc:
        raise UsageError(f"--quantize {quant_type}: {exc}") from None
    return quant_type


def run_quantize(run: dict, flag: str | None) -> str | None:
    """The base quantisation for an adapter: ``--quantize`` when given, else what its training run used."""
    return check_quantize(run.get("quantize") if flag is None else flag)


def quantize_base(model: nn.Module, quant_type: str | None) -> nn.Module:
    """QLoRA's frozen base: the model's linear layers (not the output head) in ``quant_type`` (NF4/FP4 with
    double quantisation, or int8), with bitsandbytes' CPU kernels kept exact so evaluations reproduce."""
    quant_type = check_quantize(quant_type)
    if quant_type is None:
        return model
    from deltatune.quantization import prepare_model_for_kbit_training, quantize, use_exact_cpu_kernels

    quantize(model, quant_type, double_quant=True)
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # the trainer enables it if asked
    return use_exact_cpu_kernels(model)


def pick_device(name: str) -> torch.device:
    from deltatune.distributed import device_for_rank

    if name == "auto":
        return device_for_rank(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (use auto, cpu, cuda, cuda:1...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    return device_for_rank(device)


# ---- data ----------------------------------------------------------------------------------------------
def load_data(settings: Any) -> data_mod.Dataset:
    """The data set ``settings`` names (a :class:`~deltatune.cli.settings.RunSettings` or a dict of the same keys):
    ``data``, ``eval_data``, ``format``, ``template`` and the ``<role>_column`` names."""
    columns = {role: settings.get(f"{role}_column") for role in ("text", "label", "prompt", "completion", "messages")
               if settings.get(f"{role}_column")}
    return data_mod.load_dataset(settings.get("data"), eval_data=settings.get("eval_data"), columns=columns,
                                 fmt=settings.get("format"), seed=0, template=settings.get("template"))


# ---- adapters on disk ----------------------------------------------------------------------------------------
def check_adapter_dir(adapter_dir: str, flag: str | None = "--adapter") -> dict[str, Any]:
    """The adapter directory's ``adapter_config.json``, once the directory is known to be one.

    Raises:
        UsageError: the path does not exist, is a file (the weight file instead of its directory), or holds no
            ``adapter_config.json``, or one that names no ``peft_type`` (``{}``, say). ``flag`` is the option that
            gave the path, for the message.
    """
    from deltatune.core.io import CONFIG_NAME, finish_interrupted_save

    what = f"{flag} {adapter_dir}" if flag else adapter_dir
    if not os.path.exists(adapter_dir):
        raise UsageError(f"{what} does not exist, so it is not a directory of an adapter; pass the directory that "
                         "train (or save_pretrained) wrote")
    if not os.path.isdir(adapter_dir):
        raise UsageError(f"{what} is a file, not a directory; pass the directory that holds it "
                         f"({os.path.dirname(os.path.abspath(adapter_dir))})")
    finish_interrupted_save(adapter_dir)  # a killed save_pretrained: read the finished pair, never a mix
    path = os.path.join(adapter_dir, CONFIG_NAME)
    if not os.path.exists(path):
        raise UsageError(f"{adapter_dir} has no {CONFIG_NAME}; is it an adapter directory?")
    config = read_json(path)
    if not config:
        raise UsageError(f"{adapter_dir}: {CONFIG_NAME} is empty: it names no peft_type, so it describes no adapter; "
                         "re-save the adapter (save_pretrained writes the whole config)")
    if not config.get("peft_type"):
        raise UsageError(f"{path} names no peft_type, so deltatune cannot tell which method wrote it; re-save the "
                         "adapter, or add the method's peft_type (LORA, IA3...)")
    return config


def check_adapter_weights(adapter_dir: str) -> None:
    """Refuse an adapter whose weight file holds NaN or Inf (one line naming the file and the first bad tensor):
    every command that uses an adapter calls this before using it (see :mod:`deltatune.core.checks`)."""
    from deltatune.core.checks import check_adapter_finite

    check_adapter_finite(adapter_dir)


def adapter_base_and_labels(adapter_dir: str, model_arg: str | None) -> tuple[ModelSpec, list[str] | None, dict]:
    """The base model an adapter expects (``--model`` wins) and, for classifiers, its labels."""
    check_adapter_dir(adapter_dir)
    run = read_json(os.path.join(adapter_dir, RUN_CONFIG_NAME))
    base = model_arg or recorded_base(adapter_dir, run)
    if not base:
        raise UsageError(f"{adapter_dir} does not say which base model it expects; pass --model")
    if model_arg is None and base not in BUILTIN_MODELS and not os.path.isdir(base):
        from deltatune.builtin.models import builtin_alias

        if alias := builtin_alias(base):  # e.g. a peft adapter trained on the hub copy of a built-in
            err(f"note: {adapter_dir} names base {base}; using the built-in {alias} (pass --model to use another "
                "copy)")
            base = alias
    spec = resolve_model(base)
    labels = run.get("labels")
    if spec.kind == "encoder" and not labels:
        n = _head_size(adapter_dir)
        labels = [str(i) for i in range(n)] if n else None
    return spec, labels, run


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


def _head_size(adapter_dir: str) -> int | None:
    """Rows of a saved classification head (``...classifier...weight``), read from the file header."""
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.exists(path):
        return None
    for key, info in read_safetensors_header(path).items():
        if re.search(r"(classifier|score)(\.modules_to_save\.\w+)?(\.out_proj)?\.weight$", key):
            return int(info["shape"][0])
    return None


def load_with_adapter(adapter_dir: str | None, model_arg: str | None, device: torch.device,
                      quantize: str | None = None):
    """``(model, tokenizer, spec, labels, run_config)``: a base model, with the adapter when one is given.

    The base is quantised as ``quantize`` says (``"none"``: not at all), by default as the adapter's training
    run was (``run_config.json``), so an adapter trained with ``--quantize`` is used on the base it learned on.
    """
    if adapter_dir:
        spec, labels, run = adapter_base_and_labels(adapter_dir, model_arg)
    else:
        spec, labels, run = resolve_model(model_arg or DEFAULTS["model"]), None, {}
    quant_type = run_quantize(run, quantize)
    model, tokenizer = load_model(spec, labels=labels or run.get("labels"), device=device)
    model = base_with_adapter(model, quant_type, adapter_dir, model_arg, spec, run)
    model.eval()
    return model, tokenizer, spec, labels, run


def base_with_adapter(model: nn.Module, quant_type: str | None, adapter_dir: str | None, model_arg: str | None,
                      spec: ModelSpec, run: dict) -> nn.Module:
    """``model`` quantised as ``quant_type`` says, with the adapter (if any) on it. A LoftQ adapter goes on the
    float model first (its load rebuilds LoftQ's base ``Q`` from the original weights) and the base is quantised
    after, to NF4 of ``Q``, which is ``Q``: the model ``train --init-lora-weights loftq --quantize nf4`` trained."""
    from deltatune.core.io import CONFIG_NAME

    if not (adapter_dir and quant_type and
            read_json(os.path.join(adapter_dir, CONFIG_NAME)).get("init_lora_weights") == "loftq"):
        model = quantize_base(model, quant_type)
        return attach_adapter(model, adapter_dir, model_arg, spec, run) if adapter_dir else model
    from deltatune.lora.loftq import quantize_loftq_base
    from deltatune.quantization import use_exact_cpu_kernels

    model = attach_adapter(model, adapter_dir, model_arg, spec, run)
    return use_exact_cpu_kernels(quantize_loftq_base(model, quant_type))


def attach_adapter(model: nn.Module, adapter_dir: str, model_arg: str | None, spec: ModelSpec, run: dict):
    """``PeftModel.from_pretrained`` for inference, once the weights are known to be finite; an adapter that does
    not fit a ``--model`` other than its own base is a usage error that names the base it was trained on."""
    from deltatune import PeftModel

    check_adapter_weights(adapter_dir)
    try:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except DeltatuneError as exc:
        trained_on = recorded_base(adapter_dir, run)
        if model_arg and trained_on and resolve_model(trained_on).name != spec.name:
            raise UsageError(f"{adapter_dir} was trained on {trained_on}, not on --model {model_arg}, and does not "
                             f"fit it ({str(exc).splitlines()[0][:300]}); drop --model to use the adapter's own "
                             "base") from None
        raise


def recorded_base(adapter_dir: str, run: dict) -> str | None:
    """The base model an adapter's files name: its training run's ``--model``, else PEFT's
    ``base_model_name_or_path``."""
    from deltatune.core.io import CONFIG_NAME

    return run.get("model") or read_json(os.path.join(adapter_dir, CONFIG_NAME)).get("base_model_name_or_path")

