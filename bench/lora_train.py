"""LoRA training-step benchmark: deltatune vs ``peft`` vs the frozen-model floor, on SmolLM2-135M.

What is measured
----------------
For each *case* (LoRA with ``lora_dropout=0``, LoRA with ``lora_dropout=0.05``, DoRA with
``lora_dropout=0``) three *variants* of the same fp32 SmolLM2-135M model train on one fixed batch of
``batch_size x seq_len`` random token ids (causal-LM loss, labels = inputs):

* ``floor``     -- the frozen model, no adapter. ``inputs_embeds = embed(ids).detach().requires_grad_()``
                   and ``loss.backward()``: the unavoidable cost of back-propagating through the frozen net
                   down to its inputs, which every adapter placed in the first layer has to pay anyway.
* ``peft``      -- ``peft.get_peft_model`` with ``LoraConfig(target_modules="all-linear", r=16,
                   lora_alpha=32, ...)`` on its own deep copy of the base model.
* ``deltatune`` -- the same config through ``deltatune.get_peft_model``, on another deep copy.

An adapter step is ``forward + loss + backward + AdamW.step + zero_grad`` (``--adamw fused``, the default, is
the kernel deltatune's trainer uses; ``--adamw foreach`` is torch's default); a floor step is
``forward + loss + backward``. Both adapters target the same 210 linear layers (7 per decoder block,
``lm_head`` excluded by ``"all-linear"``); the script checks that they have the same number of trainable
parameters and the same initial loss as the floor (``B = 0`` makes every adapter start as the identity).

Timing: interleaved, median of per-step wall times
-------------------------------------------------
Other processes share this machine's CPUs, so absolute step times drift. To keep the *ratios* honest
all variants of a case live in one process and their steps are interleaved: after ``--warmup`` untimed
steps each, ``--rounds`` rounds run ``--steps`` timed steps of every variant, in an order that rotates
each round (``floor, peft, deltatune`` -> ``peft, deltatune, floor`` -> ...), so a slow period hits every
variant alike. With the default ``--steps 1`` one round takes a few seconds, shorter than most bursts
of load from other processes. We report the median step time per variant and the ratios of the
medians; the last column gives the per-round ``deltatune/peft`` ratios (each from steps seconds apart)
as median (min-max) -- a direct read of how much noise there was.

``torch.set_num_threads(2)`` (``--threads``): the reference machine has 2 cores; fixing the intra-op
thread count makes runs comparable between machines and between the parent and its children.
``--omp-wait-policy`` (``torch``, ``passive``, ``active``) sets OpenMP's wait policy before torch loads; the
default leaves libgomp's own (spin briefly, then sleep), as a user's training run has it. With ``passive``
every parallel region pays a thread wake-up, which adds ~0.1 ms to each of an adapter's small matmuls (see
the comment at the top); use it on a machine shared with other jobs, where spinning threads starve.

Peak memory: one child process per variant
------------------------------------------
Peak RSS is process-wide and only grows, so measuring three variants in one process would just report
the largest. Each variant's peak is measured in a fresh child (``--measure-memory VARIANT``) that:
loads the model, touches every parameter (so the weights are resident), records its RSS as the
baseline, resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0, so the
model-loading peak is forgotten), then builds the variant and runs ``max(steps, 3)`` training steps
(AdamW's state exists from the second step on). It reports ``VmHWM - baseline``: everything the variant
adds on top of the loaded base model -- adapter weights, their gradients and optimizer state, and the
activations saved for backward -- as the operating system sees it (glibc heap retention included, the
same for every variant). The floor does not depend on the case, so it is measured once.

Usage
-----
::

    python bench/lora_train.py                      # all cases, defaults, ~6 min on 2 quiet cores
    python bench/lora_train.py --cases lora0,dora --rounds 3 --json /tmp/bench.json
    python bench/lora_train.py --no-memory          # timing only

It prints two markdown tables (time, memory) and the command line that reproduces them.
"""

from __future__ import annotations

import os
import sys

# OpenMP's wait policy is read once, when torch loads libgomp, so ``--omp-wait-policy`` is applied here, before
# the import. ``torch`` (the default) leaves libgomp's own policy -- idle threads spin a little, then sleep --
# which is what a user of deltatune or peft gets. ``passive`` (sleep at once) keeps runs on a CPU shared with
# other processes from starving each other (spinning 2-thread pools made steps 5-10x slower there), but every
# parallel region then pays a thread wake-up (~0.1 ms here), which penalises the many small matmuls of an
# adapter far more than the floor's few large ones. ``active`` spins always.
WAIT_POLICIES = {"torch": None, "passive": "PASSIVE", "active": "ACTIVE"}


def _apply_wait_policy(argv: list[str]) -> None:
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--omp-wait-policy=") else (
            argv[i + 1] if arg == "--omp-wait-policy" and i + 1 < len(argv) else None)
        if value in WAIT_POLICIES:  # anything else is left for argparse to reject
            if WAIT_POLICIES[value] is None:
                os.environ.pop("OMP_WAIT_POLICY", None)
            else:
                os.environ["OMP_WAIT_POLICY"] = WAIT_POLICIES[value]


_apply_wait_policy(sys.argv[1:])

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

VARIANTS = ("floor", "peft", "deltatune")
# case name -> (LoraConfig kwargs, label for the table)
CASES: dict[str, tuple[dict, str]] = {
    "lora0": ({"lora_dropout": 0.0, "use_dora": False}, "LoRA, dropout 0"),
    "lora05": ({"lora_dropout": 0.05, "use_dora": False}, "LoRA, dropout 0.05"),
    "dora": ({"lora_dropout": 0.0, "use_dora": True}, "DoRA, dropout 0"),
}
LORA_KWARGS = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
# --model: the built-in SmolLM2-135M (real weights), or a Llama built from a config with random weights:
# ``llama-1b`` is TinyLlama's shape (1.1B parameters; the GPU case, run it with --device cuda --dtype bf16),
# ``llama-tiny`` a few layers wide enough to exercise every path in seconds (the smoke test's).
CONFIG_MODELS = {
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
                 "num_key_value_heads": 4, "vocab_size": 32000},
    "llama-tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "vocab_size": 256},
}
MODELS = ("smollm2-135m", *CONFIG_MODELS)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------
# model and variants
# ------------------------------------------------------------------------------------------------
def load_base_model(name: str = "smollm2-135m", device: str = "cpu", dtype: str = "fp32") -> nn.Module:
    """The frozen base model in train mode: SmolLM2-135M through deltatune's built-in loader (a cached conversion
    of the GGUF), or a Llama of :data:`CONFIG_MODELS` with seeded random weights, on ``device`` in ``dtype``."""
    if name in CONFIG_MODELS:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**CONFIG_MODELS[name])).to(DTYPES[dtype])
    else:
        from deltatune.builtin.models import load_builtin_model

        model, _tokenizer = load_builtin_model(name, dtype=DTYPES[dtype])
        model.to(device)
    model.config.use_cache = False
    model.train()  # dropout layers (the adapters' lora_dropout) must be active, as in training
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_batch(model: nn.Module, batch_size: int, seq_len: int) -> torch.Tensor:
    """Fixed random token ids ``(batch_size, seq_len)`` on the model's device; the content does not change the
    cost."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=gen)
    return ids.to(model.get_input_embeddings().weight.device)


@dataclass
class Variant:
    """One model being trained and the function that runs one training step on it."""

    name: str
    model: nn.Module
    step: Callable[[], float]  # returns the loss
    n_trainable: int
    times: list[float] = field(default_factory=list)


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``bf16``: the forward and loss under bf16 autocast, through the trainer's own helper, as ``deltatune
    train``'s default on GPUs with bf16 and CPUs with AVX512-BF16 or AMX (``--precision auto``); ``fp32``: none."""
    from deltatune.training.metrics import autocast

    return autocast(device, torch.bfloat16 if precision == "bf16" else None)


def build_variant(name: str, base: nn.Module, case: str, ids: torch.Tensor, copy_base: bool,
                  adamw: str = "fused", precision: str = "fp32") -> Variant:
    """Build ``name`` (floor / peft / deltatune) for ``case`` on ``base`` (deep-copied if ``copy_base``)."""
    if name == "floor":
        model = base
        embed = model.get_input_embeddings()

        def floor_step() -> float:
            # Gradient w.r.t. the input embeddings only: backprop through every frozen layer.
            embeds = embed(ids).detach().requires_grad_()
            with precision_context(precision, ids.device):
                loss = model(inputs_embeds=embeds, labels=ids, use_cache=False).loss
            loss.backward()
            return loss.item()

        return Variant(name, model, floor_step, n_trainable=0)

    case_kwargs = CASES[case][0]
    model = copy.deepcopy(base) if copy_base else base
    if name == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**LORA_KWARGS, **case_kwargs))
    elif name == "deltatune":
        import deltatune

        model = deltatune.get_peft_model(model, deltatune.LoraConfig(**LORA_KWARGS, **case_kwargs))
    else:
        raise ValueError(f"unknown variant {name!r}; expected one of {VARIANTS}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, **{adamw: True})  # fused: what deltatune's trainer uses

    def adapter_step() -> float:
        with precision_context(precision, ids.device):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return Variant(name, model, adapter_step, n_trainable=sum(p.numel() for p in params))


def arithmetic_bound(model: nn.Module, seq_len: int, r: int) -> dict:
    """Multiply-adds per token of a floor step and of LoRA's extra work, counted from the model's shapes.

    Floor: forward + input gradient of every ``nn.Linear`` (the adapted ones and ``lm_head``), ``2 · in · out``
    each, plus attention's score and value products (``2 · heads · seq_len · head_dim`` forward, twice that
    backward, counting the full square although causal attention can skip half, which only raises the floor and
    so lowers the bound). LoRA, per adapted layer: ``r · (in + out)`` forward (``A x``, ``B h``) and
    ``2 r (in + out)`` backward (``B``'s and ``A``'s gradients, ``g B``, ``(g B) A``).
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = model.get_output_embeddings()
    adapted = [m for m in linears if m is not head]
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = cfg.num_hidden_layers * 3 * 2 * cfg.num_attention_heads * seq_len * head_dim
    floor = 2 * sum(m.in_features * m.out_features for m in linears) + attention
    lora = 3 * r * sum(m.in_features + m.out_features for m in adapted)
    return {"floor": floor / 1e6, "lora": lora / 1e6, "ratio": 1 + lora / floor, "r": r}


@torch.no_grad()
def initial_loss(v: Variant, ids: torch.Tensor) -> float:
    """Eval-mode loss before any step: equal for all variants because LoRA/DoRA start as identities."""
    v.model.eval()
    loss = v.model(input_ids=ids, labels=ids, use_cache=False).loss.item()
    v.model.train()
    return loss


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def time_case(base: nn.Module, case: str, ids: torch.Tensor, args: argparse.Namespace) -> dict:
    """Interleaved timing of the three variants for one case; returns medians, ratios and spread."""
    variants = [build_variant(n, base, case, ids, copy_base=True, adamw=args.adamw, precision=args.precision)
                for n in VARIANTS]
    by_name = {v.name: v for v in variants}
    if by_name["peft"].n_trainable != by_name["deltatune"].n_trainable:
        raise RuntimeError(f"[{case}] trainable parameters differ: peft {by_name['peft'].n_trainable:,} vs "
                           f"deltatune {by_name['deltatune'].n_trainable:,}; the comparison would be unfair")
    losses = {v.name: initial_loss(v, ids) for v in variants}
    tolerance = 1e-3 if args.dtype == "fp32" else 2e-3 * max(abs(v) for v in losses.values())  # bf16 rounding
    if max(losses.values()) - min(losses.values()) > tolerance:
        raise RuntimeError(f"[{case}] initial losses differ ({losses}); the variants are not the same model")

    for v in variants:
        for _ in range(args.warmup):
            v.step()
    per_round: list[dict[str, float]] = []
    for r in range(args.rounds):
        order = variants[r % 3:] + variants[:r % 3]
        round_times: dict[str, list[float]] = {}
        for v in order:
            for _ in range(args.steps):
                t0 = time.perf_counter()
                v.step()
                dt = time.perf_counter() - t0
                v.times.append(dt)
                round_times.setdefault(v.name, []).append(dt)
        per_round.append({k: statistics.median(t) for k, t in round_times.items()})
        print(f"  [{case}] round {r + 1}/{args.rounds}: "
              + ", ".join(f"{k} {1e3 * t:.0f} ms" for k, t in per_round[-1].items()), flush=True)

    med = {v.name: statistics.median(v.times) for v in variants}
    round_ratio = [rt["deltatune"] / rt["peft"] for rt in per_round]
    round_floor = [rt["deltatune"] / rt["floor"] for rt in per_round]
    result = {
        "case": case,
        "label": CASES[case][1],
        "n_trainable": by_name["peft"].n_trainable,
        "initial_loss": losses,
        "median_s": med,
        "times_s": {v.name: v.times for v in variants},
        "ratio": {
            "peft/floor": med["peft"] / med["floor"],
            "deltatune/floor": med["deltatune"] / med["floor"],
            "deltatune/peft": med["deltatune"] / med["peft"],
        },
        "deltatune/peft_per_round": round_ratio,
        "deltatune/floor_per_round": round_floor,
    }
    del variants, by_name
    gc.collect()
    return result


# ------------------------------------------------------------------------------------------------
# memory (one child process per variant)
# ------------------------------------------------------------------------------------------------
def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not found in /proc/self/status (peak-memory measurement needs Linux)")


def measure_memory_child(args: argparse.Namespace) -> None:
    """Child process: print one JSON line with the peak memory the variant adds over the loaded model (RSS on
    CPU, ``torch.cuda.max_memory_allocated`` on CUDA)."""
    base = load_base_model(args.model, args.device, args.dtype)
    ids = make_batch(base, args.batch_size, args.seq_len)
    cuda = ids.device.type == "cuda"
    with torch.no_grad():  # make every weight resident so it is part of the baseline, not the delta
        for p in base.parameters():
            p.sum()
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline_kb = torch.cuda.memory_allocated() / 1024
    else:
        baseline_kb = _proc_status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
                f.write("5")
        except OSError as e:  # some sandboxes forbid it: the peak then includes loading the model
            print(f"warning: cannot reset the peak RSS ({e}); the peak includes loading the model", file=sys.stderr)
    v = build_variant(args.measure_memory, base, args.case, ids, copy_base=False,
                      adamw=args.adamw, precision=args.precision)
    for _ in range(max(args.steps, 3)):
        v.step()
    peak_kb = torch.cuda.max_memory_allocated() / 1024 if cuda else _proc_status_kb("VmHWM")
    print(json.dumps({"variant": v.name, "case": args.case, "baseline_mb": baseline_kb / 1024,
                      "peak_delta_mb": (peak_kb - baseline_kb) / 1024}))


def measure_memory(variant: str, case: str, args: argparse.Namespace) -> float:
    """Run a ``--measure-memory`` child and return its peak memory delta in MiB."""
    cmd = [sys.executable, os.path.abspath(__file__), "--measure-memory", variant, "--case", case,
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
           "--threads", str(args.threads), "--adamw", args.adamw, "--precision", args.precision,
           "--model", args.model, "--device", args.device, "--dtype", args.dtype]
    # (the OpenMP wait policy is inherited through the environment)
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {variant}/{case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_delta_mb"]


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def markdown(results: list[dict], memory: dict[str, dict[str, float]] | None, command: str,
             args: argparse.Namespace, bound: dict | None = None) -> str:
    lines = [
        (f"{args.model}, {args.dtype} weights{', bf16 autocast' if args.precision == 'bf16' else ''}, "
         f"{args.device}{f' ({args.threads} threads)' if args.device == 'cpu' else ''}, "
         f"batch {args.batch_size} x {args.seq_len} tokens, "
         f"LoRA r=16 alpha=32 on all linear layers, AdamW {args.adamw}; median of {args.rounds} x {args.steps} "
         "interleaved steps per variant."),
        "",
        "| case | floor | peft | deltatune | peft/floor | deltatune/floor | deltatune/peft | dt/floor per round"
        " | dt/peft per round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    spread = lambda xs: f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"  # noqa: E731
    for r in results:
        m, q = r["median_s"], r["ratio"]
        lines.append(
            f"| {r['label']} | {1e3 * m['floor']:.0f} ms | {1e3 * m['peft']:.0f} ms | {1e3 * m['deltatune']:.0f} ms"
            f" | {q['peft/floor']:.2f}x | {q['deltatune/floor']:.2f}x | {q['deltatune/peft']:.2f}x"
            f" | {spread(r['deltatune/floor_per_round'])} | {spread(r['deltatune/peft_per_round'])} |")
    if bound:
        lines += ["", ("Arithmetic lower bound of unmerged LoRA (any implementation): the floor does "
                       f"{bound['floor']:.1f}M multiply-adds per token (forward and input gradient of the linear "
                       f"layers, lm_head and attention), LoRA r={bound['r']} adds 3 r (in + out) per adapted layer = "
                       f"{bound['lora']:.2f}M, so deltatune/floor >= {bound['ratio']:.3f}x even if its thin "
                       "matmuls ran as efficiently as the floor's square ones.")]
    if memory:
        lines += [
            "",
            ("Peak memory: RSS high-water mark (CPU) or peak allocated CUDA memory of a fresh process per variant, "
             "minus the loaded base model."),
            "",
            "| case | floor | peft | deltatune | deltatune/peft | deltatune/floor |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in results:
            mm = memory[r["case"]]
            lines.append(f"| {r['label']} | {mm['floor']:.0f} MiB | {mm['peft']:.0f} MiB | {mm['deltatune']:.0f} MiB"
                         f" | {mm['deltatune'] / mm['peft']:.2f}x | {mm['deltatune'] / mm['floor']:.2f}x |")
    lines += ["", f"Reproduce: `{command}`"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=1, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds per case")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--cases", default="lora0,lora05,dora", help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (the reference box has 2 cores)")
    p.add_argument("--adamw", choices=["fused", "foreach"], default="fused",
                   help="AdamW implementation for both adapters (fused: what deltatune's trainer uses)")
    p.add_argument("--model", choices=MODELS, default="smollm2-135m",
                   help="the built-in SmolLM2-135M, or a Llama with random weights built from a config (llama-1b: "
                        "1.1B parameters, for a GPU; llama-tiny: seconds, for a smoke test)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (timings then include a synchronisation per step)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="the base weights' dtype (adapters stay fp32 in both libraries)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="fp32: the issue's setting; bf16: forward and loss under bf16 autocast, what deltatune "
                        "train runs by default on GPUs with bf16 and CPUs with AVX512-BF16/AMX")
    p.add_argument("--omp-wait-policy", choices=list(WAIT_POLICIES), default="torch",
                   help="OpenMP wait policy, set before torch loads (torch: libgomp's default, what users get; "
                        "passive: for a CPU shared with other jobs). An exported OMP_WAIT_POLICY is kept "
                        "unless this flag is given")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory child processes")
    p.add_argument("--json", default=None, help="also write all numbers (every step time) to this JSON file")
    p.add_argument("--measure-memory", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--case", default="lora0", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.case_list = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.case_list + [args.case] if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    if min(args.steps, args.rounds, args.batch_size, args.seq_len, args.threads) < 1 or args.warmup < 0:
        p.error("--steps, --rounds, --batch-size, --seq-len and --threads must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.measure_memory:
        measure_memory_child(args)
        return

    command = "python bench/lora_train.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    import peft
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, {args.threads} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset (libgomp default)')}", flush=True)
    t_start = time.perf_counter()
    base = load_base_model(args.model, args.device, args.dtype)
    ids = make_batch(base, args.batch_size, args.seq_len)

    results = []
    for case in args.case_list:
        print(f"timing {case} ({CASES[case][1]})", flush=True)
        results.append(time_case(base, case, ids, args))

    memory: dict[str, dict[str, float]] | None = None
    if not args.no_memory:
        print("peak memory (one child process per variant)", flush=True)
        floor_mb = measure_memory("floor", args.case_list[0], args)  # the floor does not depend on the case
        memory = {}
        for case in args.case_list:
            memory[case] = {"floor": floor_mb, **{v: measure_memory(v, case, args) for v in ("peft", "deltatune")}}
            print(f"  [{case}] " + ", ".join(f"{k} {mb:.0f} MiB" for k, mb in memory[case].items()), flush=True)

    table = markdown(results, memory, command, args, arithmetic_bound(base, args.seq_len, LORA_KWARGS["r"]))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s\n\n{table}")
    slower = [r["label"] for r in results if r["ratio"]["deltatune/peft"] > 1.0]
    if slower:
        print(f"\nNOTE: deltatune's median step is slower than peft's in: {', '.join(slower)}")
    if args.json:
        payload = {"command": command, "args": {k: v for k, v in vars(args).items() if k != "measure_memory"},
                   "torch": torch.__version__, "results": results, "peak_memory_mib": memory, "table": table}
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, args.json)  # atomic: a crash never leaves a half-written file


if __name__ == "__main__":
    main()
