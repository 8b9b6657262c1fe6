"""A plain PyTorch training loop for adapters, with exact resume.

One optimizer step consumes ``grad_accum`` micro-batches of ``batch_size`` examples. Micro-batch ``m``
is fixed by the seed alone: it is slice ``m mod M`` of epoch ``m // M``'s permutation (``M``
micro-batches per epoch, permutation seeded by ``(seed, epoch)``). So the step number says where in
the data a run is, and a checkpoint only needs the trainable tensors, the optimizer and scheduler
state, the RNG states (dropout) and the step. A resumed run therefore computes exactly what the
uninterrupted run would have.

The loss of a step is ``sum of token losses / number of labelled tokens in all its micro-batches``:
the gradient of one large batch, however it is split.

Distributed (``torchrun``, see :mod:`deltatune.distributed`): micro-batch ``m`` is a *global* batch of
``batch_size * world_size`` examples and rank ``r`` computes slice ``r`` of it. The loss is normalised by the
labelled tokens of the whole global step and multiplied by ``world_size`` (DDP and FSDP average gradients over
ranks), so ``N`` ranks with ``batch_size`` ``b`` make the update one process makes with ``batch_size`` ``N * b``.
Checkpoints hold full tensors keyed by name, so they resume under any world size with the same global batch.

Learning rate: linear warm-up over ``warmup_ratio`` of the steps, then cosine decay to zero:

    lr(s) = lr * (s + 1) / (W + 1)                       for s < W
    lr(s) = lr * 0.5 * (1 + cos(pi * (s - W) / (S - W)))   otherwise
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import pickle
import random
import re
import resource
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from deltatune import distributed
from deltatune.core.io import atomic_write, is_disk_full
from deltatune.errors import DeltatuneError, DiskFullError
from deltatune.training.data import SHAPE_BUCKET, collate, count_targets
from deltatune.training.method_state import load_method_state, method_state
from deltatune.training.metrics import autocast, loss_sum

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
# Settings that change what a run computes; a resume must use the same ones.
_SCHEDULE_KEYS = ("max_steps", "epochs", "global_batch_size", "grad_accum", "lr", "weight_decay", "warmup_ratio",
                  "max_grad_norm", "seed", "loraplus_lr_ratio")


class TrainingInterrupted(Exception):
    """Ctrl-C (SIGINT/SIGTERM) stopped training; a checkpoint was written at ``step``.

    ``note``, when given, replaces the CLI's default account ("checkpoint saved, continue with --resume"): what is
    on disk and what to do, for an interrupt that came after training (while evaluating or saving the result).
    """

    def __init__(self, step: int, checkpoint: str, note: str | None = None) -> None:
        super().__init__(note or f"interrupted at step {step}; checkpoint saved to {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint
        self.note = note


class CheckpointError(DeltatuneError, ValueError):
    """A checkpoint that is missing, unreadable, or from a different run."""


class TrainingDiverged(DeltatuneError, ArithmeticError):
    """The loss, the gradients or the weights stopped being finite numbers; training stopped, nothing was saved."""


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-inf) replaced by ``None``: JSON has no NaN, so
    ``json.dumps(..., allow_nan=False)`` of the result is valid JSON any reader parses."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def disk_full(path: str, advice: str, cause: BaseException) -> DiskFullError:
    """A :class:`DiskFullError` for ``path`` whose one line says what of the run is intact and what to do."""
    exc = DiskFullError(path, getattr(cause, "errno", None) or errno.ENOSPC)
    exc.strerror = f"no space left on device writing {path}; {advice}"
    exc.explained = True  # type: ignore[attr-defined]  # callers up the stack leave this account as it is
    return exc


def dumps_json(value: Any, **kw: Any) -> str:
    """``json.dumps`` that writes ``null`` for NaN/inf instead of the bare ``NaN`` no JSON parser accepts."""
    return json.dumps(json_safe(value), allow_nan=False, **kw)


@dataclass
class TrainConfig:
    """What a run does. Every field has a CLI flag of the same name (``--max-steps``...).

    Attributes:
        max_steps: Optimizer steps; ``None`` means ``epochs`` passes over the data.
        batch_size: Examples per micro-batch (per process).
        grad_accum: Micro-batches per optimizer step.
        lr: Peak learning rate (AdamW).
        loraplus_lr_ratio: With a value, LoRA+: ``lora_B`` learns this many times faster than ``lora_A``.
        eval_steps: Evaluate every this many steps (0: only at the end, which the caller does).
        save_steps: Write a resumable checkpoint every this many steps (and on Ctrl-C).
        precision: ``"auto"`` (bf16 autocast where the hardware does bf16 fast), ``"bf16"`` or ``"fp32"``.
        progress: A progress bar (``True``), none (``False``), or a bar on a terminal and a plain line
            every tenth of the run elsewhere (``None``).
        chunked_loss: For a causal LM with a plain linear head, compute head + cross-entropy chunk by chunk
            (:mod:`deltatune.training.loss`): same loss, without the ``(tokens, vocab)`` logits and gradient.
        compile: A ``torch.compile`` backend (``"inductor"``, ``"aot_eager"``...) to compile the model's forward
            for the training steps, or ``None``.
    """

    output_dir: str
    max_steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    loraplus_lr_ratio: float | None = None
    eval_steps: int = 0
    save_steps: int = 10
    seed: int = 0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    progress: bool | None = None
    chunked_loss: bool = True
    compile: str | None = None


@dataclass
class TrainResult:
    """What a finished run measured."""

    steps: int
    wall_time_s: float
    time_per_step_s: float
    tokens_per_s: float
    peak_memory_bytes: int
    final_loss: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Progress:
    """The progress display of a run: the bar, and a plain line every ``plain_every`` steps (0: none)."""

    bar: Any
    plain_every: int


@dataclass
class _Clock:
    """Time and tokens of a run's steps (this process's run; ``elapsed_before``: the runs before a resume)."""

    elapsed_before: float
    start: float = field(default_factory=time.perf_counter)
    step_times: list[float] = field(default_factory=list)
    tokens_seen: int = 0
    last_loss: float = float("nan")

    def add_step(self, seconds: float, tokens: int, loss: float) -> None:
        self.step_times.append(seconds)
        self.tokens_seen += tokens
        self.last_loss = loss

    def train_seconds(self) -> float:
        """Training time of the whole run so far, the runs before a resume included."""
        return self.elapsed_before + time.perf_counter() - self.start

    def mean_step(self) -> float:
        return sum(self.step_times) / len(self.step_times) if self.step_times else float("nan")

    def result(self, steps: int, peak_memory: int, extra: dict[str, Any]) -> TrainResult:
        return TrainResult(steps=steps, wall_time_s=self.train_seconds(), time_per_step_s=self.mean_step(),
                           tokens_per_s=self.tokens_seen / max(sum(self.step_times), 1e-9),
                           peak_memory_bytes=peak_memory, final_loss=self.last_loss, extra=extra)


def fast_bf16_available(device: torch.device) -> bool:
    """bf16 autocast is worth it on CUDA with bf16, and on CPUs with AMX or AVX512-BF16 (elsewhere it is emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
        except AttributeError:  # older torch without these probes
            return False
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (``None``: plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        return torch.bfloat16 if fast_bf16_available(device) else None
    raise DeltatuneError(f"--precision {precision!r} is not one of auto, bf16, fp32")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory allocated by torch, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# What each checkpoint format must hold (format 1 kept positional optimizer state).
_REQUIRED_KEYS = {1: ("step", "trainable", "optimizer", "scheduler", "rng", "schedule"),
                  2: ("step", "trainable", "optimizer_by_name", "scheduler", "rng", "schedule")}


def read_checkpoint(path: str, output_dir: str) -> dict[str, Any]:
    """Load a checkpoint as plain data: ``weights_only=True`` never runs code from the file's pickle.

    Everything a checkpoint holds (tensors, dicts, lists, tuples, numbers, strings) is plain data, so an honest
    checkpoint always loads; a file whose pickle names a function or class (which unpickling would call) is refused.

    Raises:
        CheckpointError: the file is missing, asks to run code, is damaged, or lacks a key its format needs.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"--resume: no {CHECKPOINT_NAME} in {output_dir}; start without --resume") from None
    except pickle.UnpicklingError as exc:
        code = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if code or "allowed global" in str(exc):
            # torch's own text suggests weights_only=False: exactly what must never happen to a foreign file.
            raise CheckpointError(
                f"{path} is refused: loading it would run Python code ({code.group(1) if code else 'a global'}) "
                "and deltatune never runs code from a checkpoint; delete it and start again") from None
        raise CheckpointError(f"{path} cannot be read (damaged or not a torch file); delete it and start again") \
            from None
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}); delete it and start again") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a deltatune checkpoint (it holds a {type(state).__name__}); "
                              "delete it and start again")
    required = _REQUIRED_KEYS[1 if state.get("format", 1) == 1 and "optimizer_by_name" not in state else 2]
    missing = next((k for k in required if k not in state), None)
    if missing is not None:
        raise CheckpointError(f"checkpoint {path} lacks {missing!r}; it is damaged or from another version; "
                              "delete it and start again")
    return state


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a kill leaves the old file or the new."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class Trainer:
    """Trains the parameters of ``model`` that have ``requires_grad`` on tokenised examples.

    Args:
        model: Usually a ``PeftModel``; anything whose forward takes ``input_ids`` and ``attention_mask``.
        train_examples: From :class:`~deltatune.training.data.Encoder`.
        config: The run's settings.
        pad_id: Token id used for padding.
        sequence_classifier: Examples carry class ids and the model returns ``(B, C)`` logits.
        evaluate: ``model -> {name: value}`` run every ``eval_steps``; written to ``metrics.jsonl``.
        device: Where the model is (this rank's device in a distributed run).
        parallel: In a distributed run: ``"ddp"`` (replicate, all-reduce adapter gradients) or ``"fsdp"``
            (shard every block with FSDP2, for a base that does not fit one device); ``"auto"`` is DDP when
            a process group of more than one rank is initialised, else nothing.
    """

    def __init__(self, model: nn.Module, train_examples: list[dict], config: TrainConfig, *, pad_id: int,
                 sequence_classifier: bool = False, evaluate: Callable[[nn.Module], dict] | None = None,
                 device: torch.device | str = "cpu", parallel: str = "auto") -> None:
        if not train_examples:
            raise DeltatuneError("no training examples after tokenisation; check --data and --max-length")
        for name in ("batch_size", "grad_accum"):
            if getattr(config, name) < 1:
                raise DeltatuneError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
        if config.max_steps is not None and config.max_steps < 1:
            raise DeltatuneError(f"--max-steps must be at least 1, got {config.max_steps}")
        if not (math.isfinite(config.lr) and config.lr > 0):
            raise DeltatuneError(f"--lr must be a positive finite number, got {config.lr}")
        if parallel not in ("auto", "ddp", "fsdp", "none"):
            raise DeltatuneError(f"parallel={parallel!r} is not one of auto, ddp, fsdp, none")
        self.dist = distributed.info()
        if parallel == "auto":
            parallel = "ddp" if self.dist.world_size > 1 else "none"
        configs = (getattr(model, "peft_config", None) or {}).values()
        refusal = next((r for c in configs if (r := getattr(c, "distributed_refusal", None))), None)
        if parallel != "none" and refusal:
            raise DeltatuneError(refusal)
        self.parallel = parallel
        self.model = model
        self.examples = train_examples
        self.config = config
        self.pad_id = pad_id
        self.sequence_classifier = sequence_classifier
        self.evaluate = evaluate
        self.device = torch.device(device)
        self.amp = resolve_precision(config.precision, self.device)
        # One micro-batch is global: batch_size examples on each rank.
        self.global_batch_size = config.batch_size * self.dist.world_size
        self.micro_per_epoch = math.ceil(len(train_examples) / self.global_batch_size)
        self.total_steps = plan_steps(len(train_examples), config.max_steps, config.epochs, self.global_batch_size,
                                      config.grad_accum)
        if parallel == "fsdp":  # in place, before the optimizer sees the (now sharded) parameters
            distributed.wrap_fsdp(model)
        self.train_model = distributed.wrap_ddp(model, self.device) if parallel == "ddp" else model
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._names = {id(p): n for n, p in self.params}
        if not self.params:
            raise DeltatuneError("the model has no trainable parameters; did the adapter attach to any module?")
        self.optimizer = self._make_optimizer()
        # What the training forward calls: the DDP wrapper (gradient all-reduce), compiled if asked.
        wrapped = self.train_model if self.train_model is not model else None
        self.forward_model = compile_model(wrapped or model, config.compile) if config.compile else wrapped
        # FSDP2 keeps the head's weight sharded outside its forward: the chunked loss reads it directly.
        self.chunked_loss = config.chunked_loss and parallel != "fsdp"
        warmup = int(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, warmup,
                                                                                          self.total_steps))
        self.step = 0
        self.checkpoint_step: int | None = None  # the step of the checkpoint on disk, if this run wrote or read one
        self._stop_requested = False
        self._perm_cache: tuple[int, torch.Tensor] | None = None
        self.checkpoint_path = os.path.join(config.output_dir, CHECKPOINT_NAME)
        self.metrics_path = os.path.join(config.output_dir, METRICS_NAME)
        self.on_step_end: Callable[[int], None] | None = None  # test hook: called after each finished step

    # ---- setup -------------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        # The fused kernel updates every tensor in one pass: on this CPU's LoRA r=16 all-linear case
        # (420 tensors, 4.9M values) a step takes 3.3 ms against 15 ms for the default foreach path.
        # FSDP's sharded (DTensor) parameters keep the default path.
        fused = {"fused": True} if self.parallel != "fsdp" and all(
            p.is_floating_point() and p.device.type in ("cpu", "cuda") for _, p in self.params) else {}
        if cfg.loraplus_lr_ratio:
            from deltatune import create_loraplus_optimizer

            return create_loraplus_optimizer(self.model, torch.optim.AdamW, lr=cfg.lr,
                                             loraplus_lr_ratio=cfg.loraplus_lr_ratio,
                                             loraplus_weight_decay=cfg.weight_decay, **fused)
        return torch.optim.AdamW([p for _, p in self.params], lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)

    def micro_batch(self, m: int) -> list[dict]:
        """Examples of global micro-batch ``m`` (a pure function of the seed and ``m``; all ranks' examples)."""
        epoch, index = divmod(m, self.micro_per_epoch)
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            self._perm_cache = (epoch, torch.randperm(len(self.examples), generator=gen))
        rows = self._perm_cache[1][index * self.global_batch_size:(index + 1) * self.global_batch_size]
        return [self.examples[i] for i in rows.tolist()]

    def local_slice(self, examples: list[dict]) -> list[dict]:
        """This rank's part of a global micro-batch (may be empty at the ragged end of an epoch)."""
        b = self.config.batch_size
        return examples[self.dist.rank * b:(self.dist.rank + 1) * b]

    def request_stop(self) -> None:
        """Stop at the next micro-batch boundary and write a checkpoint (what Ctrl-C does)."""
        self._stop_requested = True

    # ---- checkpoints -------------------------------------------------------------------------
    def _schedule(self) -> dict[str, Any]:
        return {k: self.global_batch_size if k == "global_batch_size" else getattr(self.config, k)
                for k in _SCHEDULE_KEYS}

    def save_checkpoint(self, step: int, rng: dict[str, Any], extra: dict[str, Any]) -> None:
        """Write the run's state (every rank calls this: FSDP shards are gathered; rank 0 writes).

        Format 2: trainable tensors and optimizer state are full tensors keyed by parameter name,
        so the file does not depend on the world size or on FSDP.
        """
        trainable = {n: distributed.full_tensor(p.detach()).cpu().clone() for n, p in self.params}
        optimizer = distributed.optimizer_state_by_name(self.optimizer, self._names)
        rngs = distributed.gather_objects(rng)  # dropout streams differ per rank
        if not self.dist.is_main:
            return
        state = {
            "format": 2,
            "step": step,
            "trainable": trainable,
            "optimizer_by_name": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "rng": rngs[0],
            "rng_per_rank": rngs,
            "schedule": self._schedule(),
            "world_size": self.dist.world_size,
            "method_state": method_state(self.model),
            "extra": extra,
        }
        try:
            atomic_torch_save(state, self.checkpoint_path)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            # atomic_write removed its temporary file: the checkpoint on disk is the previous one, whole.
            raise disk_full(self.checkpoint_path, f"{self.kept_checkpoint()}; free space, then continue with "
                                                  f"deltatune train --output-dir {self.config.output_dir} --resume",
                            exc) from None
        self.checkpoint_step = step

    def load_checkpoint(self) -> dict[str, Any]:
        """Restore a checkpoint written by this run's settings; returns its ``extra`` dict.

        Raises:
            CheckpointError: no checkpoint, one that asks to run code, a damaged one, or one from other settings.
        """
        state = read_checkpoint(self.checkpoint_path, self.config.output_dir)
        saved = dict(state["schedule"])
        if "global_batch_size" not in saved:  # format 1: single-process runs only
            saved["global_batch_size"] = saved.pop("batch_size", None)
        mine = self._schedule()
        changed = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if changed:
            desc = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            hint = ""
            if "global_batch_size" in changed:
                hint = (f" (global batch = --batch-size x processes; the checkpoint was written by "
                        f"{state.get('world_size', 1)} process(es): pick --batch-size so the product is "
                        f"{saved['global_batch_size']})")
            raise CheckpointError(f"--resume with different settings ({desc}){hint}; resume with the same options or "
                                  "train into a new --output-dir")
        names = {n for n, _ in self.params}
        if set(state["trainable"]) != names:
            raise CheckpointError(f"{self.checkpoint_path} holds other trainable parameters than this model has "
                                  "(different method, targets or model); resume with the same options")
        try:
            with torch.no_grad():
                for n, p in self.params:
                    p.copy_(distributed.shard_like(state["trainable"][n].to(p.device), p))
            load_method_state(self.model, state.get("method_state", {}))
            if "optimizer_by_name" in state:
                distributed.load_optimizer_state_by_name(self.optimizer, state["optimizer_by_name"], self._names)
            else:  # format 1: positional torch state
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            per_rank = state.get("rng_per_rank") or [state["rng"]]
            # Same world size: each rank continues its own dropout stream; otherwise exactness is lost anyway.
            restore_rng(per_rank[self.dist.rank] if len(per_rank) == self.dist.world_size else per_rank[0])
        except DeltatuneError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:  # a value of the wrong shape
            raise CheckpointError(f"checkpoint {self.checkpoint_path} is damaged or from another version "
                                  f"({type(exc).__name__} while restoring it); delete it and start again") from None
        self.step = self.checkpoint_step = state["step"]
        self._rewind_metrics(self.step)
        return state.get("extra", {})

    def _rewind_metrics(self, step: int) -> None:
        """Drop metric lines a crashed run wrote after its last checkpoint, so the file reads as one run."""
        if not self.dist.is_main or not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path, encoding="utf-8") as fh:
            lines = [ln for ln in fh if ln.strip()]
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            # "after" and "end" belong to the run's finish, which the resumed run writes again.
            if record.get("step", 0) <= step and record.get("event") not in ("after", "end"):
                kept.append(line if line.endswith("\n") else line + "\n")
        from deltatune.core.io import atomic_write_text

        atomic_write_text(self.metrics_path, "".join(kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as fh:
                fh.write(dumps_json(record) + "\n")
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            # A line cut short is dropped on --resume (_rewind_metrics), so the file still reads as one run.
            raise disk_full(self.metrics_path, f"{self.kept_checkpoint()}; free space, then continue with "
                                               f"deltatune train --output-dir {self.config.output_dir} --resume",
                            exc) from None

    # ---- the loop ----------------------------------------------------------------------------
    def train(self, resume: bool = False, extra: dict[str, Any] | None = None) -> TrainResult:
        """Run to ``total_steps``. ``extra`` (JSON-able) is stored in checkpoints and returned on resume.

        The stages: start (restore a checkpoint, or seed), then one :meth:`_train_step` per optimizer step under
        Ctrl-C handling and a progress display, then the check that the last update left finite weights.

        Raises:
            TrainingInterrupted: after SIGINT/SIGTERM, once the checkpoint is on disk.
            TrainingDiverged: the loss, the gradients or the final weights are not finite.
        """
        extra = self._start(resume, dict(extra or {}))
        with self._stop_on_signals(), self._progress() as progress:
            clock = _Clock(elapsed_before=float(extra.get("train_seconds", 0.0)))
            while self.step < self.total_steps:
                self._train_step(extra, clock, progress)
        self._check_weights_finite()
        return clock.result(self.step, peak_memory_bytes(self.device), extra)

    def _start(self, resume: bool, extra: dict[str, Any]) -> dict[str, Any]:
        """Restore the checkpoint (``resume``; its ``extra`` joins ``extra``) or seed a fresh run; switch on gradient
        checkpointing if asked, and training mode. Returns ``extra``."""
        os.makedirs(self.config.output_dir, exist_ok=True)
        if resume:
            extra.update(self.load_checkpoint())
            distributed.barrier()  # rank 0 rewinds metrics.jsonl before anyone appends to it
        else:
            torch.manual_seed(self.config.seed)
            random.seed(self.config.seed)
        if self.config.gradient_checkpointing:
            _enable_gradient_checkpointing(self.model)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.model.train()
        return extra

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """The first Ctrl-C (SIGINT/SIGTERM) asks for a clean stop at the next micro-batch; a second one stops at once
        (the previous handlers are back). Outside the main thread there is no signal handling; checkpoints still
        happen."""
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def on_signal(signum, frame):
            self._stop_requested = True
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        try:
            for sig in previous:
                signal.signal(sig, on_signal)
        except ValueError:  # not the main thread
            previous = {}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @contextlib.contextmanager
    def _progress(self) -> Iterator[_Progress]:
        """A progress bar on rank 0 (``config.progress``); without one and with ``progress=None``, a plain line every
        tenth of the run."""
        cfg = self.config
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr,
                   disable=(None if cfg.progress is None else not cfg.progress) if self.dist.is_main else True)
        plain_every = max(1, self.total_steps // 10) \
            if bar.disable and cfg.progress is None and self.dist.is_main else 0
        try:
            yield _Progress(bar, plain_every)
        finally:
            bar.close()

    def _train_step(self, extra: dict[str, Any], clock: _Clock, progress: _Progress) -> None:
        """One optimizer step: the micro-batches' gradients and the method's regulariser, a stop if one was asked for
        mid-step, clipping and the finiteness check, the update, then the step's log line, evaluation and
        checkpoint."""
        t0 = time.perf_counter()
        rng = capture_rng()  # the state at the step's start: what a checkpoint taken mid-step holds
        micro = [self.micro_batch(m) for m in range(self.step * self.config.grad_accum,
                                                    (self.step + 1) * self.config.grad_accum)]
        n_targets = max(1, sum(count_targets(mb) for mb in micro))  # of the global step: all ranks agree
        step_loss, step_tokens = self._accumulate_gradients(micro, n_targets)
        if not self._stop_requested:
            self._add_regularization()
        if self._stop_requested:  # mid-step: drop the partial gradients, save the step's start
            self.optimizer.zero_grad(set_to_none=True)
            extra["train_seconds"] = clock.train_seconds()
            self.save_checkpoint(self.step, rng, extra)
            raise TrainingInterrupted(self.step, self.checkpoint_path)
        grad_norm, step_loss, step_tokens = self._clip_and_check(step_loss, step_tokens, n_targets)
        lr = self.optimizer.param_groups[0]["lr"]
        self._update()
        dt = time.perf_counter() - t0
        clock.add_step(dt, step_tokens, step_loss / n_targets)
        self._report_step(progress, clock, {"step": self.step, "loss": clock.last_loss, "lr": lr,
                                            "grad_norm": float(grad_norm), "tokens": step_tokens,
                                            "tokens_per_s": step_tokens / dt, "step_time_s": dt,
                                            "epoch": self.step * self.config.grad_accum / self.micro_per_epoch})
        self._evaluate_if_due(progress)
        if self.on_step_end is not None:
            self.on_step_end(self.step)
        self._checkpoint_if_due(extra, clock)

    def _accumulate_gradients(self, micro: list[list[dict]], n_targets: int) -> tuple[float, int]:
        """Forward and backward of the step's micro-batches (this rank's slice of each), the loss summed over tokens
        and divided by the step's ``n_targets``. Returns this rank's ``(summed loss, tokens)``; stops early when a
        stop was asked for."""
        step_loss, step_tokens = 0.0, 0
        for i, global_examples in enumerate(micro):
            examples = self.local_slice(global_examples)
            # A rank with no examples at an epoch's ragged end still joins the collectives: it runs
            # one example with weight 0 (zero gradient).
            weight = float(self.dist.world_size) if examples else 0.0
            batch = {k: v.to(self.device) for k, v in
                     collate(examples or global_examples[:1], self.pad_id,
                             left_pad=not self.sequence_classifier, multiple_of=SHAPE_BUCKET).items()}
            with self._sync_context(last=i == len(micro) - 1):
                with autocast(self.device, self.amp):
                    loss, _ = loss_sum(self.model, batch, self.sequence_classifier, chunked=self.chunked_loss,
                                       forward_model=self.forward_model)
                (loss * (weight / n_targets)).backward()
            if examples:
                step_loss += float(loss.detach())
                step_tokens += int(batch["attention_mask"].sum())
            if self._any_rank_stopped():
                break
        return step_loss, step_tokens

    def _add_regularization(self) -> None:
        """The trained method's regulariser (``PeftModel.regularization_loss``, e.g. AdaLoRA's orthogonality
        penalty), added to the gradients; the trainer computes its loss from the logits, so ``forward`` does not."""
        regulariser = _regularization_loss(self.model)
        if regulariser is not None:
            regulariser.backward()

    def _clip_and_check(self, step_loss: float, step_tokens: int, n_targets: int) -> tuple[torch.Tensor, float, int]:
        """Clip the gradients; the global step's loss and tokens summed over ranks.

        Raises:
            TrainingDiverged: the loss or the gradient norm is not finite. Before the update: the weights are still
                those of the last finite step, so the last checkpoint (a finite state) is kept and no NaN adapter
                is ever written.
        """
        cfg = self.config
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.params], cfg.max_grad_norm
                                                   if cfg.max_grad_norm > 0 else float("inf"))
        grad_norm = distributed.full_tensor(grad_norm)  # FSDP: a DTensor over the shards
        step_loss, step_tokens = distributed.all_reduce_sum([step_loss, step_tokens], self.device)
        if not (math.isfinite(step_loss) and bool(torch.isfinite(grad_norm))):
            self.optimizer.zero_grad(set_to_none=True)
            what = "loss" if not math.isfinite(step_loss) else "gradient norm"
            value = step_loss / n_targets if what == "loss" else float(grad_norm)
            raise TrainingDiverged(f"training diverged at step {self.step + 1}: the {what} is {value}"
                                   f"{self._divergence_advice()}")
        return grad_norm, step_loss, int(step_tokens)

    def _update(self) -> None:
        """The optimizer step, then the trained method's per-step work (``PeftModel.update_and_allocate``, e.g.
        AdaLoRA's rank allocation, which reads the gradients), the schedule, and the next step."""
        self.optimizer.step()
        _method_step(self.model, self.step + 1)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def _report_step(self, progress: _Progress, clock: _Clock, record: dict[str, Any]) -> None:
        """The step's line in ``metrics.jsonl``, the progress bar, and the plain line every tenth of the run."""
        self.log(record)
        progress.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        progress.bar.update(1)
        if progress.plain_every and (self.step % progress.plain_every == 0 or self.step == self.total_steps):
            left = (self.total_steps - self.step) * clock.mean_step()
            print(f"step {self.step}/{self.total_steps}  loss {record['loss']:.4f}  "
                  f"{record['tokens_per_s']:.0f} tokens/s  {left:.0f}s left", file=sys.stderr, flush=True)

    def _evaluate_if_due(self, progress: _Progress) -> None:
        """Every ``eval_steps`` (but not at the end, which the caller evaluates): validation metrics, logged."""
        cfg = self.config
        if cfg.eval_steps and self.evaluate and self.step % cfg.eval_steps == 0 and self.step < self.total_steps:
            result = self.evaluate(self.model)
            self.log({"step": self.step, "split": "validation", **result})
            progress.bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))

    def _checkpoint_if_due(self, extra: dict[str, Any], clock: _Clock) -> None:
        """A checkpoint every ``save_steps`` (not after the last step: the caller saves the result) and when a stop
        was asked for, which then ends the run.

        Raises:
            TrainingInterrupted: a stop was asked for and the checkpoint is on disk.
        """
        cfg = self.config
        last = self.step == self.total_steps
        if self._any_rank_stopped() or (cfg.save_steps and self.step % cfg.save_steps == 0 and not last):
            extra["train_seconds"] = clock.train_seconds()
            self.save_checkpoint(self.step, capture_rng(), extra)
            if self._stop_requested and not last:
                raise TrainingInterrupted(self.step, self.checkpoint_path)

    def _check_weights_finite(self) -> None:
        """The last update is checked by no later step's loss: a huge learning rate can leave inf/NaN weights.

        Raises:
            TrainingDiverged: naming the first parameter that is not finite.
        """
        bad = next((n for n, p in self.params if not bool(torch.isfinite(distributed.full_tensor(p.detach())).all())),
                   None)
        if bad is not None:
            raise TrainingDiverged(f"training diverged: after step {self.step} the weights of {bad} are not finite"
                                   f"{self._divergence_advice()}")

    def kept_checkpoint(self) -> str:
        """What resumable state is on disk, in words."""
        if self.checkpoint_step is not None and os.path.exists(self.checkpoint_path):
            return f"the checkpoint of step {self.checkpoint_step} in {self.checkpoint_path} is intact"
        return "no earlier checkpoint exists"

    def _divergence_advice(self) -> str:
        kept = (f"the last checkpoint, of step {self.checkpoint_step}, is kept in {self.checkpoint_path}"
                if self.checkpoint_step is not None and os.path.exists(self.checkpoint_path)
                else "no checkpoint was written")
        return (f"; stopped without saving the adapter; {kept}; lower --lr (now {self.config.lr:g}) and train "
                "again with --overwrite")

    def _sync_context(self, last: bool):
        """DDP: all-reduce gradients only after the step's last micro-batch (the sum is the same, cheaper)."""
        if self.parallel == "ddp" and not last:
            return self.train_model.no_sync()
        return contextlib.nullcontext()

    def _any_rank_stopped(self) -> bool:
        """Whether any rank got Ctrl-C/SIGTERM: all ranks must stop at the same micro-batch, or collectives hang."""
        if self.dist.world_size > 1:
            flag = distributed.all_reduce_sum([1.0 if self._stop_requested else 0.0], self.device)[0]
            self._stop_requested = flag > 0
        return self._stop_requested

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)


def compile_model(model: nn.Module, backend: str) -> nn.Module:
    """``torch.compile(model, backend=backend)``, after checking that torch knows the backend.

    Raises:
        DeltatuneError: an unknown backend, with the list of known ones.
    """
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise DeltatuneError(f"--compile {backend!r} is not a torch.compile backend; use one of {', '.join(known)}")
    return torch.compile(model, backend=backend)


def _regularization_loss(model: nn.Module) -> torch.Tensor | None:
    """``PeftModel.regularization_loss()``: the trained method's regulariser, or ``None`` (also for a model without
    the hook, a plain ``nn.Module``)."""
    fn = getattr(model, "regularization_loss", None)
    return fn() if callable(fn) else None


def _method_step(model: nn.Module, global_step: int) -> None:
    """``PeftModel.update_and_allocate(global_step)``: the trained method's per-step work after the update (AdaLoRA's
    rank allocation); nothing for a model without the hook."""
    fn = getattr(model, "update_and_allocate", None)
    if callable(fn):
        fn(global_step)


def plan_steps(n_examples: int, max_steps: int | None, epochs: float, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps of a run: ``max_steps``, else ``epochs`` passes of ``ceil(n / batch_size)`` micro-batches."""
    if max_steps:
        return max_steps
    return max(1, math.ceil(epochs * math.ceil(n_examples / batch_size) / grad_accum))


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass (less memory, about a third more compute)."""
    from deltatune.quantization import enable_checkpointing

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not enable_checkpointing(inner, {"use_reentrant": False}):
        raise DeltatuneError(f"{type(inner).__name__} does not support gradient checkpointing")
    if hasattr(inner, "config"):
        inner.config.use_cache = False
