"""Mixed-adapter batches: one forward over rows that each use a different LoRA adapter.

On SmolLM2-135M (fp32, CPU) with ``--adapters`` LoRA adapters (r=16, all linear layers, different seeds),
a batch of ``--batch-size`` rows x ``--seq-len`` tokens runs forward (no grad) in three ways, interleaved
in one process (rotating order, median of ``--rounds`` timings):

* ``single``    -- every row through one adapter (the ordinary case, the reference cost);
* ``deltatune`` -- row ``i`` through adapter ``i % adapters`` with ``adapter_names=[...]``: each layer gathers
                   the rows' zero-padded ``A``/``B`` by slot index from its preallocated adapter slots (filled
                   once, kept across calls) and runs two batched matmuls (no Python loop over adapters);
* ``deltatune restack`` -- the same call with every slot marked stale first, so each call restacks all the
                   adapters' ``A``/``B`` as deltatune did before the slots (the per-call cost the slots remove);
* ``peft``      -- the same call on ``peft`` with the same adapter files (if ``peft`` is installed).

It first checks that deltatune's mixed output equals running each row alone with its adapter, then prints
the ratios ``mixed / single`` for both libraries as a markdown table.

Usage: ``python bench/mixed_adapters.py [--adapters 16 --batch-size 16 --seq-len 128 --rounds 5]``
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import tempfile
import time

import torch

import deltatune as dt
from deltatune.builtin.models import load_builtin_model


def build(base, n: int, r: int, tmp: str):
    model = None
    for i in range(n):
        torch.manual_seed(100 + i)
        cfg = dt.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights="gaussian")
        if model is None:
            model = dt.get_peft_model(base, cfg, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", cfg)
    with torch.no_grad():  # non-zero B so every adapter changes the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    model.save_pretrained(tmp)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-peft", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    base, _ = load_builtin_model("smollm2-135m")
    base = base.float().eval()
    base.config.use_cache = False
    pristine = copy.deepcopy(base) if not args.no_peft else None
    tmp = tempfile.mkdtemp()
    ours = build(base, args.adapters, args.rank, tmp)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch_size, args.seq_len), generator=gen)
    names = [f"a{i % args.adapters}" for i in range(args.batch_size)]

    with torch.no_grad():  # correctness first: mixed rows equal each row alone with its adapter
        mixed = ours(ids[:4], adapter_names=names[:4]).logits
        for i in range(4):
            ours.set_adapter(names[i])
            alone = ours(ids[i : i + 1]).logits
            # fp32 sums are reordered over 30 blocks, hence the tolerance
            torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-3, rtol=1e-3)
    ours.set_adapter("a0")

    layers = [m for m in ours.modules() if hasattr(m, "_slots")]

    def restacked():
        for layer in layers:
            layer._clear_row_cache()  # every slot stale: refilled in this call, as the per-call stacks were
        return ours(ids, adapter_names=names)

    runs = {
        "single": lambda: ours(ids),
        "deltatune": lambda: ours(ids, adapter_names=names),
        "deltatune restack": restacked,
    }
    if pristine is not None:
        import peft

        theirs = peft.PeftModel.from_pretrained(pristine, f"{tmp}/a0", adapter_name="a0")
        for i in range(1, args.adapters):
            theirs.load_adapter(f"{tmp}/a{i}", adapter_name=f"a{i}")
        theirs.eval()
        runs["peft single"] = lambda: theirs(ids)
        runs["peft"] = lambda: theirs(ids, adapter_names=names)

    times: dict[str, list[float]] = {k: [] for k in runs}
    order = list(runs)
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            fn()
        for rnd in range(args.rounds):
            for key in order[rnd % len(order):] + order[: rnd % len(order)]:
                t = time.perf_counter()
                runs[key]()
                times[key].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{args.adapters} adapters mixed in a batch of {args.batch_size} x {args.seq_len} tokens, forward, "
          f"SmolLM2-135M fp32, {args.threads} threads, median of {args.rounds}\n")
    print("| library | single adapter (s) | mixed (s) | mixed / single |")
    print("|---|---|---|---|")
    print(f"| deltatune | {med['single']:.3f} | {med['deltatune']:.3f} | {med['deltatune'] / med['single']:.2f}x |")
    print(f"| deltatune, restack per call (before slots) | {med['single']:.3f} | {med['deltatune restack']:.3f} | "
          f"{med['deltatune restack'] / med['single']:.2f}x |")
    if "peft" in med:
        print(f"| peft | {med['peft single']:.3f} | {med['peft']:.3f} | {med['peft'] / med['peft single']:.2f}x |")
    print(f"\ncommand: python {shlex.join(['bench/mixed_adapters.py', *(argv or sys.argv[1:])])}")


if __name__ == "__main__":
    main()
