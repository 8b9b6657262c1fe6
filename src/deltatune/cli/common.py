"""What the subcommands share: option layering, method options from config dataclasses, loading models
and data, and evaluating a model on a task.

Settings come in layers, later ones winning: the built-in defaults, the recipe of a built-in data set,
a ``--config`` file, the settings saved by the run being resumed, and the flags on the command line.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import enum
import json
import os
import random
import re
import struct
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.training import data as data_mod
from deltatune.training import metrics

BUILTIN_MODELS = ("smollm2-135m", "minilm-l6")
RUN_CONFIG_NAME = "run_config.json"
SUMMARY_NAME = "summary.json"


class UsageError(DeltatuneError, ValueError):
    """A command-line option or setting that cannot work."""


# ---- settings ----------------------------------------------------------------------------------------
# Defaults for any data; a built-in data set's recipe (below) overrides them.
DEFAULTS: dict[str, Any] = {
    "model": "smollm2-135m", "data": "bbc-news", "eval_data": None, "method": "lora", "output_dir": None,
    "max_steps": None, "epochs": 1.0, "batch_size": 8, "grad_accum": 1, "lr": 2e-4, "weight_decay": 0.0,
    "warmup_ratio": 0.1, "max_grad_norm": 1.0, "loraplus_lr_ratio": None, "seed": 0, "eval_steps": 0,
    "save_steps": 10, "eval_samples": 200, "eval_batch_size": 8, "max_length": 512, "precision": "auto",
    "gradient_checkpointing": False, "chunked_loss": True, "compile": None, "device": "auto", "format": None,
    "template": None,
    "text_column": None, "label_column": None, "prompt_column": None, "completion_column": None,
    "messages_column": None, "forgetting_tokens": 4096, "forgetting_data": None, "eval_before": True,
    "method_options": {},
    "quantize": None,
    "fsdp": False,
}
QUANTIZE_CHOICES = ("nf4", "fp4", "int8")

# bbc-news, the default job: sized for 5 minutes on a 2-core CPU without bf16 (fp32 there), whose cost is the tokens
# it runs (every article is longer than max_length). 96 tokens keep the headline and lead paragraph, which carry the
# topic, of 99% of the articles; 224 tokens and 60 steps took 9 min 45 s on such a CPU (7.3 s per step). Steps matter
# more than length here (seed 0, fp32: 96 x 60 steps 0.94, 96 x 40 0.86, 128 x 40 0.89). One recipe for every CPU.
RECIPES: dict[str, dict[str, Any]] = {
    "bbc-news": {"max_steps": 60, "batch_size": 8, "lr": 1e-3, "max_length": 96, "eval_samples": 100,
                 "eval_steps": 0, "save_steps": 10, "warmup_ratio": 0.1,
                 "method_options": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}},
    "chatterbot": {"max_steps": 60, "batch_size": 8, "lr": 1e-3, "max_length": 128, "eval_samples": 100,
                   "method_options": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}},
}
# An encoder with a fresh classification head learns faster and needs more steps of a tiny model.
ENCODER_RECIPES: dict[str, dict[str, Any]] = {
    "bbc-news": {"max_steps": 60, "batch_size": 16, "lr": 1e-2, "max_length": 128, "eval_samples": 200,
                 "method_options": {"r": 8, "lora_alpha": 16}},
}
# Settings that do not change what a run computes; a resume may change them.
HARMLESS = {"eval_steps", "save_steps", "eval_samples", "eval_batch_size", "device", "progress", "resume",
            "overwrite", "config", "output_dir", "forgetting_tokens", "eval_before",
            "fsdp"}  # DDP or FSDP compute the same update


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON file of settings (keys as the flags, with ``-`` or ``_``)."""
    if not os.path.exists(path):
        raise UsageError(f"--config file {path!r} does not exist")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        if path.endswith(".json"):
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as exc:  # yaml and json raise various types
        raise UsageError(f"--config {path}: cannot parse ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"--config {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def layer_settings(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge dicts left to right; ``method_options`` merge key by key."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key == "method_options":
                out["method_options"] = {**out.get("method_options", {}), **value}
            else:
                out[key] = value
    return out


def recipe_for(data: str, model: str) -> dict[str, Any]:
    """Built-in data sets carry settings measured to fit the time budget."""
    if model == "minilm-l6" and data in ENCODER_RECIPES:
        return dict(ENCODER_RECIPES[data])
    return dict(RECIPES.get(data, {}))


# ---- methods and their options -------------------------------------------------------------------------
def method_table() -> dict[str, tuple[type, dict[str, Any]]]:
    """``--method`` name -> (config class, fixed field values), from the registry."""
    import deltatune  # noqa: F401  (registers the methods)
    from deltatune.registry import METHODS

    table: dict[str, tuple[type, dict[str, Any]]] = {}
    for method in METHODS.values():
        names = method.cli_names or {str(method.peft_type.value).lower(): {}}
        for name, fixed in names.items():
            table[name] = (method.config_cls, dict(fixed))
    return table


def method_entry(method: str):
    """The registry entry behind a ``--method`` name."""
    from deltatune.registry import METHODS

    config_cls = method_table()[method][0]
    return next(m for m in METHODS.values() if m.config_cls is config_cls)


def shared_options_for(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The part of ``options`` meant for every method (a recipe's, ``compare``'s) that ``method`` takes: its own
    config fields, less those its ``--method`` name fixes (``dora``: ``use_dora``) and those whose name means
    something else for it (the registry's ``cli_shared_skip``: OFT's ``r`` counts blocks, not a rank)."""
    config_cls, fixed = method_table()[method]
    fields = {f.name for f in dataclasses.fields(config_cls) if f.init} - _base_fields()
    skip = set(fixed) | set(method_entry(method).hooks.cli_shared_skip)
    return {k: v for k, v in options.items() if k in fields and k not in skip}


def default_lr(method: str, lr: float) -> float:
    """The learning rate for ``method`` when the user set none: the default scaled by the method's
    registry ``lr_scale`` (virtual-token methods take larger steps)."""
    return lr * method_entry(method).lr_scale


def _base_fields() -> set[str]:
    from deltatune.config import PeftConfig

    return {f.name for f in dataclasses.fields(PeftConfig)}


def method_fields() -> dict[str, tuple[Any, list[type]]]:
    """Every option of every method: ``field name -> (type hint, [config classes that have it])``."""
    base = _base_fields()
    out: dict[str, tuple[Any, list[type]]] = {}
    for config_cls, _ in method_table().values():
        hints = typing.get_type_hints(config_cls)
        for f in dataclasses.fields(config_cls):
            if f.name in base or f.name.startswith("_") or not f.init:
                continue
            hint = hints.get(f.name, Any)
            old_hint, owners = out.setdefault(f.name, (hint, []))
            if hint != old_hint and Any not in (hint, old_hint):
                # One flag, several meanings: accept every method's values (bias: lora_only, oft_only, ...).
                out[f.name] = (typing.Union[old_hint, hint], owners)  # noqa: UP007 (hints are runtime objects)
            if config_cls not in owners:
                owners.append(config_cls)
    return out


_REGEX_CHARS = re.compile(r"[\\*+?\[\](){}|^$]")


def value_parser(hint: Any, name: str):
    """A parser from command-line text to a value of the field's type.

    ``int``/``float``/``bool`` parse as such, lists are comma-separated, dicts are JSON, ``None``/``null``
    is ``None`` where allowed. A ``str | list`` field (``target_modules``) takes a comma list of names,
    or a single string as such when it is ``all-linear`` or looks like a regex.
    """
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    allows_none = type(None) in members
    members = tuple(m for m in members if m is not type(None))

    def fits(value: Any, m: Any) -> bool:
        """Whether an already-typed value (from a YAML/JSON config) is a ``m``."""
        origin = typing.get_origin(m)
        if m is Any:
            return True
        if m is bool:
            return isinstance(value, bool)
        if m is int:
            return isinstance(value, int) and not isinstance(value, bool)
        if m is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if origin is typing.Literal:
            return value in typing.get_args(m)
        if origin in (list, set, tuple) or m in (list, set, tuple):
            elem = (typing.get_args(m) or (Any,))[0]
            return isinstance(value, (list, tuple, set)) and all(fits(v, elem) for v in value)
        if m is dict or origin is dict:
            return isinstance(value, dict)
        return isinstance(m, type) and isinstance(value, m)

    def parse(text: str) -> Any:
        if not isinstance(text, str):  # from a YAML/JSON config: already typed, so only checked
            if (text is None and allows_none) or any(fits(text, m) for m in members):
                return text
            raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')}: {text!r} is not valid here (expected "
                                             f"{_hint_name(hint)})")
        low = text.strip().lower()
        if allows_none and low in ("none", "null"):
            return None
        for m in members:
            origin = typing.get_origin(m)
            if m is bool and low in ("true", "false", "yes", "no", "1", "0"):
                return low in ("true", "yes", "1")
            if m is int:
                try:
                    return int(text)
                except ValueError:
                    continue
            if m is float:
                try:
                    return float(text)
                except ValueError:
                    continue
            if origin is typing.Literal and text in typing.get_args(m):
                return text
            if origin in (list, set, tuple):
                if str in members and (text == "all-linear" or _REGEX_CHARS.search(text)):
                    return text
                elem = (typing.get_args(m) or (str,))[0]
                parts = [p.strip() for p in text.split(",") if p.strip()]
                try:
                    return [elem(p) if elem in (int, float) else p for p in parts]
                except ValueError:
                    continue
            if m is dict or origin is dict:
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    continue
                if isinstance(value, dict):
                    return value
            if m is str:
                return text
            if m is Any:
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    return text
        raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')}: cannot read {text!r} as {_hint_name(hint)}")

    return parse


def _hint_name(hint: Any) -> str:
    """A field's type in words: ``int``, ``list of str or str`` (not ``Union[list[str], str, NoneType]``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and origin is None:
        return hint.__name__
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_hint_name(m) for m in args if m is not type(None)))
    if origin in (list, set, tuple):
        return f"list of {_hint_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    return str(hint).replace("typing.", "")


def add_method_options(parser: argparse.ArgumentParser, taken: set[str]) -> list[str]:
    """Add ``--<field>`` for every method config field (``--r``, ``--lora-alpha``, ``--target-modules``...).

    Returns the field names added (each parses into ``args.<field>``; absent flags are absent).
    """
    group = parser.add_argument_group("method options (fields of the method's config; see --method)")
    added = []
    for name, (hint, owners) in sorted(method_fields().items()):
        if name in taken:
            continue
        owners_text = ", ".join(c.__name__ for c in owners)
        hidden = hint is Any or name.endswith("_config") or name in ("megatron_core",)
        kwargs: dict[str, Any] = {"type": value_parser(hint, name), "default": argparse.SUPPRESS,
                                  "metavar": _metavar(hint), "dest": name,
                                  "help": argparse.SUPPRESS if hidden else f"{owners_text}.{name}"}
        if bool in (typing.get_args(hint) or (hint,)):
            kwargs.update(nargs="?", const="true")
        flags = ["--" + name.replace("_", "-")]
        if name == "r":  # torchrun reads `--r` as an abbreviation of its own --rdzv-*/--role: offer a safe name
            flags.append("--adapter-rank")
        group.add_argument(*flags, **kwargs)
        added.append(name)
    return added


def _metavar(hint: Any) -> str:
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    members = [m for m in members if m is not type(None)]
    names = []
    for m in members:
        origin = typing.get_origin(m)
        if origin is typing.Literal:
            names.append("{" + ",".join(map(str, typing.get_args(m))) + "}")
        elif origin in (list, set, tuple):
            names.append("A,B,...")
        elif m is dict or origin is dict:
            names.append("JSON")
        elif isinstance(m, type) and issubclass(m, enum.Enum):
            names.append("{" + ",".join(str(e.value) for e in m) + "}")
        else:
            names.append(getattr(m, "__name__", str(m)).upper())
    return "|".join(dict.fromkeys(names)) or "VALUE"


def build_peft_config(method: str, options: dict[str, Any], task_type: str | None):
    """The method's config from ``options`` (field name -> value).

    Raises:
        UsageError: an unknown method, or an option the method does not have.
        ConfigError: a value the method rejects.
    """
    table = method_table()
    if method not in table:
        raise UsageError(f"unknown method {method!r}; choose one of: {', '.join(sorted(table))}")
    config_cls, fixed = table[method]
    fields = {f.name for f in dataclasses.fields(config_cls) if f.init} - _base_fields()
    unknown = sorted(set(options) - fields)
    if unknown:
        flags = ", ".join("--" + u.replace("_", "-") for u in unknown)
        raise UsageError(f"{flags}: not an option of method {method!r} ({config_cls.__name__})")
    kwargs = dict(options)
    conflict = {k for k in kwargs if k in fixed and kwargs[k] != fixed[k]}
    if conflict:
        raise UsageError(f"--method {method} fixes {sorted(conflict)}; drop those options or pick another method")
    parser_types = method_fields()
    for key, value in list(kwargs.items()):  # a config file may hold "q_proj,v_proj" as one string, or a typo'd type
        try:
            kwargs[key] = value_parser(parser_types[key][0], key)(value)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(str(exc)) from None
    return config_cls(**{**kwargs, **fixed}, task_type=task_type)


def fill_method_defaults(config_cls: type, options: dict[str, Any], *, total_steps: int,
                         model_path: str, train_examples: list[dict] | None = None) -> dict[str, Any]:
    """Fields a method needs that the CLI can fill in, by field name (so a new method gets them too):

    * ``total_step`` (AdaLoRA's rank schedule): the run's optimizer steps;
    * ``num_virtual_tokens`` (prompt-learning methods): 20;
    * ``tokenizer_name_or_path`` for a prompt initialised from text: the model's own tokenizer;
    * ``token_indices`` (trainable tokens): the training data's 64 most frequent token ids.
    """
    fields = {f.name for f in dataclasses.fields(config_cls)}
    out = dict(options)
    if "total_step" in fields and out.get("total_step") is None:
        out["total_step"] = total_steps
    if "num_virtual_tokens" in fields and out.get("num_virtual_tokens") is None:
        out["num_virtual_tokens"] = 20
    if "tokenizer_name_or_path" in fields and out.get("tokenizer_name_or_path") is None \
            and str(out.get("prompt_tuning_init", "")).upper() == "TEXT":
        out["tokenizer_name_or_path"] = model_path
    if "token_indices" in fields and not out.get("token_indices") and train_examples:
        counts = collections.Counter(i for ex in train_examples for i in ex["input_ids"])
        out["token_indices"] = sorted(i for i, _ in counts.most_common(64))
    return out


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


# ---- the task: data + model + how to score ------------------------------------------------------------------
@dataclass
class Task:
    """One data set prepared for one model.

    Attributes:
        dataset: The records.
        encoder: Turns records into examples for this model's tokenizer.
        sequence_classifier: Encoder + head (``True``) or causal LM.
        metric_name: ``"accuracy"`` for classification, else ``"loss"`` (lower is better).
    """

    dataset: data_mod.Dataset
    encoder: data_mod.Encoder
    tokenizer: Any
    sequence_classifier: bool
    pad_id: int

    @property
    def metric_name(self) -> str:
        return "accuracy" if self.dataset.format == "classification" else "loss"

    @property
    def higher_is_better(self) -> bool:
        return self.metric_name == "accuracy"

    def examples(self, records: list[dict], limit: int | None = None, seed: int = 0) -> list[dict]:
        """Encode ``records`` (a fixed, seeded sample of ``limit`` of them when given)."""
        if limit and len(records) > limit:
            records = [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), limit))]
        return self.encoder(records)

    def evaluate(self, model: nn.Module, examples: list[dict], *, batch_size: int, device: torch.device,
                 amp: torch.dtype | None) -> dict[str, float]:
        """``{"accuracy", "loss"}`` for classification, ``{"loss", "perplexity"}`` otherwise."""
        if not examples:
            return {}
        kw = {"batch_size": batch_size, "pad_id": self.pad_id, "device": device, "amp": amp}
        gold = [e["label"] for e in examples] if self.dataset.format == "classification" else None
        if self.sequence_classifier:
            logits = metrics.classifier_logits(model, examples, **kw)
            loss = float(torch.nn.functional.cross_entropy(logits, torch.tensor(gold)))
            return {"accuracy": metrics.accuracy(logits, gold), "loss": loss}
        if gold is not None:
            label_ids = self.encoder.label_ids
            scores = metrics.score_labels(model, examples, label_ids, **kw)
            # The gold label's words are exactly the completion tokens, so their log-probs give the loss too.
            n_tokens = sum(len(label_ids[g]) for g in gold)
            loss = -float(sum(scores[i, g] for i, g in enumerate(gold))) / n_tokens
            return {"accuracy": metrics.accuracy(scores, gold), "loss": loss}
        loss = metrics.evaluate_loss(model, examples, **kw)
        return {"loss": loss, "perplexity": float(torch.tensor(loss).exp())}


def make_task(dataset: data_mod.Dataset, spec: ModelSpec, tokenizer, max_length: int) -> Task:
    if spec.kind == "encoder" and dataset.format != "classification":
        raise UsageError(f"--model {spec.name} is an encoder: it can only learn classification (text+label) data, "
                         f"and {dataset.name} is {dataset.format} data; use a causal LM such as smollm2-135m")
    encoder = data_mod.Encoder(tokenizer, dataset.format, max_length, labels=dataset.labels,
                               template=dataset.template, sequence_classifier=spec.kind == "encoder")
    return Task(dataset=dataset, encoder=encoder, tokenizer=tokenizer, sequence_classifier=spec.kind == "encoder",
                pad_id=int(tokenizer.pad_token_id))


def load_data(settings: dict[str, Any]) -> data_mod.Dataset:
    columns = {role: settings[f"{role}_column"] for role in ("text", "label", "prompt", "completion", "messages")
               if settings.get(f"{role}_column")}
    return data_mod.load_dataset(settings["data"], eval_data=settings.get("eval_data"), columns=columns,
                                 fmt=settings.get("format"), seed=0, template=settings.get("template"))


def general_text_examples(tokenizer, n_tokens: int, block: int = 256,
                          path: str | None = None) -> tuple[list[dict], str | None]:
    """Held-out general text for the forgetting measure, and why there is none when there is none.

    The text is ``path`` (``--forgetting-data``) when given, else the built-in ChatterBot answers. Without
    either, training still runs: forgetting is an extra measure, not a reason to refuse a job, so the
    summary says it was not measured and how to measure it.

    Returns:
        ``(blocks, reason)``: ``blocks`` of ``block`` tokens for :func:`metrics.evaluate_loss`, about ``n_tokens``
        in all; ``reason`` is ``None`` when there are blocks, else one line saying why not.

    Raises:
        DataError: ``path`` does not exist or holds no text.
    """
    if n_tokens <= 0:
        return [], "off (--forgetting-tokens 0)"
    max_blocks = max(1, n_tokens // block)
    if path:
        texts = forgetting_texts(path)
        blocks = metrics.general_text_blocks(tokenizer, texts, block, max_blocks)
        if not blocks:
            raise data_mod.DataError(f"--forgetting-data {path}: holds too little text to measure forgetting "
                                     "(under two tokens); pass a file of general text")
        return blocks, None
    from deltatune.builtin import BuiltinNotInstalledError
    from deltatune.builtin.datasets import general_text

    try:
        texts = general_text()
    except BuiltinNotInstalledError:
        return [], ("not measured: the built-in general text ships in the package 'chatterbot-corpus', which is "
                    "not installed; pass --forgetting-data FILE (held-out general text, .txt or .jsonl) or "
                    "pip install chatterbot-corpus")
    return metrics.general_text_blocks(tokenizer, texts, block, max_blocks), None


def forgetting_texts(path: str) -> list[str]:
    """The texts of a ``--forgetting-data`` file, read as ``--data`` is (.txt paragraphs, .jsonl/.csv records):
    a record's ``text``, its prompt and completion, or its chat messages, joined by newlines.

    Raises:
        DataError: the file is missing or empty, or its records have no text field.
    """
    try:
        records = data_mod.read_records(path)
        fmt = data_mod.detect_format(records[0], data_mod.alias_columns(records[0], {}))
        rows = data_mod.normalise(records, fmt, data_mod.alias_columns(records[0], {}), path)
    except data_mod.DataError as exc:
        raise data_mod.DataError(f"--forgetting-data: {exc}") from None
    if fmt == "chat":
        return ["\n".join(m["content"] for m in r["messages"]) for r in rows]
    if fmt == "prompt":
        return [f"{r['prompt']}\n{r['completion']}" for r in rows]
    return [str(r["text"]) for r in rows]


# ---- adapters on disk ----------------------------------------------------------------------------------------
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
