"""``deltatune train``: fine-tune, evaluate before and after, save the adapter.

Everything that can be wrong with the input (options, data, model) is checked before anything is
written, so a bad command leaves no half-made output directory. A run is a sequence of stages
(:func:`_run_train`); its settings are one :class:`~deltatune.cli.settings.RunSettings`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from deltatune import distributed
from deltatune.cli import common, evaluation, loading
from deltatune.cli import options as options_mod
from deltatune.cli import settings as settings_mod
from deltatune.cli.common import UsageError, human_bytes, human_time
from deltatune.cli.options import add_train_arguments, learning_rate
from deltatune.cli.settings import RunSettings
from deltatune.core.io import atomic_write_text, is_disk_full
from deltatune.registry import method_for
from deltatune.training import plots, runlock
from deltatune.training.data import SHAPE_BUCKET, collate, describe_columns
from deltatune.training.trainer import (
    CHECKPOINT_NAME,
    METRICS_NAME,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    TrainingInterrupted,
    TrainResult,
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


def _records(n: int, kind: str) -> str:
    """``"1 test record"``, ``"20 test records"``."""
    return f"{n} {kind} record{'s' * (n != 1)}"


def settings_from_args(args: argparse.Namespace, method_option_names: set[str]) -> RunSettings:
    """Layer defaults, recipe, config file and flags into the run's settings (:func:`settings.layered`)."""
    return settings_mod.layered(args, method_option_names)


def _apply_resume(settings: RunSettings | dict[str, Any]) -> RunSettings:
    """On ``--resume``, the saved settings are the base; a flag that would change the computation is refused
    (:func:`settings.resumed`). Takes a dict of the same keys too (``explicit`` for the flags)."""
    if not isinstance(settings, RunSettings):
        settings = RunSettings.from_layer(settings)
    return settings_mod.resumed(settings, world_size())


def _check_output_dir(settings: RunSettings, locked: bool = False) -> None:
    """Refuse an output directory in use, or holding a run that this command would clobber.

    Args:
        locked: This process holds the directory's lock (the second look, just before writing).
    """
    out = settings.output_dir
    if os.path.isfile(out):
        raise UsageError(f"--output-dir {out} is a file; pass a directory")
    if not locked:
        runlock.check_free(out)  # a live run's files say nothing about whether it finished
    present = [f for f in OUTPUT_FILES if os.path.exists(os.path.join(out, f))]
    if settings.resume:
        if os.path.exists(os.path.join(out, common.SUMMARY_NAME)):
            raise UsageError(f"--resume: {out} already holds a finished run; start a new run with --overwrite or "
                             "another --output-dir")
        if not os.path.exists(os.path.join(out, CHECKPOINT_NAME)):
            # Stopped before its first checkpoint: nothing to restore, so start it again with its settings.
            settings.resume = False
            settings.overwrite = True
        return
    if present and not settings.overwrite:
        if common.SUMMARY_NAME in present:
            what = "a finished run"
        elif CHECKPOINT_NAME in present:
            what = "an unfinished run (resume it with --resume)"
        else:
            what = "a run that stopped before its first checkpoint (--resume starts it again with its settings)"
        raise UsageError(f"--output-dir {out} already holds {what}; pass --overwrite to replace it or choose "
                         "another --output-dir")


@dataclass
class Prepared:
    """What :func:`prepare` loads and checks before anything is written; the stages of a run fill in the rest.

    Attributes:
        test_examples, val_examples: Fixed samples of ``--eval-samples`` held-out records, encoded.
        general: Blocks of general text for the forgetting measure; ``no_forgetting`` says why there are none.
        base_bytes: The frozen base's weight bytes (quantised or not), for the summary.
        eval_kw, general_kw: Keyword arguments of :meth:`Task.evaluate` and of ``metrics.evaluate_loss`` on the
            general text.
    """

    spec: loading.ModelSpec
    dataset: Any
    task: evaluation.Task
    model: torch.nn.Module
    tokenizer: Any
    peft_config: Any
    train_examples: list[dict]
    device: torch.device
    amp: torch.dtype | None = None
    test_examples: list[dict] | None = None
    val_examples: list[dict] | None = None
    general: list[dict] | None = None
    no_forgetting: str | None = None
    base_bytes: int | None = None
    eval_kw: dict[str, Any] | None = None
    general_kw: dict[str, Any] | None = None


def prepare(settings: RunSettings) -> Prepared:
    """Check everything and load model, tokenizer, data and adapter config. Writes nothing."""
    config_cls = _check_method(settings)
    _complete_schedule(settings)
    device = loading.pick_device(settings.device)
    resolve_precision(settings.precision, device)
    settings.quantize = loading.check_quantize(settings.quantize)  # before any loading: bitsandbytes?
    _check_sizes(settings)
    dataset = loading.load_data(settings)
    spec = loading.resolve_model(settings.model)
    tokenizer = loading.load_tokenizer(spec)
    task = evaluation.make_task(dataset, spec, tokenizer, int(settings.max_length))
    train_examples = task.encoder(dataset.train)
    steps = plan_steps(len(train_examples), settings.max_steps, float(settings.epochs), int(settings.batch_size),
                       int(settings.grad_accum))
    method_options = options_mod.fill_method_defaults(config_cls, settings.method_options or {}, total_steps=steps,
                                                      model_path=spec.path, train_examples=train_examples)
    settings.method_options = _loftq_options(method_options, settings.quantize)
    task_type = "CAUSAL_LM" if spec.kind == "causal" else "SEQ_CLS"
    peft_config = options_mod.build_peft_config(settings.method, settings.method_options, task_type)
    _check_output_dir(settings)
    torch.manual_seed(settings.seed)  # a fresh classification head is initialised on load
    model, tokenizer = loading.load_model(spec, labels=dataset.labels, device=device, tokenizer=tokenizer)
    if settings.method_options.get("init_lora_weights") != "loftq":  # LoftQ quantises the float model itself
        model = loading.quantize_base(model, settings.quantize)
    return Prepared(spec, dataset, task, model, tokenizer, peft_config, train_examples, device)


def _check_method(settings: RunSettings) -> type:
    """The method's config class; a fresh run's method options get the recipe's, for the methods that take them.

    Raises:
        UsageError: an unknown ``--method``.
    """
    table = options_mod.method_table()
    if settings.method not in table:
        raise options_mod.unknown_method(settings.method, table)
    if not settings.resume:  # a built-in recipe's options, for the methods that take them
        recipe = options_mod.shared_options_for(settings.method, settings.recipe_method_options)
        settings.method_options = {**recipe, **(settings.method_options or {})}
    settings.recipe_method_options = {}
    return table[settings.method][0]


def _complete_schedule(settings: RunSettings) -> None:
    """A fresh run without ``--lr`` gets the default learning rate scaled for its method."""
    if not settings.resume and not settings.given("lr"):
        settings.lr = options_mod.default_lr(settings.method, float(settings.lr))


def _check_sizes(settings: RunSettings) -> None:
    """Batch sizes, lengths, steps and learning rate that can train something.

    Raises:
        UsageError: one of them below 1 (the learning rate: not positive).
    """
    for key in ("batch_size", "grad_accum", "eval_batch_size", "max_length"):
        if int(getattr(settings, key)) < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(settings, key)}")
    if settings.max_steps is not None and int(settings.max_steps) < 1:
        raise UsageError(f"--max-steps must be at least 1, got {settings.max_steps}")
    if settings.lr <= 0:
        raise UsageError(f"--lr must be positive, got {settings.lr}")

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
    hooks = method_for(peft_config.peft_type).hooks
    init = hooks.data_init(peft_config) if hooks.data_init is not None else None
    if init is None:  # not data-driven, or not built yet (the method's checks refuse with the reason)
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
    model = hooks.create_with_data(model, peft_config, batches)
    layers = sum(1 for _, m in model.base_model.adapter_layers())
    print(f"{init}: {layers} layers initialised ({human_time(time.perf_counter() - t0)})", flush=True)
    if init == "loftq" and quantize:
        from deltatune.lora.loftq import quantize_loftq_base
        from deltatune.quantization import use_exact_cpu_kernels

        model = use_exact_cpu_kernels(quantize_loftq_base(model, quantize))  # NF4 of Q is Q: the same model
    return model


def world_size() -> int:
    return distributed.info().world_size




def run_train(settings: RunSettings) -> int:
    """Train, evaluate, save. Under torchrun every rank runs this; only rank 0 prints and writes files."""
    device = str(settings.device)
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


def _run_train(settings: RunSettings, info: Any, lock: contextlib.ExitStack) -> int:
    """The stages of a run, in order: settings, checks and loading (nothing written yet), the adapter, the output
    directory, evaluation before, training, then evaluation after and the saved result."""
    started = time.perf_counter()
    settings = _final_settings(settings, info)
    run = prepare(settings)
    distributed.barrier()  # every rank checked --output-dir before rank 0 writes into it
    _plan_evaluation(settings, run)
    _attach_adapter(settings, run)
    _claim_output_dir(settings, run, info, lock)
    _announce(settings, run, info)
    initial_dir = _keep_initial_adapter(settings, run, info)
    extra = {} if settings.resume else _evaluate_before(settings, run, initial_dir, info)
    trainable, total = _count_parameters(run.model)
    trainer = _make_trainer(settings, run, info)
    result = trainer.train(resume=bool(settings.resume), extra=extra)
    # From here on, Ctrl-C and a full disk end with a true account of what is on disk and what to do.
    with _after_training(trainer, settings.output_dir):
        after, after_seconds = _evaluate_after(run, trainer, result, info)
        forgetting, general_adapted = _forgetting(settings, run, result.extra)
        _save_adapter(settings, run, trainer, result, initial_dir, info)
        if not info.is_main:
            distributed.barrier()  # rank 0 writes the rest; then all leave together
            return 0
        summary = _summary(settings, run, result, after, after_seconds, forgetting, general_adapted,
                           trainable, total, started)
        _write_results(settings, run, result, summary)
        distributed.barrier()
        return 0


def _final_settings(settings: RunSettings, info: Any) -> RunSettings:
    """The settings of this run: on ``--resume`` the saved run's (:func:`_apply_resume`); refuse FSDP over a
    quantised base."""
    if settings.resume:
        settings = _apply_resume(settings)
    if settings.fsdp and loading.check_quantize(settings.quantize) and info.world_size > 1:
        raise UsageError("--fsdp cannot shard a bitsandbytes-quantised base (--quantize): drop --fsdp to train it "
                         "data-parallel (DDP replicates the already small quantised base)")
    return settings


def _plan_evaluation(settings: RunSettings, run: Prepared) -> None:
    """The held-out samples (fixed, ``--eval-samples``), the autocast dtype, and the general text that measures
    forgetting (causal LMs only)."""
    run.amp = resolve_precision(settings.precision, run.device)
    limit = settings.eval_samples
    run.test_examples = run.task.examples(run.dataset.test, limit)
    run.val_examples = run.task.examples(run.dataset.validation, limit)
    run.general, run.no_forgetting = evaluation.general_text_examples(
        run.tokenizer, int(settings.forgetting_tokens), path=settings.forgetting_data) \
        if run.spec.kind == "causal" else ([], "not measured: forgetting is measured for causal LMs only")
    run.eval_kw = {"batch_size": int(settings.eval_batch_size), "device": run.device, "amp": run.amp}
    run.general_kw = {**run.eval_kw, "pad_id": run.task.pad_id}


def _attach_adapter(settings: RunSettings, run: Prepared) -> None:
    """The adapter goes on before anything is evaluated or written: a config that does not fit the model (targets
    that match nothing, ...) fails at once and leaves no output directory behind."""
    from deltatune.quantization import weight_bytes

    run.base_bytes = weight_bytes(run.model)
    torch.manual_seed(settings.seed)  # the adapter's initialisation
    model = create_adapter(run.model, run.peft_config, run.train_examples, run.task, int(settings.batch_size),
                           run.device, settings.quantize)
    # after get_peft_model, which records the loaded model's own name (a local directory here)
    model.peft_config["default"].base_model_name_or_path = run.spec.name
    if settings.quantize and getattr(run.peft_config, "init_lora_weights", True) == "loftq":
        run.base_bytes = weight_bytes(model) - sum(p.numel() * p.element_size() for p in model.parameters()
                                                   if p.requires_grad)  # the base is quantised after LoftQ
    run.model = model


def _claim_output_dir(settings: RunSettings, run: Prepared, info: Any, lock: contextlib.ExitStack) -> None:
    """From here on the output directory is written, by this run alone: take its lock, then look again (another run
    may have started or finished since :func:`prepare` looked), sweep what killed saves left, and (a fresh run)
    replace the files an earlier run wrote and write ``run_config.json``."""
    out = settings.output_dir
    os.makedirs(out, exist_ok=True)
    if not info.is_main:
        return
    lock.enter_context(runlock.RunLock(out))
    _check_output_dir(settings, locked=True)
    runlock.sweep_temp_files(out, os.path.join(out, INITIAL_ADAPTER_DIR))
    if settings.resume:
        return
    for name in OUTPUT_FILES:  # --overwrite: only the files a run writes, never anything else
        path = os.path.join(out, name)
        if os.path.exists(path):
            os.unlink(path)
    record = settings.record()
    record.update(labels=run.dataset.labels, data_format=run.dataset.format, template=run.dataset.template,
                  model_kind=run.spec.kind, model_path=run.spec.path, world_size=info.world_size)
    record = {k: settings_mod.absolute_path(k, v) for k, v in record.items()}
    atomic_write_text(os.path.join(out, common.RUN_CONFIG_NAME), _json(record))


def _announce(settings: RunSettings, run: Prepared, info: Any) -> None:
    """One line on what is trained on what, and notes on columns read and a small evaluation set."""
    dataset, n_test = run.dataset, len(run.test_examples)
    quantized = f" in {settings.quantize}" if settings.quantize else ""
    print(f"deltatune train: {settings.method} on {settings.model}{quantized} ({run.spec.kind}), data {dataset.name} "
          f"({dataset.format}: {len(dataset.train)} train, {n_test} eval records) -> {settings.output_dir}",
          flush=True)
    if info.is_main and dataset.columns_read:  # e.g. an Alpaca or question/answer file
        common.err(f"note: reading {describe_columns(dataset.columns_read)} (name columns with --prompt-column, "
                   "--completion-column, ... to choose others)")
    if info.is_main and 0 < n_test < SMALL_EVAL:
        common.err(f"note: only {_records(n_test, 'held-out')} to evaluate on, so one record moves the "
                   f"metric by {1 / n_test:.2g}; pass --eval-data FILE or more data for a finer measure")


def _keep_initial_adapter(settings: RunSettings, run: Prepared, info: Any) -> str | None:
    """PiSSA/OLoRA/CorDA/LoRA-GA move part of each weight into the adapter: without it the base is only the residual.
    Keep the initial adapter, so the one saved at the end is a plain LoRA for the original base (what eval loads).
    Returns its directory, or ``None`` for the other methods."""
    out = settings.output_dir
    saves_initial = method_for(run.peft_config.peft_type).hooks.saves_initial
    keep = saves_initial is not None and saves_initial(run.peft_config)
    initial_dir = os.path.join(out, INITIAL_ADAPTER_DIR) if keep else None
    if initial_dir and not settings.resume:
        run.model.save_pretrained(initial_dir, is_main_process=info.is_main)
    return initial_dir


def _evaluate_before(settings: RunSettings, run: Prepared, initial_dir: str | None, info: Any) -> dict[str, Any]:
    """A fresh run's measures of the base model: its test metric (unless ``--no-eval-before``) and its loss on the
    general text. Returns them as the trainer's ``extra`` (kept in checkpoints, so a resume has them)."""
    extra: dict[str, Any] = {}
    # "before" is the base model alone; for PiSSA/OLoRA that is the untrained adapter on the residual base
    with contextlib.nullcontext() if initial_dir else run.model.disable_adapter():
        if settings.eval_before:
            print(f"evaluating the base model on {_records(len(run.test_examples), 'test')} ...", flush=True)
            t0 = time.perf_counter()
            extra["before"] = run.task.evaluate(run.model, run.test_examples, **run.eval_kw)
            extra["before_seconds"] = time.perf_counter() - t0
            if info.is_main:
                _log(settings.output_dir, {"step": 0, "split": "test", "event": "before", **extra["before"]})
            print(f"  before: {_fmt(extra['before'])} ({human_time(extra['before_seconds'])})", flush=True)
        if run.general:
            from deltatune.training.metrics import evaluate_loss

            extra["general_loss_base"] = evaluate_loss(run.model, run.general, **run.general_kw)
    return extra


def _count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameters, printed as PEFT prints them."""
    trainable, total = model.get_nb_trainable_parameters()
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}",
          flush=True)
    return trainable, total


def _train_config(settings: RunSettings) -> TrainConfig:
    """The trainer's settings, typed as it takes them."""
    s = settings
    return TrainConfig(
        output_dir=s.output_dir, max_steps=s.max_steps, epochs=float(s.epochs), batch_size=int(s.batch_size),
        grad_accum=int(s.grad_accum), lr=float(s.lr), weight_decay=float(s.weight_decay),
        warmup_ratio=float(s.warmup_ratio), max_grad_norm=float(s.max_grad_norm),
        loraplus_lr_ratio=s.loraplus_lr_ratio, eval_steps=int(s.eval_steps), save_steps=int(s.save_steps),
        seed=int(s.seed), precision=s.precision, gradient_checkpointing=bool(s.gradient_checkpointing),
        chunked_loss=bool(s.chunked_loss), compile=s.compile or None, progress=False if s.progress is False else None)


def _make_trainer(settings: RunSettings, run: Prepared, info: Any) -> Trainer:
    """The trainer (DDP or FSDP under torchrun), evaluating on the validation sample every ``--eval-steps``; says
    what it will train."""
    trainer_cfg = _train_config(settings)

    def evaluate(m):
        return run.task.evaluate(m, run.val_examples, **run.eval_kw)

    parallel = ("fsdp" if settings.fsdp else "ddp") if info.world_size > 1 else "none"
    trainer = Trainer(run.model, run.train_examples, trainer_cfg, pad_id=run.task.pad_id,
                      sequence_classifier=run.task.sequence_classifier, evaluate=evaluate, device=run.device,
                      parallel=parallel)
    where = f"{info.world_size} processes ({parallel}, {info.backend}), " if info.world_size > 1 else ""
    print(f"training {trainer.total_steps} steps of {trainer.global_batch_size * trainer_cfg.grad_accum} examples "
          f"({where}precision: {'bf16' if run.amp else 'fp32'}, device: {run.device})", flush=True)
    return trainer


def _evaluate_after(run: Prepared, trainer: Trainer, result: TrainResult, info: Any) -> tuple[dict, float]:
    """The trained model's test metric and the seconds it took.

    Raises:
        TrainingDiverged: finite weights that still compute NaN/inf (a huge learning rate): not a result to save.
    """
    print(f"evaluating the adapted model on {_records(len(run.test_examples), 'test')} ...", flush=True)
    t0 = time.perf_counter()
    after = run.task.evaluate(run.model, run.test_examples, **run.eval_kw)
    after_seconds = time.perf_counter() - t0
    broken = {k: v for k, v in after.items() if isinstance(v, float) and not math.isfinite(v)}
    if broken:
        raise TrainingDiverged(f"training diverged: the trained adapter's test {_fmt(broken)} is not finite"
                               f"{trainer._divergence_advice()}")
    if info.is_main:
        _log(trainer.config.output_dir, {"step": result.steps, "split": "test", "event": "after", **after})
    return after, after_seconds


def _forgetting(settings: RunSettings, run: Prepared, extra: dict[str, Any]) -> tuple[float | None, float | None]:
    """``(forgetting, general loss adapted)``: how much worse the adapted model predicts general text than the base
    did (nats/token); ``(None, None)`` where it was not measured."""
    if not (run.general and "general_loss_base" in extra):
        return None, None
    from deltatune.training.metrics import evaluate_loss

    general_adapted = evaluate_loss(run.model, run.general, **run.general_kw)
    return general_adapted - extra["general_loss_base"], general_adapted


def _save_adapter(settings: RunSettings, run: Prepared, trainer: Trainer, result: TrainResult,
                  initial_dir: str | None, info: Any) -> None:
    """Write the trained adapter (FSDP: all ranks gather the shards, rank 0 writes), after a checkpoint of the
    finished training: Ctrl-C or a full disk while saving the result is then finished by ``--resume`` without
    training again (the checkpoint is deleted once ``summary.json`` is written)."""
    if trainer.config.save_steps:
        result.extra["train_seconds"] = result.wall_time_s
        trainer.save_checkpoint(trainer.step, capture_rng(), result.extra)
    run.model.save_pretrained(settings.output_dir, is_main_process=info.is_main,
                              path_initial_model_for_weight_conversion=initial_dir)


def _summary(settings: RunSettings, run: Prepared, result: TrainResult, after: dict[str, float],
             after_seconds: float, forgetting: float | None, general_adapted: float | None, trainable: int,
             total: int, started: float) -> dict[str, Any]:
    """``summary.json``: what the run measured, before and after, and what it cost."""
    extra, task = result.extra, run.task
    before = extra.get("before", {})
    return {
        "method": settings.method, "model": settings.model, "data": run.dataset.name, "format": run.dataset.format,
        "metric": task.metric_name, "metric_before": before.get(task.metric_name),
        "metric_after": after.get(task.metric_name), "eval_before": before, "eval_after": after,
        "eval_records": len(run.test_examples), "forgetting": forgetting,
        "forgetting_reason": None if forgetting is not None else run.no_forgetting or "not measured",
        "forgetting_data": settings.forgetting_data,
        "general_loss_base": extra.get("general_loss_base"), "general_loss_adapted": general_adapted,
        "trainable_params": trainable, "total_params": total,
        "adapter_bytes": os.path.getsize(os.path.join(settings.output_dir, "adapter_model.safetensors")),
        "peak_memory_bytes": result.peak_memory_bytes, "train_time_s": result.wall_time_s,
        "time_per_step_s": result.time_per_step_s, "tokens_per_s": result.tokens_per_s, "steps": result.steps,
        "final_train_loss": result.final_loss, "precision": "bf16" if run.amp else "fp32", "device": str(run.device),
        "eval_seconds": extra.get("before_seconds", 0.0) + after_seconds,
        "wall_time_s": time.perf_counter() - started,  # this command, model loading and evaluations included
        "resumed": bool(settings.resume), "quantize": settings.quantize,
        "base_weight_bytes": run.base_bytes,
    }


def _write_results(settings: RunSettings, run: Prepared, result: TrainResult, summary: dict[str, Any]) -> None:
    """Rank 0: the "end" line of ``metrics.jsonl``, ``loss.png``, ``summary.json``; drop the checkpoint (the adapter
    is the result; a finished run has nothing to resume) and print the summary."""
    out = settings.output_dir
    _log(out, {"step": result.steps, "event": "end", **{k: v for k, v in summary.items() if not isinstance(v, dict)}})
    plots.plot_loss_curve(plots.read_metrics(os.path.join(out, METRICS_NAME)), os.path.join(out, "loss.png"),
                          title=f"{settings.method} on {settings.model} / {run.dataset.name}")
    atomic_write_text(os.path.join(out, common.SUMMARY_NAME), _json(summary))
    ckpt = os.path.join(out, CHECKPOINT_NAME)
    if os.path.exists(ckpt):
        os.unlink(ckpt)
    print_summary(summary, out)


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
    names = set(options_mod.method_fields())
    settings = settings_from_args(args, names)
    return run_train(settings)


__all__ = ["register", "main", "add_train_arguments", "learning_rate", "settings_from_args", "run_train"]
