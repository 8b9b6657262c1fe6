"""Virtual-token training-step benchmark: deltatune vs ``peft`` vs the frozen-model floor, on SmolLM2-135M.

What is measured
----------------
For each *method* (prompt tuning, P-tuning with its MLP, prefix tuning, multitask prompt tuning; 20
virtual tokens each) three *variants* of the same fp32 SmolLM2-135M model train on one fixed batch of
``batch_size x seq_len`` random token ids (causal-LM loss, labels = inputs):

* ``floor``     -- the frozen model, no adapter: ``inputs_embeds = embed(ids).detach().requires_grad_()`` and
                   ``loss.backward()``, the cost of back-propagating through the frozen net to its inputs,
                   which every virtual-token method pays (its gradient reaches the first layer).
* ``peft``      -- ``peft.get_peft_model`` with the method's config, on its own deep copy of the base model.
* ``deltatune`` -- the same config through ``deltatune.get_peft_model``, on another deep copy; its encoder
                   starts from a copy of peft's encoder weights, so both compute the same first loss (checked).

An adapter step is ``forward + loss + backward + AdamW.step + zero_grad``; a floor step is
``forward + loss + backward``. Timing and memory follow ``bench/lora_train.py``: steps of the three variants
are interleaved in a rotating order (other processes share the CPUs), the table reports medians; each
variant's peak memory is the RSS high-water mark of a fresh child process minus the loaded base model.

Usage
-----
::

    python bench/prompt_train.py                         # all methods, ~5 min on 2 quiet cores
    python bench/prompt_train.py --methods prefix,mpt --rounds 3 --no-memory
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/lora_train.py: spinning threads on a shared CPU

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

VARIANTS = ("floor", "peft", "deltatune")
# method -> (config class name, shared by both libraries; kwargs; label)
METHODS: dict[str, tuple[str, dict, str]] = {
    "prompt": ("PromptTuningConfig", {}, "prompt tuning"),
    "ptuning": ("PromptEncoderConfig", {"encoder_hidden_size": 128}, "P-tuning (MLP 128)"),
    "prefix": ("PrefixTuningConfig", {}, "prefix tuning"),
    "mpt": ("MultitaskPromptTuningConfig", {"num_tasks": 2}, "multitask prompt tuning"),
}
COMMON = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 20}
MODEL_NAME = "smollm2-135m"


def load_base_model() -> nn.Module:
    from deltatune.builtin.models import load_builtin_model

    model, _tokenizer = load_builtin_model(MODEL_NAME, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_batch(model: nn.Module, batch_size: int, seq_len: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=gen)


@dataclass
class Variant:
    name: str
    model: nn.Module
    step: Callable[[], float]
    n_trainable: int
    times: list[float] = field(default_factory=list)


def _peft_model(method: str, base: nn.Module) -> nn.Module:
    import peft

    cls, kwargs, _ = METHODS[method]
    return peft.get_peft_model(base, getattr(peft, cls)(**COMMON, **kwargs))


def build_variant(name: str, base: nn.Module, method: str, ids: torch.Tensor, copy_base: bool,
                  peft_encoder: nn.Module | None = None) -> Variant:
    """``name`` for ``method``; ``peft_encoder`` (peft's prompt encoder) seeds deltatune's weights."""
    if name == "floor":
        embed = base.get_input_embeddings()

        def floor_step() -> float:
            embeds = embed(ids).detach().requires_grad_()
            loss = base(inputs_embeds=embeds, labels=ids, use_cache=False).loss
            loss.backward()
            return loss.item()

        return Variant(name, base, floor_step, n_trainable=0)

    model = copy.deepcopy(base) if copy_base else base
    if name == "peft":
        model = _peft_model(method, model)
    elif name == "deltatune":
        import deltatune

        cls, kwargs, _ = METHODS[method]
        model = deltatune.get_peft_model(model, getattr(deltatune, cls)(**COMMON, **kwargs))
        if peft_encoder is not None:  # same starting point as peft (the module names are the same)
            model.prompt_encoder["default"].load_state_dict(peft_encoder.state_dict())
    else:
        raise ValueError(f"unknown variant {name!r}; expected one of {VARIANTS}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    extra = {"task_ids": torch.zeros(ids.shape[0], dtype=torch.long)} if method == "mpt" else {}

    def adapter_step() -> float:
        loss = model(input_ids=ids, labels=ids, use_cache=False, **extra).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return Variant(name, model, adapter_step, n_trainable=sum(p.numel() for p in params))


@torch.no_grad()
def initial_loss(v: Variant, ids: torch.Tensor, method: str) -> float:
    extra = {"task_ids": torch.zeros(ids.shape[0], dtype=torch.long)} if method == "mpt" else {}
    v.model.eval()
    loss = v.model(input_ids=ids, labels=ids, use_cache=False, **extra).loss.item()
    v.model.train()
    return loss


def time_method(base: nn.Module, method: str, ids: torch.Tensor, args: argparse.Namespace) -> dict:
    floor = build_variant("floor", base, method, ids, copy_base=False)
    peft_v = build_variant("peft", base, method, ids, copy_base=True)
    ours = build_variant("deltatune", base, method, ids, copy_base=True,
                         peft_encoder=peft_v.model.prompt_encoder["default"])
    variants = [floor, peft_v, ours]
    if peft_v.n_trainable != ours.n_trainable:
        raise RuntimeError(f"[{method}] trainable parameters differ: peft {peft_v.n_trainable:,} vs deltatune "
                           f"{ours.n_trainable:,}; the comparison would be unfair")
    losses = {v.name: initial_loss(v, ids, method) for v in (peft_v, ours)}
    if abs(losses["peft"] - losses["deltatune"]) > 1e-3:
        raise RuntimeError(f"[{method}] initial losses differ ({losses}); the variants are not the same model")
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
                elapsed = time.perf_counter() - t0
                v.times.append(elapsed)
                round_times.setdefault(v.name, []).append(elapsed)
        per_round.append({k: statistics.median(t) for k, t in round_times.items()})
        print(f"  [{method}] round {r + 1}/{args.rounds}: "
              + ", ".join(f"{k} {1e3 * t:.0f} ms" for k, t in per_round[-1].items()), flush=True)
    med = {v.name: statistics.median(v.times) for v in variants}
    result = {
        "method": method, "label": METHODS[method][2], "n_trainable": ours.n_trainable, "initial_loss": losses,
        "median_s": med, "times_s": {v.name: v.times for v in variants},
        "ratio": {"peft/floor": med["peft"] / med["floor"], "deltatune/floor": med["deltatune"] / med["floor"],
                  "deltatune/peft": med["deltatune"] / med["peft"]},
        "deltatune/peft_per_round": [rt["deltatune"] / rt["peft"] for rt in per_round],
    }
    del variants, floor, peft_v, ours
    gc.collect()
    return result


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not found in /proc/self/status (peak-memory measurement needs Linux)")


def measure_memory_child(args: argparse.Namespace) -> None:
    base = load_base_model()
    ids = make_batch(base, args.batch_size, args.seq_len)
    with torch.no_grad():
        for p in base.parameters():
            p.sum()
    gc.collect()
    baseline_kb = _proc_status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    v = build_variant(args.measure_memory, base, args.method, ids, copy_base=False)
    for _ in range(max(args.steps, 3)):
        v.step()
    peak_kb = _proc_status_kb("VmHWM")
    print(json.dumps({"variant": v.name, "method": args.method, "peak_delta_mb": (peak_kb - baseline_kb) / 1024}))


def measure_memory(variant: str, method: str, args: argparse.Namespace) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--measure-memory", variant, "--method", method,
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {variant}/{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_delta_mb"]


def markdown(results: list[dict], memory: dict | None, command: str, args: argparse.Namespace) -> str:
    lines = [
        (f"SmolLM2-135M, fp32, CPU ({args.threads} threads), batch {args.batch_size} x {args.seq_len} tokens, "
         f"{COMMON['num_virtual_tokens']} virtual tokens; median of {args.rounds} x {args.steps} interleaved steps."),
        "",
        "| method | trainable | floor | peft | deltatune | peft/floor | deltatune/floor | deltatune/peft |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m, q = r["median_s"], r["ratio"]
        lines.append(f"| {r['label']} | {r['n_trainable']:,} | {1e3 * m['floor']:.0f} ms | {1e3 * m['peft']:.0f} ms"
                     f" | {1e3 * m['deltatune']:.0f} ms | {q['peft/floor']:.2f}x | {q['deltatune/floor']:.2f}x"
                     f" | {q['deltatune/peft']:.2f}x |")
    if memory:
        lines += ["", "Peak memory: RSS high-water mark of a fresh process per variant, minus the loaded base model.",
                  "", "| method | floor | peft | deltatune | deltatune/peft |", "|---|---:|---:|---:|---:|"]
        for r in results:
            mm = memory[r["method"]]
            lines.append(f"| {r['label']} | {mm['floor']:.0f} MiB | {mm['peft']:.0f} MiB | {mm['deltatune']:.0f} MiB"
                         f" | {mm['deltatune'] / mm['peft']:.2f}x |")
    lines += ["", f"Reproduce: `{command}`"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=1, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds per method")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before timing")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory child processes")
    p.add_argument("--json", default=None, help="also write all numbers to this JSON file")
    p.add_argument("--measure-memory", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--method", default="prompt", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.method_list + [args.method] if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.measure_memory:
        measure_memory_child(args)
        return
    command = "python bench/prompt_train.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    t_start = time.perf_counter()
    base = load_base_model()
    ids = make_batch(base, args.batch_size, args.seq_len)
    results = []
    for method in args.method_list:
        print(f"timing {method} ({METHODS[method][2]})", flush=True)
        results.append(time_method(base, method, ids, args))
    memory = None
    if not args.no_memory:
        print("peak memory (one child process per variant)", flush=True)
        floor_mb = measure_memory("floor", args.method_list[0], args)
        memory = {m: {"floor": floor_mb, **{v: measure_memory(v, m, args) for v in ("peft", "deltatune")}}
                  for m in args.method_list}
    table = markdown(results, memory, command, args)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s\n\n{table}")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"command": command, "results": results, "peak_memory_mib": memory, "table": table}, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
