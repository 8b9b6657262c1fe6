"""Peak memory of a training step: deltatune's trainer vs ``peft`` + a plain PyTorch loop, on SmolLM2-135M.

What is measured
----------------
SmolLM2-135M in fp32 on the CPU, LoRA ``r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"``,
one fixed batch of ``--batch-size x --seq-len`` random token ids (default 8 x 256), every token labelled.
Variants, each in its own fresh child process:

* ``peft-loop``          -- ``peft.get_peft_model`` and the loop everyone writes: ``model(input_ids,
                            attention_mask, labels).loss.backward()``, ``AdamW.step()``, ``zero_grad()``.
                            The model's loss materialises the ``(tokens, vocab)`` logits and their gradient.
* ``deltatune-loop``     -- ``deltatune.get_peft_model``, the same plain loop: the adapter's share alone.
* ``deltatune-trainer``  -- ``deltatune.training.Trainer`` (what ``deltatune train`` runs): the same model and
                            batch, its chunked head + cross-entropy (:mod:`deltatune.training.loss`).
* ``deltatune-trainer-plain-loss`` -- the trainer with ``chunked_loss=False``: the loss's share alone.

Peak memory, robustly on a CPU
------------------------------
Peak RSS is per process and only grows, so each variant runs in a fresh child (``--child VARIANT``) that loads
the model, touches every weight (so they are resident), takes its RSS as the baseline, resets the kernel's
high-water mark (``echo 5 > /proc/self/clear_refs``: the loading peak is forgotten), then builds the variant
and runs ``--steps`` optimizer steps (AdamW's state exists from the first step on). It reports
``VmHWM - baseline``: adapter weights, gradients, optimizer state and the activations of the step, as the
operating system sees them (allocator retention included, alike for every variant). Linux only. Unlike
``torch.profiler`` memory records this also counts memory outside torch's allocator hooks, and it needs
no tracing overhead; the price is one model load per variant.

Usage::

    python bench/trainer_memory.py                         # 8 x 256, ~2 min on 2 idle cores
    python bench/trainer_memory.py --batch-size 4 --seq-len 128 --steps 1
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/lora_train.py: spinning threads on a shared CPU

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

VARIANTS = ("peft-loop", "deltatune-loop", "deltatune-trainer", "deltatune-trainer-plain-loss")
LORA_KWARGS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear",
               "task_type": "CAUSAL_LM"}


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status (this benchmark needs Linux)")


def child(variant: str, args: argparse.Namespace) -> None:
    """Print one JSON line: the variant's peak RSS above the loaded model, and its last loss."""
    from deltatune.builtin.models import load_builtin_model

    model, _ = load_builtin_model("smollm2-135m", dtype=torch.float32)
    model.config.use_cache = False
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), generator=gen)
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
    gc.collect()
    baseline = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    if variant == "peft-loop":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**LORA_KWARGS))
    else:
        import deltatune

        model = deltatune.get_peft_model(model, deltatune.LoraConfig(**LORA_KWARGS))
    model.train()
    if variant.endswith("loop"):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        mask = torch.ones_like(ids)
        for _ in range(args.steps):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        last = float(loss)
    else:
        from deltatune.training import TrainConfig, Trainer

        examples = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]
        with tempfile.TemporaryDirectory() as out:
            cfg = TrainConfig(output_dir=out, max_steps=args.steps, batch_size=args.batch_size, lr=1e-4,
                              warmup_ratio=0.0, save_steps=0, precision="fp32", progress=False,
                              chunked_loss=variant == "deltatune-trainer")
            last = Trainer(model, examples, cfg, pad_id=0).train().final_loss
    peak = _status_kb("VmHWM")
    print(json.dumps({"variant": variant, "peak_mib": (peak - baseline) / 1024, "loss": last,
                      "seconds": time.perf_counter() - t0}))


def run_child(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"child {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per variant")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.child:
        child(args.child, args)
        return
    command = ("python bench/trainer_memory.py " + shlex.join(sys.argv[1:] if argv is None else argv)).rstrip()
    results = {}
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        results[variant] = run_child(variant, args)
        r = results[variant]
        print(f"  {variant}: {r['peak_mib']:.0f} MiB, loss {r['loss']:.4f}, {r['seconds']:.0f} s", flush=True)
    ref = results.get("peft-loop")
    lines = [f"Peak RSS above the loaded SmolLM2-135M (fp32, CPU), batch {args.batch_size} x {args.seq_len}, "
             f"LoRA r=16 all-linear dropout 0.05, {args.steps} optimizer steps; one fresh process per variant.", "",
             "| variant | peak memory | / peft-loop |", "|---|---:|---:|"]
    for name, r in results.items():
        ratio = f"{r['peak_mib'] / ref['peak_mib']:.2f}x" if ref else "-"
        lines.append(f"| {name} | {r['peak_mib']:.0f} MiB | {ratio} |")
    lines += ["", f"Reproduce: `{command}`"]
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
