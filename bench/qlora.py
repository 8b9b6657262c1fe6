"""QLoRA benchmark on SmolLM2-135M (CPU): memory of the base, step time against peft, peak memory, quality.

What is measured (all in one run; ratios are what to read, the machine is shared)
-------------------------------------------------------------------------------
1. **Base weight bytes**: ``deltatune.quantization.weight_bytes`` of the model in NF4 with double
   quantisation (every linear layer of the 30 decoder blocks) against the same model in fp32. Everything
   the model holds is counted: embeddings, the output head (tied to them in SmolLM2, so counted once),
   norms, and the quantisation statistics (absmax, nested absmax, codebooks).
2. **Step time**: LoRA r=16, alpha 32, dropout 0, ``target_modules="all-linear"`` (210 layers), batch
   ``4 x 128`` random token ids, causal-LM loss; a step is ``forward + backward + AdamW.step + zero_grad``.
   Four variants live in one process and their steps are interleaved, in an order that rotates each round:
   deltatune and ``peft`` + bitsandbytes on the same NF4 base (``deltatune.quantize``: peft sees
   ``is_loaded_in_4bit`` and wraps the ``Linear4bit`` layers with its bnb LoRA layers), and deltatune and
   ``peft`` on the fp32 base. We report medians and the ratios of medians, plus the per-round
   ``deltatune/peft`` QLoRA ratios as median (min-max), a direct read of the noise.
3. **Peak memory and quality of a whole run**: one fresh child process per variant (fp32 LoRA, QLoRA) loads
   the model (QLoRA: quantises it, layer by layer), trains ``--train-steps`` steps on BBC News articles
   (train split, 128-token blocks, AdamW lr 1e-3, seed 0) and evaluates the loss on held-out blocks (test
   split) before and after. Peak memory is the process's ``VmHWM`` (peak RSS) over the whole run,
   loading included, and also over the training steps alone above the loaded model (``clear_refs`` resets
   the high-water mark after loading).

Usage::

    python bench/qlora.py                      # ~10 min on 2 loaded cores
    python bench/qlora.py --rounds 3 --train-steps 10 --json /tmp/qlora.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/lora_train.py: spinning threads on shared cores

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

MODEL_NAME = "smollm2-135m"
LORA_KWARGS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear",
               "task_type": "CAUSAL_LM"}
VARIANTS = ("deltatune-qlora", "peft-qlora", "deltatune-fp32", "peft-fp32")


def load_base() -> tuple[nn.Module, object]:
    from deltatune.builtin.models import load_builtin_model

    model, tokenizer = load_builtin_model(MODEL_NAME, dtype=torch.float32)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def quantized(model: nn.Module) -> nn.Module:
    from deltatune.quantization import quantize

    return quantize(model, "nf4", double_quant=True)


def with_lora(library: str, model: nn.Module) -> nn.Module:
    if library == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**LORA_KWARGS))
    else:
        import deltatune

        model = deltatune.get_peft_model(model, deltatune.LoraConfig(**LORA_KWARGS))
    model.train()
    return model


def make_step(model: nn.Module, ids: torch.Tensor, lr: float = 1e-4):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)

    def step(batch: torch.Tensor = ids) -> float:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, sum(p.numel() for p in params)


# ---- 1 + 2: bytes and interleaved step times (this process) ------------------------------------------------
def bytes_and_times(args: argparse.Namespace) -> dict:
    from deltatune.quantization import weight_bytes

    base, _ = load_base()
    fp32_bytes = weight_bytes(base)
    nf4_bytes = weight_bytes(quantized(copy.deepcopy(base)))
    ids = torch.randint(0, base.config.vocab_size, (args.batch_size, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    steps, counts = {}, {}
    for name in VARIANTS:
        library, kind = name.split("-")
        model = copy.deepcopy(base)
        model = quantized(model) if kind == "qlora" else model
        torch.manual_seed(0)
        steps[name], counts[name] = make_step(with_lora(library, model), ids)
    if len(set(counts.values())) != 1:
        raise SystemExit(f"the variants train different parameter counts: {counts}")
    first = {name: steps[name]() for name in VARIANTS}  # warm-up step; B = 0 so all start at the base's loss
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    per_round = []
    for r in range(args.rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        this = {}
        for name in order:
            t0 = time.perf_counter()
            steps[name]()
            this[name] = time.perf_counter() - t0
            times[name].append(this[name])
        per_round.append(this["deltatune-qlora"] / this["peft-qlora"])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {this[n]:.2f}s" for n in VARIANTS), flush=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"fp32_bytes": fp32_bytes, "nf4_bytes": nf4_bytes, "bytes_ratio": nf4_bytes / fp32_bytes,
            "first_loss": first, "trainable": counts["deltatune-qlora"], "median_step_s": med,
            "dt_over_peft_qlora": med["deltatune-qlora"] / med["peft-qlora"],
            "peft_qlora_over_fp32": med["peft-qlora"] / med["peft-fp32"],
            "dt_qlora_over_fp32": med["deltatune-qlora"] / med["deltatune-fp32"],
            "dt_over_peft_fp32": med["deltatune-fp32"] / med["peft-fp32"],
            "per_round_dt_over_peft_qlora": [min(per_round), statistics.median(per_round), max(per_round)]}


# ---- 3: one whole training run per child process -----------------------------------------------------------
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def blocks(tokenizer, split: str, n: int, seq_len: int) -> torch.Tensor:
    """``(n, seq_len)`` token blocks cut from the concatenated BBC News articles of ``split``."""
    from deltatune.builtin.datasets import load_bbc_news

    stream: list[int] = []
    for record in load_bbc_news(split):
        stream += tokenizer(record["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= n * seq_len:
            break
    return torch.tensor(stream[:n * seq_len]).view(n, seq_len)


def held_out_loss(model: nn.Module, data: torch.Tensor, batch_size: int) -> float:
    from deltatune.quantization import exact_4bit_kernels

    model.eval()
    total = 0.0
    with torch.no_grad(), exact_4bit_kernels(model):  # the training-time fp32 path, no bf16 repacking
        for i in range(0, len(data), batch_size):
            batch = data[i:i + batch_size]
            total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
    model.train()
    return total / len(data)


def run_child(args: argparse.Namespace) -> None:
    kind = args.child
    model, tokenizer = load_base()
    if kind == "qlora":
        model = quantized(model)
    train = blocks(tokenizer, "train", args.train_steps * args.batch_size, args.seq_len)
    test = blocks(tokenizer, "test", args.eval_blocks, args.seq_len)
    torch.manual_seed(0)
    model = with_lora("deltatune", model)
    step, _ = make_step(model, train[:args.batch_size], lr=1e-3)
    before = held_out_loss(model, test, args.batch_size)
    loaded_kb = _status_kb("VmRSS")
    load_peak_kb = _status_kb("VmHWM")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the high-water mark: what follows is the training alone
    t0 = time.perf_counter()
    for s in range(args.train_steps):
        step(train[s * args.batch_size:(s + 1) * args.batch_size])
    train_s = time.perf_counter() - t0
    train_peak_kb = _status_kb("VmHWM")
    after = held_out_loss(model, test, args.batch_size)
    print(json.dumps({"kind": kind, "loss_before": before, "loss_after": after, "train_s": train_s,
                      "peak_mib": max(load_peak_kb, train_peak_kb) / 1024,
                      "train_peak_above_loaded_mib": (train_peak_kb - loaded_kb) / 1024}))


def child(kind: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--train-steps", str(args.train_steps), "--batch-size",
           str(args.batch_size), "--seq-len", str(args.seq_len), "--eval-blocks", str(args.eval_blocks),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def markdown(t: dict, runs: dict | None, command: str) -> str:
    mib = 1024 * 1024
    lines = [
        f"`{command}`", "",
        "| measure | value |", "|---|---:|",
        f"| base weights, NF4 + double quant / fp32 (embeddings and head counted) | {t['nf4_bytes'] / mib:.0f} MiB / "
        f"{t['fp32_bytes'] / mib:.0f} MiB = **{t['bytes_ratio']:.3f}x** |",
        f"| step time, deltatune QLoRA / peft QLoRA (same NF4 base) | **{t['dt_over_peft_qlora']:.2f}x** "
        f"(per round {t['per_round_dt_over_peft_qlora'][1]:.2f}, "
        f"{t['per_round_dt_over_peft_qlora'][0]:.2f}-{t['per_round_dt_over_peft_qlora'][2]:.2f}) |",
        f"| step time, peft QLoRA / peft fp32 LoRA | {t['peft_qlora_over_fp32']:.2f}x |",
        f"| step time, deltatune QLoRA / deltatune fp32 LoRA | {t['dt_qlora_over_fp32']:.2f}x |",
        f"| step time, deltatune fp32 LoRA / peft fp32 LoRA | {t['dt_over_peft_fp32']:.2f}x |",
    ]
    if runs:
        q, f = runs["qlora"], runs["fp32"]
        lines += [
            f"| peak memory of the whole run (RSS, loading included), QLoRA / fp32 LoRA | {q['peak_mib']:.0f} / "
            f"{f['peak_mib']:.0f} MiB = **{q['peak_mib'] / f['peak_mib']:.2f}x** |",
            f"| peak memory of the training steps above the loaded model, QLoRA / fp32 LoRA | "
            f"{q['train_peak_above_loaded_mib']:.0f} / {f['train_peak_above_loaded_mib']:.0f} MiB |",
            f"| held-out loss before -> after, fp32 LoRA | {f['loss_before']:.4f} -> {f['loss_after']:.4f} |",
            f"| held-out loss before -> after, QLoRA | {q['loss_before']:.4f} -> {q['loss_after']:.4f} |",
            f"| quality cost: held-out loss after, QLoRA - fp32 LoRA | **{q['loss_after'] - f['loss_after']:+.4f}** "
            "nats/token |",
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6, help="timed interleaved rounds (one step per variant each)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--train-steps", type=int, default=20, help="steps of each whole training run")
    p.add_argument("--eval-blocks", type=int, default=32, help="held-out 128-token blocks")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-runs", action="store_true", help="skip the whole-run children (memory, quality)")
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument("--child", choices=["qlora", "fp32"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        run_child(args)
        return
    timing = bytes_and_times(args)
    runs = None if args.no_runs else {kind: child(kind, args) for kind in ("fp32", "qlora")}
    command = "python bench/qlora.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(markdown(timing, runs, command.strip()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"timing": timing, "runs": runs}, fh, indent=2)


if __name__ == "__main__":
    main()
