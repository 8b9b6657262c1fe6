"""Adapter arithmetic: ``add_weighted_adapter`` for every combination type, deltatune vs ``peft``.

On SmolLM2-135M (fp32, CPU) with three LoRA adapters (r=``--rank``, ``--targets``, random factors, the same
tensors in both libraries), each combination type is timed in both libraries, interleaved in one process
(alternating which goes first, median of ``--rounds``); each timed call creates the combined adapter and is
followed by ``delete_adapter`` (untimed). Before timing, the script checks once per type that both libraries
produce bit-identical adapter tensors under the same ``torch.manual_seed`` (DARE included).

Usage: ``python bench/adapter_arithmetic.py [--rounds 3 --targets q_proj,v_proj,down_proj --types ties,svd]``
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
import warnings

import torch

import deltatune as dt
from deltatune.builtin.models import load_builtin_model

TYPES = ["cat", "linear", "svd", "svd_from_factors", "ties", "ties_svd", "dare_linear", "dare_ties",
         "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"]
# "svd_from_factors": PEFT's dense "svd" against deltatune's opt-in svd_from_factors=True (equal up to rounding).
ADAPTERS = ["a", "b", "c"]
WEIGHTS = [0.6, 0.3, -0.2]


def build(lib, base, targets: list[str], rank: int):
    model = None
    for i, name in enumerate(ADAPTERS):
        torch.manual_seed(100 + i)
        config = lib.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights="gaussian")
        if model is None:
            model = lib.get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model


def combine(model, how: str, seed: int = 0) -> float:
    kwargs = {} if how in ("cat", "linear", "svd") else {"density": 0.5}
    if how == "svd_from_factors":
        how, kwargs = "svd", ({"svd_from_factors": True} if isinstance(model, dt.PeftModel) else {})
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        model.add_weighted_adapter(ADAPTERS, WEIGHTS, "m", combination_type=how, **kwargs)
        return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    import peft

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default="q_proj,v_proj,down_proj")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    targets = args.targets.split(",")

    base, _ = load_builtin_model("smollm2-135m")
    base = base.float().eval()
    theirs = build(peft, copy.deepcopy(base), targets, args.rank)
    ours = build(dt, base, targets, args.rank)
    with torch.no_grad():  # non-zero B everywhere, identical in both libraries
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    ours.load_state_dict(theirs.state_dict(), strict=False)
    n_layers = sum(1 for _ in ours.base_model.adapter_layers())

    rows = []
    for how in args.types.split(","):
        for model in (theirs, ours):  # correctness (and warm-up): same tensors from both
            combine(model, how)
        want = {k: v for k, v in theirs.state_dict().items() if ".m." in k}
        got = ours.state_dict()
        if how == "svd_from_factors":  # singular vectors may flip sign: compare the updates B A
            same = all(torch.allclose(layer.get_delta_weight("m"), theirs.get_submodule(name).get_delta_weight("m"),
                                      rtol=0, atol=1e-4 * layer.get_delta_weight("m").abs().max().item())
                       for name, layer in ((f"base_model.model.{n}", l) for n, l in ours.base_model.adapter_layers()))
            same = "equal B A (1e-4)" if same else "NO"
        else:
            same = "bit-identical" if all(torch.equal(v, got[k]) for k, v in want.items()) else "NO"
        times: dict[str, list[float]] = {"peft": [], "deltatune": []}
        for model in (theirs, ours):
            model.delete_adapter("m")
        for rnd in range(args.rounds):
            pair = [("peft", theirs), ("deltatune", ours)]
            for key, model in (pair if rnd % 2 == 0 else pair[::-1]):
                times[key].append(combine(model, how, seed=rnd))
                model.delete_adapter("m")
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((how, med["peft"], med["deltatune"], same))
        print(f"{how}: peft {med['peft']:.3f}s deltatune {med['deltatune']:.3f}s", file=sys.stderr, flush=True)

    print(f"\nadd_weighted_adapter, 3 LoRA adapters r={args.rank} on {n_layers} layers ({args.targets}) of "
          f"SmolLM2-135M, fp32, {args.threads} threads, median of {args.rounds}\n")
    print("| combination_type | peft (s) | deltatune (s) | deltatune / peft | tensors equal to peft |")
    print("|---|---:|---:|---:|---|")
    for how, p, d, same in rows:
        print(f"| {how} | {p:.3f} | {d:.3f} | {d / p:.2f}x | {same} |")
    print(f"\ncommand: python {shlex.join(['bench/adapter_arithmetic.py', *(argv or sys.argv[1:])])}")


if __name__ == "__main__":
    main()
