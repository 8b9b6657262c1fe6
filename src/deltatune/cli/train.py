"""``deltatune train``: fine-tune, evaluate before and after, save the adapter.

Everything that can be wrong with the input (options, data, model) is checked before anything is
written, so a bad command leaves no half-made output directory.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import torch

from deltatune import distributed
from deltatune.cli import common
from deltatune.cli.common import UsageError, human_bytes, human_time
from deltatune.core.io import atomic_write_text, is_disk_full
from deltatune.lora.conversion import converts_to_plain_lora
from deltatune.training import plots, runlock
from deltatune.training.data import BUILTIN_DATASETS, SHAPE_BUCKET, collate, describe_columns
from deltatune.training.trainer import (
    CHECKPOINT_NAME,
    METRICS_NAME,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    TrainingInterrupted,
    capture_rng,
    disk_full,
    dumps_json,
    plan_steps,
    resolve_precision,
)

INITIAL_ADAPTER_DIR = "initial_adapter"  # PiSSA/OLoRA: the adapter at initialisation, for the final conversion
# Data-driven initialisations (EVA, CorDA, LoRA-GA) are computed from this many batches of --batch-size training
# examples: enough tokens for stable principal directions on a small model, seconds of forward passes.
CALIBRATION_BATCHES = 8
SMALL_EVAL = 20  # fewer held-out records than this: the summary's metric is coarse, and the user is told
OUTPUT_FILES = ("adapter_config.json", "adapter_model.safetensors", METRICS_NAME, CHECKPOINT_NAME, "loss.png",
                common.SUMMARY_NAME, common.RUN_CONFIG_NAME)


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
                                               + ", ".join(common.method_table()))
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
    g.add_argument("--quantize", choices=[*common.QUANTIZE_CHOICES, "none"], default=s,
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
    common.add_method_options(parser, taken={a.dest for a in parser._actions})


def _records(n: int, kind: str) -> str:
    return f"{n} {kind} record{'s' * (n != 1)}"


def _typed_file_settings(path: str, values: dict[str, Any]) -> dict[str, Any]:
    """A config file's settings checked and converted as their flags would be (``lr: "3e-4"`` -> 3e-4).

    Raises:
        UsageError: a value its flag would refuse (``lr: fast``, ``data: [1, 2]``, ``precision: fp8``).
    """
    parser = argparse.ArgumentParser(add_help=False)
    add_train_arguments(parser)
    actions = {a.dest: a for a in parser._actions}
    out = dict(values)
    for key, value in values.items():
        a = actions.get(key)
        if a is None or key == "method_options" or value is None:
            continue
        where = f"--config {path}: {key}: "
        if a.nargs == 0:  # an on/off flag (--resume, --no-progress ...): a yes/no setting in a file
            if not isinstance(value, bool):
                raise UsageError(where + f"{value!r} is not true or false")
        elif a.nargs == "?" and isinstance(value, bool):  # --compile with no value
            value = a.const if value else None
        elif isinstance(value, str):
            if a.type is not None:
                try:
                    value = a.type(value)
                except argparse.ArgumentTypeError as exc:  # the type's own reason (--lr nan)
                    raise UsageError(where + str(exc)) from None
                except (ValueError, TypeError):
                    raise UsageError(where + f"cannot read {value!r} as {a.type.__name__}") from None
        elif a.type in (int, float, learning_rate) and isinstance(value, (int, float)) and not isinstance(value, bool):
            if a.type is int and value != int(value):
                raise UsageError(where + f"{value!r} is not a whole number")
            try:
                value = a.type(value)
            except argparse.ArgumentTypeError as exc:  # lr: -1 or .nan in a YAML file
                raise UsageError(where + str(exc)) from None
        else:
            raise UsageError(where + f"{value!r} is not a {a.type.__name__ if a.type else 'string'}")
        if a.choices and value not in a.choices:
            raise UsageError(where + f"{value!r} is not one of {', '.join(map(str, a.choices))}")
        out[key] = value
    return out


def settings_from_args(args: argparse.Namespace, method_option_names: set[str]) -> dict[str, Any]:
    """Layer defaults, recipe, config file, resumed run and flags into one settings dict."""
    explicit = {k: v for k, v in vars(args).items() if k not in ("command", "handler")}
    options = {k: explicit.pop(k) for k in list(explicit) if k in method_option_names}
    if options:
        explicit["method_options"] = options
    from_file = common.load_config_file(explicit["config"]) if "config" in explicit else {}
    file_options = {k: from_file.pop(k) for k in list(from_file) if k in method_option_names}
    from_file.setdefault("method_options", {}).update(file_options)
    known = set(common.DEFAULTS) | {"progress", "resume", "overwrite", "config"}
    unknown = sorted(set(from_file) - known)
    if unknown:
        raise UsageError(f"--config {explicit['config']}: unknown option(s) {unknown}")
    from_file = _typed_file_settings(explicit["config"], from_file) if "config" in explicit else from_file
    top = common.layer_settings([from_file, explicit])
    data = top.get("data", common.DEFAULTS["data"])
    model = top.get("model", common.DEFAULTS["model"])
    recipe = common.recipe_for(data, model)
    # The recipe's method options are LoRA-style (r, lora_alpha, ...): kept apart, and `prepare` gives each method
    # only those it takes (common.shared_options_for), so `--method ia3` or `oft` on a built-in data set works.
    recipe_options = recipe.pop("method_options", {})
    settings = common.layer_settings([common.DEFAULTS, recipe, top])
    settings["recipe_method_options"] = recipe_options
    settings["lr_given"] = "lr" in top
    settings["explicit"] = explicit
    if settings.get("output_dir") is None:
        stem = lambda s: os.path.splitext(os.path.basename(os.path.normpath(s)))[0]  # noqa: E731
        settings["output_dir"] = os.path.join("runs", f"{stem(data)}-{stem(model)}-{settings['method']}")
    return settings


# Settings naming files: run_config.json stores them absolute, so --resume works from any working directory.
# A built-in name (and anything that is not an existing path, like a hub id) stays as it is.
_PATH_SETTINGS = {"data": BUILTIN_DATASETS, "eval_data": (), "forgetting_data": (), "model": common.BUILTIN_MODELS,
                  "model_path": ()}


def _absolute(key: str, value: Any) -> Any:
    if key in _PATH_SETTINGS and isinstance(value, str) and value not in _PATH_SETTINGS[key] \
            and os.path.exists(value):
        return os.path.abspath(value)
    return value


def _apply_resume(settings: dict[str, Any]) -> dict[str, Any]:
    """On ``--resume``, the saved settings are the base; a flag that would change the computation is refused."""
    runlock.check_free(settings["output_dir"])  # a live run may not have written its settings yet
    saved = common.read_json(os.path.join(settings["output_dir"], common.RUN_CONFIG_NAME))
    if not saved:
        raise UsageError(f"--resume: {settings['output_dir']} holds no run to resume (no {common.RUN_CONFIG_NAME}); "
                         "start without --resume")
    explicit = settings["explicit"]
    for key, value in explicit.items():
        if key in common.HARMLESS:
            continue
        old = saved.get(key)
        if key == "batch_size" and int(value) * world_size() == int(old) * int(saved.get("world_size", 1)):
            continue  # another process count, the same global batch: the run computes the same steps
        if key == "method_options":
            changed = {k: v for k, v in value.items() if saved.get("method_options", {}).get(k) != v}
            if changed:
                raise UsageError(f"--resume: method options {changed} differ from the run's "
                                 f"{saved.get('method_options')}; resume without them")
        elif key == "quantize" and {value, old} <= {None, "none"}:
            continue  # --quantize none is the default: no quantisation
        elif old != value and _absolute(key, old) != _absolute(key, value):
            raise UsageError(f"--resume: --{key.replace('_', '-')} {value!r} differs from the run's {old!r}; "
                             "resume with the same options or train into a new --output-dir")
    merged = dict(saved)
    merged.update({k: v for k, v in explicit.items() if k in common.HARMLESS or k == "batch_size"})
    merged["world_size"] = world_size()
    merged["resume"] = True
    merged["explicit"] = explicit
    return merged


def _check_output_dir(settings: dict[str, Any], locked: bool = False) -> None:
    """Refuse an output directory in use, or holding a run that this command would clobber.

    Args:
        locked: This process holds the directory's lock (the second look, just before writing).
    """
    out = settings["output_dir"]
    if os.path.isfile(out):
        raise UsageError(f"--output-dir {out} is a file; pass a directory")
    if not locked:
        runlock.check_free(out)  # a live run's files say nothing about whether it finished
    present = [f for f in OUTPUT_FILES if os.path.exists(os.path.join(out, f))]
    if settings.get("resume"):
        if os.path.exists(os.path.join(out, common.SUMMARY_NAME)):
            raise UsageError(f"--resume: {out} already holds a finished run; start a new run with --overwrite or "
                             "another --output-dir")
        if not os.path.exists(os.path.join(out, CHECKPOINT_NAME)):
            # Stopped before its first checkpoint: nothing to restore, so start it again with its settings.
            settings["resume"] = False
            settings["overwrite"] = True
        return
    if present and not settings.get("overwrite"):
        if common.SUMMARY_NAME in present:
            what = "a finished run"
        elif CHECKPOINT_NAME in present:
            what = "an unfinished run (resume it with --resume)"
        else:
            what = "a run that stopped before its first checkpoint (--resume starts it again with its settings)"
        raise UsageError(f"--output-dir {out} already holds {what}; pass --overwrite to replace it or choose "
                         "another --output-dir")


def prepare(settings: dict[str, Any]):
    """Check everything and load model, tokenizer, data and adapter config. Writes nothing."""
    table = common.method_table()
    method = settings["method"]
    if method not in table:
        raise UsageError(f"unknown method {method!r}; choose one of: {', '.join(sorted(table))}")
    config_cls = table[method][0]
    options = dict(settings.get("method_options") or {})
    if not settings.get("resume"):  # a built-in recipe's options, for the methods that take them
        recipe = settings.pop("recipe_method_options", {})
        options = {**common.shared_options_for(method, recipe), **options}
    settings.pop("recipe_method_options", None)
    if not settings.get("resume") and not settings.pop("lr_given", True):
        settings["lr"] = common.default_lr(method, float(settings["lr"]))
    settings.pop("lr_given", None)
    device = common.pick_device(settings["device"])
    resolve_precision(settings["precision"], device)
    settings["quantize"] = common.check_quantize(settings.get("quantize"))  # before any loading: bitsandbytes?
    for key in ("batch_size", "grad_accum", "eval_batch_size", "max_length"):
        if int(settings[key]) < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be at least 1, got {settings[key]}")
    if settings["max_steps"] is not None and int(settings["max_steps"]) < 1:
        raise UsageError(f"--max-steps must be at least 1, got {settings['max_steps']}")
    if settings["lr"] <= 0:
        raise UsageError(f"--lr must be positive, got {settings['lr']}")
    dataset = common.load_data(settings)
    spec = common.resolve_model(settings["model"])
    tokenizer = common.load_tokenizer(spec)
    task = common.make_task(dataset, spec, tokenizer, int(settings["max_length"]))
    train_examples = task.encoder(dataset.train)
    steps = plan_steps(len(train_examples), settings["max_steps"], float(settings["epochs"]),
                       int(settings["batch_size"]), int(settings["grad_accum"]))
    options = common.fill_method_defaults(config_cls, options, total_steps=steps, model_path=spec.path,
                                           train_examples=train_examples)
    options = _loftq_options(options, settings["quantize"])
    settings["method_options"] = options
    task_type = "CAUSAL_LM" if spec.kind == "causal" else "SEQ_CLS"
    peft_config = common.build_peft_config(method, options, task_type)
    _check_output_dir(settings)
    torch.manual_seed(settings["seed"])  # a fresh classification head is initialised on load
    model, tokenizer = common.load_model(spec, labels=dataset.labels, device=device, tokenizer=tokenizer)
    if options.get("init_lora_weights") != "loftq":  # LoftQ quantises the float model itself (create_adapter)
        model = common.quantize_base(model, settings["quantize"])
    return spec, dataset, task, model, tokenizer, peft_config, train_examples, device


def _loftq_options(options: dict[str, Any], quantize: str | None) -> dict[str, Any]:
    """``--init-lora-weights loftq``: ``loftq_config`` completed with PEFT's ``LoftQConfig`` defaults (4 bits, one
    alternation; said in one line when none is given), so the saved adapter_config.json is one PEFT loads; with
    ``--quantize`` only NF4 of a 4-bit LoftQ base, which LoftQ makes exactly representable (anything else would
    quantise away what the adapter was fitted to)."""
    if options.get("init_lora_weights") != "loftq":
        return options
    given = options.get("loftq_config") or {}
    if not isinstance(given, dict):
        raise UsageError(f"--loftq-config takes JSON, e.g. '{{\"loftq_bits\": 4, \"loftq_iter\": 5}}', got {given!r}")
    config = {"loftq_bits": 4, "loftq_iter": 1, **given}
    if quantize is not None and (quantize != "nf4" or config["loftq_bits"] != 4):
        raise UsageError(f"--init-lora-weights loftq with --quantize {quantize} and loftq_bits={config['loftq_bits']}: "
                         "LoftQ's quantised base is exact only as NF4 of a 4-bit LoftQ base; use --quantize nf4 "
                         "with loftq_bits 4, or --quantize none")
    if not given:
        common.err("note: --init-lora-weights loftq without --loftq-config: PEFT's defaults loftq_bits=4, "
                   "loftq_iter=1 (e.g. --loftq-config '{\"loftq_iter\": 5}')")
    return {**options, "loftq_config": config}


def create_adapter(model: torch.nn.Module, peft_config: Any, train_examples: list[dict], task: Any, batch_size: int,
                   device: str, quantize: str | None = None) -> Any:
    """``get_peft_model``; for an initialisation computed from data (EVA, CorDA, LoRA-GA; LoftQ ignores the data)
    the adapter is created from the first ``CALIBRATION_BATCHES`` batches of the training set, collated as the
    trainer collates them (the same batches on every process, so every process gets the same adapter). LoftQ gets
    the float model (``prepare`` leaves it unquantised) and ``quantize`` (NF4) applies to its base ``Q`` after."""
    from deltatune.lora.init import get_peft_model_with_data, init_module

    init = getattr(peft_config, "init_lora_weights", True)
    if init_module(init) is None:  # not data-driven, or not built yet (check_creatable refuses with the reason)
        from deltatune import get_peft_model

        return get_peft_model(model, peft_config)
    examples = [] if init == "loftq" else train_examples[: CALIBRATION_BATCHES * batch_size]
    batches = [{k: v.to(device) for k, v in collate(examples[i:i + batch_size], task.pad_id,
                                                    left_pad=not task.sequence_classifier,
                                                    multiple_of=SHAPE_BUCKET).items()}
               for i in range(0, len(examples), batch_size)]
    print(f"{init}: quantising the base and fitting the adapter to the error ..." if init == "loftq" else
          f"{init}: initialising the adapter from {len(batches)} training batches ({len(examples)} examples) ...",
          flush=True)
    t0 = time.perf_counter()
    model = get_peft_model_with_data(model, peft_config, batches)
    layers = sum(1 for _, m in model.base_model.adapter_layers())
    print(f"{init}: {layers} layers initialised ({human_time(time.perf_counter() - t0)})", flush=True)
    if init == "loftq" and quantize:
        from deltatune.lora.loftq import quantize_loftq_base
        from deltatune.quantization import use_exact_cpu_kernels

        model = use_exact_cpu_kernels(quantize_loftq_base(model, quantize))  # NF4 of Q is Q: the same model
    return model


def world_size() -> int:
    return distributed.info().world_size


def run_train(settings: dict[str, Any]) -> int:
    """Train, evaluate, save. Under torchrun every rank runs this; only rank 0 prints and writes files."""
    device = str(settings.get("device", "auto"))
    joined_here = not distributed.info().world_size > 1
    info = distributed.init_from_env("cuda" if device.startswith("cuda") or
                                     (device == "auto" and torch.cuda.is_available()) else "cpu")
    # The output directory's lock, held until the run ends however it ends (the OS drops it if the process dies).
    lock = contextlib.ExitStack()
    try:
        if info.world_size > 1 and not info.is_main:
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                return _run_train(settings, info, lock)
        return _run_train(settings, info, lock)
    finally:
        lock.close()
        if joined_here and info.world_size > 1:
            torch.distributed.destroy_process_group()


def _run_train(settings: dict[str, Any], info: Any, lock: contextlib.ExitStack) -> int:
    started = time.perf_counter()
    is_main = info.is_main
    if settings.get("resume"):
        settings = _apply_resume(settings)
    if settings.get("fsdp") and common.check_quantize(settings.get("quantize")) and info.world_size > 1:
        raise UsageError("--fsdp cannot shard a bitsandbytes-quantised base (--quantize): drop --fsdp to train it "
                         "data-parallel (DDP replicates the already small quantised base)")
    spec, dataset, task, model, tokenizer, peft_config, train_examples, device = prepare(settings)
    distributed.barrier()  # every rank checked --output-dir before rank 0 writes into it
    out = settings["output_dir"]
    amp = resolve_precision(settings["precision"], device)
    limit = settings["eval_samples"]
    test_examples = task.examples(dataset.test, limit)
    val_examples = task.examples(dataset.validation, limit)
    general, no_forgetting = common.general_text_examples(
        tokenizer, int(settings["forgetting_tokens"]), path=settings.get("forgetting_data")) \
        if spec.kind == "causal" else ([], "not measured: forgetting is measured for causal LMs only")
    eval_kw = {"batch_size": int(settings["eval_batch_size"]), "device": device, "amp": amp}
    general_kw = {"batch_size": int(settings["eval_batch_size"]), "pad_id": task.pad_id, "device": device, "amp": amp}

    from deltatune.quantization import weight_bytes

    base_bytes = weight_bytes(model)
    # The adapter goes on before anything is evaluated or written: a config that does not fit the model
    # (targets that match nothing, ...) fails at once and leaves no output directory behind.
    torch.manual_seed(settings["seed"])  # the adapter's initialisation
    model = create_adapter(model, peft_config, train_examples, task, int(settings["batch_size"]), device,
                           settings.get("quantize"))
    # after get_peft_model, which records the loaded model's own name (a local directory here)
    model.peft_config["default"].base_model_name_or_path = spec.name
    if settings.get("quantize") and getattr(peft_config, "init_lora_weights", True) == "loftq":
        base_bytes = weight_bytes(model) - sum(p.numel() * p.element_size() for p in model.parameters()
                                               if p.requires_grad)  # the base is quantised after LoftQ

    # From here on the output directory is written, by this run alone: take its lock, then look again (another run
    # may have started or finished since prepare() looked), then sweep what killed saves left.
    os.makedirs(out, exist_ok=True)
    if is_main:
        lock.enter_context(runlock.RunLock(out))
        _check_output_dir(settings, locked=True)
        runlock.sweep_temp_files(out, os.path.join(out, INITIAL_ADAPTER_DIR))
    if not settings.get("resume") and is_main:
        for name in OUTPUT_FILES:  # --overwrite: only the files a run writes, never anything else
            path = os.path.join(out, name)
            if os.path.exists(path):
                os.unlink(path)
        record = {k: v for k, v in settings.items() if k not in ("explicit", "resume", "overwrite", "config")}
        record.update(labels=dataset.labels, data_format=dataset.format, template=dataset.template,
                      model_kind=spec.kind, model_path=spec.path, world_size=info.world_size)
        record = {k: _absolute(k, v) for k, v in record.items()}
        atomic_write_text(os.path.join(out, common.RUN_CONFIG_NAME), _json(record))

    n_train = len(dataset.train)
    quantized = f" in {settings['quantize']}" if settings.get("quantize") else ""
    print(f"deltatune train: {settings['method']} on {settings['model']}{quantized} ({spec.kind}), data {dataset.name} "
          f"({dataset.format}: {n_train} train, {len(test_examples)} eval records) -> {out}", flush=True)
    if is_main and dataset.columns_read:  # e.g. an Alpaca or question/answer file
        common.err(f"note: reading {describe_columns(dataset.columns_read)} (name columns with --prompt-column, "
                   "--completion-column, ... to choose others)")
    if is_main and 0 < len(test_examples) < SMALL_EVAL:
        common.err(f"note: only {_records(len(test_examples), 'held-out')} to evaluate on, so one record moves the "
                   f"metric by {1 / len(test_examples):.2g}; pass --eval-data FILE or more data for a finer measure")
    trainer_cfg = TrainConfig(
        output_dir=out, max_steps=settings["max_steps"], epochs=float(settings["epochs"]),
        batch_size=int(settings["batch_size"]), grad_accum=int(settings["grad_accum"]), lr=float(settings["lr"]),
        weight_decay=float(settings["weight_decay"]), warmup_ratio=float(settings["warmup_ratio"]),
        max_grad_norm=float(settings["max_grad_norm"]), loraplus_lr_ratio=settings["loraplus_lr_ratio"],
        eval_steps=int(settings["eval_steps"]), save_steps=int(settings["save_steps"]), seed=int(settings["seed"]),
        precision=settings["precision"], gradient_checkpointing=bool(settings["gradient_checkpointing"]),
        chunked_loss=bool(settings["chunked_loss"]), compile=settings["compile"] or None,
        progress=False if settings.get("progress") is False else None)

    # PiSSA/OLoRA/CorDA/LoRA-GA move part of each weight into the adapter: without it the base is only the residual.
    # Keep the initial adapter, so the one saved at the end is a plain LoRA for the original base (what eval loads).
    initial_dir = os.path.join(out, INITIAL_ADAPTER_DIR) if converts_to_plain_lora(peft_config) else None
    if initial_dir and not settings.get("resume"):
        model.save_pretrained(initial_dir, is_main_process=is_main)
    extra: dict[str, Any] = {}
    if not settings.get("resume"):
        # "before" is the base model alone; for PiSSA/OLoRA that is the untrained adapter on the residual base
        with contextlib.nullcontext() if initial_dir else model.disable_adapter():
            if settings.get("eval_before", True):
                print(f"evaluating the base model on {_records(len(test_examples), 'test')} ...", flush=True)
                t0 = time.perf_counter()
                extra["before"] = task.evaluate(model, test_examples, **eval_kw)
                extra["before_seconds"] = time.perf_counter() - t0
                if is_main:
                    _log(out, {"step": 0, "split": "test", "event": "before", **extra["before"]})
                print(f"  before: {_fmt(extra['before'])} ({human_time(extra['before_seconds'])})", flush=True)
            if general:
                from deltatune.training.metrics import evaluate_loss

                extra["general_loss_base"] = evaluate_loss(model, general, **general_kw)
    trainable, total = model.get_nb_trainable_parameters()
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}",
          flush=True)

    def evaluate(m):
        return task.evaluate(m, val_examples, **eval_kw)

    parallel = ("fsdp" if settings.get("fsdp") else "ddp") if info.world_size > 1 else "none"
    trainer = Trainer(model, train_examples, trainer_cfg, pad_id=task.pad_id,
                      sequence_classifier=task.sequence_classifier, evaluate=evaluate, device=device,
                      parallel=parallel)
    where = f"{info.world_size} processes ({parallel}, {info.backend}), " if info.world_size > 1 else ""
    print(f"training {trainer.total_steps} steps of {trainer.global_batch_size * trainer_cfg.grad_accum} examples "
          f"({where}precision: {'bf16' if amp else 'fp32'}, device: {device})", flush=True)
    result = trainer.train(resume=bool(settings.get("resume")), extra=extra)
    extra = result.extra

    # From here on, Ctrl-C and a full disk end with a true account of what is on disk and what to do.
    with _after_training(trainer, out):
        print(f"evaluating the adapted model on {_records(len(test_examples), 'test')} ...", flush=True)
        t0 = time.perf_counter()
        after = task.evaluate(model, test_examples, **eval_kw)
        after_seconds = time.perf_counter() - t0
        broken = {k: v for k, v in after.items() if isinstance(v, float) and not math.isfinite(v)}
        if broken:  # finite weights that still compute NaN/inf (a huge learning rate): not a result to save
            raise TrainingDiverged(f"training diverged: the trained adapter's test {_fmt(broken)} is not finite"
                                   f"{trainer._divergence_advice()}")
        if is_main:
            _log(out, {"step": result.steps, "split": "test", "event": "after", **after})
        forgetting = general_adapted = None
        if general and "general_loss_base" in extra:
            from deltatune.training.metrics import evaluate_loss

            general_adapted = evaluate_loss(model, general, **general_kw)
            forgetting = general_adapted - extra["general_loss_base"]

        if trainer_cfg.save_steps:
            # A checkpoint of the finished training: Ctrl-C or a full disk while saving the result is then finished
            # by --resume without training again. Deleted once summary.json is written.
            extra["train_seconds"] = result.wall_time_s
            trainer.save_checkpoint(trainer.step, capture_rng(), extra)
        # FSDP: all ranks gather the shards, rank 0 writes
        model.save_pretrained(out, is_main_process=is_main, path_initial_model_for_weight_conversion=initial_dir)
        if not is_main:
            distributed.barrier()  # rank 0 writes the rest; then all leave together
            return 0
        adapter_bytes = os.path.getsize(os.path.join(out, "adapter_model.safetensors"))
        before = extra.get("before", {})
        summary = {
            "method": settings["method"], "model": settings["model"], "data": dataset.name, "format": dataset.format,
            "metric": task.metric_name, "metric_before": before.get(task.metric_name),
            "metric_after": after.get(task.metric_name), "eval_before": before, "eval_after": after,
            "eval_records": len(test_examples), "forgetting": forgetting,
            "forgetting_reason": None if forgetting is not None else no_forgetting or "not measured",
            "forgetting_data": settings.get("forgetting_data"),
            "general_loss_base": extra.get("general_loss_base"), "general_loss_adapted": general_adapted,
            "trainable_params": trainable, "total_params": total, "adapter_bytes": adapter_bytes,
            "peak_memory_bytes": result.peak_memory_bytes, "train_time_s": result.wall_time_s,
            "time_per_step_s": result.time_per_step_s, "tokens_per_s": result.tokens_per_s, "steps": result.steps,
            "final_train_loss": result.final_loss, "precision": "bf16" if amp else "fp32", "device": str(device),
            "eval_seconds": extra.get("before_seconds", 0.0) + after_seconds,
            "wall_time_s": time.perf_counter() - started,  # this command, model loading and evaluations included
            "resumed": bool(settings.get("resume")), "quantize": settings.get("quantize"),
            "base_weight_bytes": base_bytes,
        }
        _log(out, {"step": result.steps, "event": "end",
                   **{k: v for k, v in summary.items() if not isinstance(v, dict)}})
        plots.plot_loss_curve(plots.read_metrics(os.path.join(out, METRICS_NAME)), os.path.join(out, "loss.png"),
                              title=f"{settings['method']} on {settings['model']} / {dataset.name}")
        atomic_write_text(os.path.join(out, common.SUMMARY_NAME), _json(summary))
        ckpt = os.path.join(out, CHECKPOINT_NAME)
        if os.path.exists(ckpt):
            os.unlink(ckpt)  # the adapter is the result; a finished run has nothing to resume
        print_summary(summary, out)
        distributed.barrier()
        return 0


@contextlib.contextmanager
def _after_training(trainer: Trainer, out: str) -> Iterator[None]:
    """Evaluating and saving after training: an interrupt or a full disk says what is kept and how to finish.

    Raises:
        TrainingInterrupted: on Ctrl-C, with a note on the checkpoint kept (exit code 130).
        DiskFullError: the device filled up; names the file and the checkpoint kept.
    """
    try:
        yield
    except KeyboardInterrupt:
        raise TrainingInterrupted(trainer.step, trainer.checkpoint_path,
                                  note=f"interrupted after training (step {trainer.step}), while evaluating or saving "
                                       f"the result; {_finish_advice(trainer, out)}") from None
    except Exception as exc:
        if not is_disk_full(exc) or getattr(exc, "explained", False):
            raise  # not a full disk, or already an account of the run (the trainer's checkpoint)
        path = getattr(exc, "filename", None) or out
        raise disk_full(path, f"free space, then: {_finish_advice(trainer, out)}", exc) from None


def _finish_advice(trainer: Trainer, out: str) -> str:
    """What resumable state is on disk after training, and the command that finishes the run from it."""
    resume = f"deltatune train --output-dir {out} --resume"
    if trainer.checkpoint_step is not None and os.path.exists(trainer.checkpoint_path):
        if trainer.checkpoint_step == trainer.step:
            return f"training finished and its checkpoint (step {trainer.step}) is kept; save the result with {resume}"
        return f"the checkpoint of step {trainer.checkpoint_step} is kept; continue with {resume}"
    return "no checkpoint is kept (--save-steps 0); train again with --overwrite"


def print_summary(s: dict[str, Any], out: str) -> None:
    metric = s["metric"]
    lines = [
        "",
        f"done in {human_time(s['wall_time_s'])}" + (" (since the resume)" if s.get("resumed") else "")
        + f": {s['steps']} steps of training in {human_time(s['train_time_s'])} ({s['time_per_step_s']:.2f} s/step, "
        f"{s['tokens_per_s']:.0f} tokens/s, {s['precision']} on {s['device']}), "
        f"evaluation {human_time(s['eval_seconds'])}",
        f"  trainable params  {s['trainable_params']:,d} / {s['total_params']:,d} "
        f"({100 * s['trainable_params'] / s['total_params']:.2f}%)",
        f"  adapter file      {human_bytes(s['adapter_bytes'])}",
        f"  base weights      {human_bytes(s.get('base_weight_bytes'))}"
        + (f" ({s['quantize']}, frozen)" if s.get("quantize") else " (frozen)"),
        f"  peak memory       {human_bytes(s['peak_memory_bytes'])}"
        + (" (process RSS)" if s["device"] == "cpu" else " (allocated)"),
    ]
    before, after = s["metric_before"], s["metric_after"]
    where = f"on {_records(s['eval_records'], 'held-out test')}"
    if before is not None:
        lines.append(f"  test {metric:<12} {before:.4f} -> {after:.4f} ({after - before:+.4f}) {where}")
    else:
        lines.append(f"  test {metric:<12} {after:.4f} {where}")
    if s["forgetting"] is not None:
        lines.append(f"  forgetting        {s['forgetting']:+.4f} nats/token on "
                     f"{s.get('forgetting_data') or 'general text'} "
                     f"({s['general_loss_base']:.4f} -> {s['general_loss_adapted']:.4f})")
    else:
        lines.append(f"  forgetting        n/a ({s.get('forgetting_reason') or 'not measured'})")
    lines.append(f"  saved             {out}/ (adapter_model.safetensors, adapter_config.json, metrics.jsonl, "
                 "loss.png, summary.json)")
    print("\n".join(lines), flush=True)


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in values.items())


def _log(out: str, record: dict[str, Any]) -> None:
    with open(os.path.join(out, METRICS_NAME), "a", encoding="utf-8") as fh:
        fh.write(dumps_json(record) + "\n")


def _json(obj: Any) -> str:
    return dumps_json(obj, indent=2, default=str) + "\n"  # NaN/inf as null: summary.json is always valid JSON


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="fine-tune a model with an adapter method, evaluate, save",
                              usage="deltatune train [options] [method options]",
                              description="Fine-tune with any method the library has; evaluate before and after; "
                                          "save the adapter in PEFT's format. With no options: LoRA on "
                                          "smollm2-135m learning BBC News topics (under 5 minutes on 2 CPU cores).")
    add_train_arguments(p)
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    names = set(common.method_fields())
    settings = settings_from_args(args, names)
    return run_train(settings)


__all__ = ["register", "main", "add_train_arguments", "settings_from_args", "run_train"]
