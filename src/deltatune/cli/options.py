"""Command-line options: ``train``'s flags, and one ``--<field>`` flag per field of every method's config.

A method's options are written once, as fields of its config dataclass; this module turns each field's type hint
into a flag with a parser (``int``, ``float``, ``bool``, comma lists, JSON mappings), and builds the method's
config from the parsed values. What the CLI reads from a registry ``Method`` (its ``--method`` names, the shared
options it skips, its learning-rate scale) is read in one place, :func:`cli_facts`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import enum
import json
import math
import re
import types
import typing
from typing import Any, NamedTuple

from deltatune.cli.common import UsageError
from deltatune.training.data import IGNORE_INDEX

QUANTIZE_CHOICES = ("nf4", "fp4", "int8")


# ---- methods and their options -------------------------------------------------------------------------
class CliFacts(NamedTuple):
    """What the CLI needs to know about a registry method (every read of a ``Method`` field is here).

    Attributes:
        names: ``--method`` names -> config fields each name fixes (``dora``: ``use_dora=True``).
        shared_skip: Config fields that settings meant for every method do not give this one.
        lr_scale: The factor on the default learning rate when the user sets none.
    """

    names: dict[str, dict[str, Any]]
    shared_skip: tuple[str, ...]
    lr_scale: float


def cli_facts(method: Any) -> CliFacts:
    """The CLI's view of one registry ``Method``."""
    names = method.cli_names or {str(method.peft_type.value).lower(): {}}
    return CliFacts(names={k: dict(v) for k, v in names.items()}, shared_skip=tuple(method.hooks.cli_shared_skip),
                    lr_scale=method.lr_scale)


def method_table() -> dict[str, tuple[type, dict[str, Any]]]:
    """``--method`` name -> (config class, fixed field values), from the registry."""
    import deltatune  # noqa: F401  (registers the methods)
    from deltatune.registry import METHODS

    table: dict[str, tuple[type, dict[str, Any]]] = {}
    for method in METHODS.values():
        if method.hooks.cli_refusal:  # not buildable from options (X-LoRA needs trained experts): unknown_method
            continue
        names = cli_facts(method).names
        for name, fixed in names.items():
            table[name] = (method.config_cls, dict(fixed))
    return table



def unknown_method(method: str, table: dict[str, Any]) -> UsageError:
    """The error for a ``--method`` name not in ``table``: the method's ``cli_refusal`` when the registry has it
    (it says what to do instead), else the list of names to choose from."""
    from deltatune.registry import METHODS

    refused = next((m for m in METHODS.values() if m.hooks.cli_refusal and method in cli_facts(m).names), None)
    if refused is not None:
        return UsageError(f"--method {method}: {refused.hooks.cli_refusal}")
    return UsageError(f"unknown method {method!r}; choose one of: {', '.join(sorted(table))}")


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
    skip = set(fixed) | set(cli_facts(method_entry(method)).shared_skip)
    return {k: v for k, v in options.items() if k in fields and k not in skip}


def default_lr(method: str, lr: float) -> float:
    """The learning rate for ``method`` when the user set none: the default scaled by the method's
    registry ``lr_scale`` (virtual-token methods take larger steps)."""
    return lr * cli_facts(method_entry(method)).lr_scale


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
        raise unknown_method(method, table)
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
    * ``token_indices`` (trainable tokens): the training data's 64 most frequent token ids;
    * ``block_size`` (C3A's circulant blocks) and ``vector_length`` (VB-LoRA's bank vectors), which must divide
      every adapted layer's input and output size: the largest divisor of the model's layer widths up to the
      config's own default (256), when the model's config gives its widths (SmolLM2-135M: 192, as 576, 192 and
      1536 are its widths);
    * ``n_frequency`` (FourierFT's spectral entries, WaveFT's wavelet coefficients: at most ``in · out`` of every
      adapted layer): the config's own default (1000, 2592) or, on a model whose smallest projection holds fewer
      weights, that many;
    * ``adapter_len`` / ``adapter_layers`` (adaption prompts, which PEFT leaves unset): 10 prompt vectors (the
      paper's) in every layer of the model;
    * ``cpt_token_ids`` / ``cpt_tokens_type_mask`` / ``cpt_mask`` (CPT's context, which PEFT leaves to the user):
      the first training examples, up to ``CPT_CONTEXT_TOKENS`` tokens (an example longer than what is left
      keeps its end, where the answer is), example ``j``'s prompt tokens typed ``4j + 2`` (input) and its answer
      tokens ``4j + 4`` (label), PEFT's type numbering;
    * ``group_size`` (RoAd's groups of paired output features, which must be even and divide every adapted layer's
      output size): the largest even divisor of those widths up to the config's default (64), likewise.
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    out = dict(options)

    def unset(name: str) -> bool:
        return name in fields and out.get(name) is None

    if unset("total_step"):
        out["total_step"] = total_steps
    if unset("num_virtual_tokens"):
        out["num_virtual_tokens"] = 20
    if unset("tokenizer_name_or_path") and str(out.get("prompt_tuning_init", "")).upper() == "TEXT":
        out["tokenizer_name_or_path"] = model_path
    if "token_indices" in fields and not out.get("token_indices") and train_examples:
        counts = collections.Counter(i for ex in train_examples for i in ex["input_ids"])
        out["token_indices"] = sorted(i for i, _ in counts.most_common(64))
    for name in ("block_size", "vector_length"):
        if unset(name):
            size = common_block_size(model_path, cap=fields[name].default)
            if size is not None:
                out[name] = size
    if unset("n_frequency"):
        smallest = smallest_projection_size(model_path)
        if smallest is not None and smallest < fields["n_frequency"].default:
            out["n_frequency"] = smallest
    if unset("adapter_len"):
        out["adapter_len"] = 10
    if unset("adapter_layers"):
        out["adapter_layers"] = model_layer_count(model_path) or 1
    if unset("cpt_token_ids") and "cpt_tokens_type_mask" in fields and train_examples:
        out.update(cpt_context(train_examples))
    if unset("group_size"):
        gcd = common_block_size(model_path, cap=math.inf)  # the gcd of the widths itself
        even = [d for d in range(2, min(gcd or 0, fields["group_size"].default) + 1, 2) if gcd % d == 0]
        if even:
            out["group_size"] = even[-1]
    return out


CPT_CONTEXT_TOKENS = 128  # the few-shot context CPT trains from the CLI: a few short examples or one long one's end


def cpt_context(examples: list[dict]) -> dict[str, list[int]]:
    """CPT's context from the first ``examples`` (see :func:`fill_method_defaults`): ``cpt_token_ids``,
    ``cpt_tokens_type_mask`` and ``cpt_mask`` of at most ``CPT_CONTEXT_TOKENS`` tokens."""
    ids: list[int] = []
    kinds: list[int] = []
    for j, example in enumerate(examples):
        room = CPT_CONTEXT_TOKENS - len(ids)
        if room <= 0:
            break
        labels = example.get("labels") or [IGNORE_INDEX] * len(example["input_ids"])
        pairs = list(zip(example["input_ids"], labels))[-room:]
        ids += [token for token, _ in pairs]
        kinds += [4 * j + (2 if label == IGNORE_INDEX else 4) for _, label in pairs]
    return {"cpt_token_ids": ids, "cpt_tokens_type_mask": kinds, "cpt_mask": [1] * len(ids)}


def _text_config(model_path: str) -> Any | None:
    """The (text) config of the transformer at ``model_path``, ``None`` when there is none to read."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_layer_count(model_path: str) -> int | None:
    """The number of transformer blocks of the model at ``model_path`` (``num_hidden_layers``), ``None`` when its
    config does not say."""
    layers = getattr(_text_config(model_path), "num_hidden_layers", None)
    return layers if isinstance(layers, int) and layers > 0 else None


def linear_widths(model_path: str) -> list[int]:
    """The linear widths of the transformer at ``model_path``, hidden size first (feed-forward size, query and
    key/value projection sizes); ``[]`` when its config does not give them. Every linear layer but the head maps
    the hidden size to one of them, or back."""
    text = _text_config(model_path)
    hidden = getattr(text, "hidden_size", None)
    if not hidden:
        return []
    heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if heads else None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    widths = [hidden, getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None)]
    if head_dim and heads:
        widths += [heads * head_dim, kv_heads * head_dim]
    return [int(w) for w in widths if w]


def smallest_projection_size(model_path: str) -> int | None:
    """The fewest weights ``in · out`` of a linear projection in a block of the transformer at ``model_path``
    (query, key/value, feed-forward; the tiny test Llama's: 32 x 16 = 512); ``None`` when its config does not say."""
    widths = linear_widths(model_path)
    return widths[0] * min(widths) if widths else None


def common_block_size(model_path: str, cap: int) -> int | None:
    """The largest ``d <= cap`` that divides every linear width of the transformer at ``model_path`` (hidden size,
    feed-forward size, query and key/value projection sizes); ``None`` when its config does not give them."""
    widths = linear_widths(model_path)
    if not widths:
        return None
    g = 0
    for w in widths:
        g = math.gcd(g, w)
    return max(d for d in range(1, min(g, cap) + 1) if g % d == 0)


# ---- train's flags --------------------------------------------------------------------------------------
def learning_rate(value: str | float) -> float:
    """``--lr``: a positive finite number (``nan``, ``inf`` and negatives parse as floats, and train nothing).

    Raises:
        argparse.ArgumentTypeError: the one-line reason (argparse's error names the flag).
    """
    lr = float(value)  # not a number: ValueError, which argparse reports as "invalid float value"
    if not math.isfinite(lr) or lr <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a usable learning rate; pass a positive finite number "
                                         "such as 2e-4")
    return lr


learning_rate.__name__ = "float"  # what argparse and --config name the expected type in their messages


# Negative numbers in scientific notation (-1e-3) and -inf read as option names to argparse's own matcher (-1, -0.5
# only): then `--lr -1e-3` fails with "expected one argument" instead of the real reason.
_NEGATIVE_NUMBER = re.compile(r"^-((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|inf|infinity|nan)$", re.IGNORECASE)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``train`` (and ``compare``). Absent flags stay absent so settings can be layered."""
    s = argparse.SUPPRESS
    parser._negative_number_matcher = _NEGATIVE_NUMBER  # no option of these looks like a number
    g = parser.add_argument_group("what to train")
    g.add_argument("--model", default=s, help="built-in name (smollm2-135m, minilm-l6), model directory, or hub id "
                                              "(default: smollm2-135m)")
    g.add_argument("--data", default=s, help="built-in name (bbc-news, chatterbot) or a .jsonl/.csv/.txt file "
                                             "(default: bbc-news)")
    g.add_argument("--eval-data", default=s, help="separate evaluation file (default: 10%% of --data held out)")
    g.add_argument("--method", default=s, help="adapter method (default: lora): "
                                               + ", ".join(method_table()))
    g.add_argument("--config", default=s, help="YAML/JSON file of these options (flags still win)")
    g.add_argument("--output-dir", default=s, help="where the adapter, metrics.jsonl and loss.png go "
                                                   "(default: runs/<data>-<model>-<method>)")
    g = parser.add_argument_group("schedule")
    g.add_argument("--max-steps", type=int, default=s, help="optimizer steps (default: --epochs over the data)")
    g.add_argument("--epochs", type=float, default=s, help="passes over the data when --max-steps is not given")
    g.add_argument("--batch-size", type=int, default=s, help="examples per micro-batch, per process (default 8)")
    g.add_argument("--grad-accum", type=int, default=s, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=learning_rate, default=s, help="peak learning rate of AdamW")
    g.add_argument("--weight-decay", type=float, default=s)
    g.add_argument("--warmup-ratio", type=float, default=s, help="share of steps of linear warm-up (then cosine)")
    g.add_argument("--max-grad-norm", type=float, default=s, help="gradient clipping (0: off)")
    g.add_argument("--loraplus-lr-ratio", type=float, default=s, help="LoRA+: lora_B learns this many times faster")
    g.add_argument("--seed", type=int, default=s)
    g.add_argument("--resume", action="store_true", default=s, help="continue the run in --output-dir from its "
                                                                     "checkpoint")
    g.add_argument("--overwrite", action="store_true", default=s, help="replace a finished run in --output-dir")
    g = parser.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-steps", type=int, default=s, help="evaluate on validation data every N steps (0: off)")
    g.add_argument("--save-steps", type=int, default=s, help="resumable checkpoint every N steps (default 10)")
    g.add_argument("--eval-samples", type=int, default=s, help="evaluate on a fixed sample of this many records")
    g.add_argument("--eval-batch-size", type=int, default=s)
    g.add_argument("--no-eval-before", dest="eval_before", action="store_false", default=s,
                   help="skip the evaluation of the base model before training")
    g.add_argument("--forgetting-tokens", type=int, default=s,
                   help="tokens of general text for the forgetting measure (0: off; default 4096)")
    g.add_argument("--forgetting-data", default=s, metavar="FILE",
                   help="held-out general text (.txt, .jsonl, .csv) to measure forgetting on, instead of the "
                        "built-in ChatterBot answers (package chatterbot-corpus)")
    g = parser.add_argument_group("data format")
    g.add_argument("--format", choices=["text", "prompt", "chat", "classification"], default=s,
                   help="data format (default: recognised from the fields)")
    g.add_argument("--max-length", type=int, default=s, help="longest example in tokens")
    g.add_argument("--template", default=s, help="classification prompt for a causal LM, with {text} and {labels}")
    for role in ("text", "label", "prompt", "completion", "messages"):
        g.add_argument(f"--{role}-column", default=s, help=f"the column holding {role} (default: {role})")
    g = parser.add_argument_group("hardware")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=s,
                   help="auto: bf16 autocast where the hardware is fast at it")
    g.add_argument("--gradient-checkpointing", action="store_true", default=s)
    g.add_argument("--quantize", choices=[*QUANTIZE_CHOICES, "none"], default=s,
                   help="QLoRA: hold the frozen base's linear layers in 4-bit NF4/FP4 (double quantisation) or "
                        "8-bit int8 via bitsandbytes; the adapter trains in fp32 on top (default: none)")
    g.add_argument("--no-chunked-loss", dest="chunked_loss", action="store_false", default=s,
                   help="materialise the full (tokens, vocab) logits for the loss (default: chunked head + "
                        "cross-entropy, same numbers, less memory)")
    g.add_argument("--compile", nargs="?", const="inductor", default=s, metavar="BACKEND",
                   help="torch.compile the model for the training steps (backend default: inductor)")
    g.add_argument("--device", default=s, help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=s)
    g.add_argument("--fsdp", action="store_true", default=s,
                   help="under torchrun: shard the model with FSDP2 (for a base too big for one device) "
                        "instead of replicating it (DDP)")
    add_method_options(parser, taken={a.dest for a in parser._actions})

