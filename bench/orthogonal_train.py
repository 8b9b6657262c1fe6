"""OFT / BOFT training-step benchmark: deltatune vs ``peft`` on SmolLM2-135M (fp32, CPU).

For each case both libraries adapt the same 210 linear layers (``target_modules="all-linear"``) of their own
deep copy of the model; the script checks they have the same number of trainable parameters and the same
initial loss (both start as the identity). A step is ``forward + loss + backward + AdamW.step + zero_grad`` on
one fixed batch of random token ids. Steps of the two variants are interleaved (the order alternates each
round) so load from other processes hits both alike; the table gives median step times, their ratio and the
per-round ratios (median, min-max). Peak memory: a fresh child process per variant, RSS high-water mark minus
the loaded model (the method of ``bench/lora_train.py``, whose helpers this script reuses).

Cases: ``oft`` (``oft_block_size=32``, Cayley-Neumann, PEFT's default), ``oft-exact`` (exact Cayley),
``boft`` (``boft_block_size=8``, one butterfly factor: what PEFT runs on a CPU, where it lacks its CUDA
kernel), ``boft2`` (two factors; PEFT's CUDA block-diagonal kernel emulated with ``torch.block_diag``, so PEFT
runs its own multi-factor math: slow, not in the default set).

Usage::

    python bench/orthogonal_train.py                          # oft, boft; ~10 min on 2 loaded cores
    python bench/orthogonal_train.py --cases oft,oft-exact,boft --rounds 6 --no-memory
"""

from __future__ import annotations

import os
import sys

# As bench/lora_train.py: idle OpenMP threads sleep instead of spinning on a shared CPU (set before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from lora_train import _proc_status_kb, load_base_model, make_batch  # noqa: E402

COMMON = {"target_modules": "all-linear", "task_type": "CAUSAL_LM"}
# case -> (config class name, kwargs, label)
CASES = {
    "oft": ("OFTConfig", {"oft_block_size": 32}, "OFT, block 32, Cayley-Neumann"),
    "oft-exact": ("OFTConfig", {"oft_block_size": 32, "use_cayley_neumann": False}, "OFT, block 32, exact Cayley"),
    "boft": ("BOFTConfig", {"boft_block_size": 8}, "BOFT, block 8, 1 factor"),
    "boft2": ("BOFTConfig", {"boft_block_size": 8, "boft_n_butterfly_factor": 2}, "BOFT, block 8, 2 factors"),
}
VARIANTS = ("peft", "deltatune")


def _emulate_peft_butterfly_kernel() -> None:
    """PEFT runs several butterfly factors only with its compiled CUDA kernel; stand in for it on CPU."""
    from peft.tuners.boft import layer as peft_boft

    peft_boft.get_fbd_cuda = lambda: object()
    peft_boft.FastBlockDiag.apply = staticmethod(
        lambda blocks: torch.stack([torch.block_diag(*blocks[i]) for i in range(blocks.shape[0])]))


def build(variant: str, base, case: str, ids: torch.Tensor, copy_base: bool):
    """``(model, step, n_trainable)`` for ``variant`` on (a copy of) ``base``."""
    cls_name, kwargs, _ = CASES[case]
    model = copy.deepcopy(base) if copy_base else base
    if variant == "peft":
        import peft as lib

        if case == "boft2":
            _emulate_peft_butterfly_kernel()
    else:
        import deltatune as lib
    model = lib.get_peft_model(model, getattr(lib, cls_name)(**COMMON, **kwargs))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return model, step, sum(p.numel() for p in params)


def time_case(base, case: str, ids: torch.Tensor, args: argparse.Namespace) -> dict:
    built = {v: build(v, base, case, ids, copy_base=True) for v in VARIANTS}
    n = {v: b[2] for v, b in built.items()}
    if n["peft"] != n["deltatune"]:
        raise RuntimeError(f"[{case}] trainable parameters differ: {n}")
    losses = {}
    for v, (model, _, _) in built.items():
        model.eval()
        with torch.no_grad():
            losses[v] = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
        model.train()
    if abs(losses["peft"] - losses["deltatune"]) > 1e-3:
        raise RuntimeError(f"[{case}] initial losses differ: {losses}")
    for v in VARIANTS:
        for _ in range(args.warmup):
            built[v][1]()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    rounds = []
    for r in range(args.rounds):
        got = {}
        for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            t0 = time.perf_counter()
            built[v][1]()
            got[v] = time.perf_counter() - t0
            times[v].append(got[v])
        rounds.append(got["deltatune"] / got["peft"])
        print(f"  [{case}] round {r + 1}/{args.rounds}: peft {got['peft']:.2f} s, deltatune {got['deltatune']:.2f} s",
              flush=True)
    med = {v: statistics.median(t) for v, t in times.items()}
    del built
    gc.collect()
    return {"case": case, "label": CASES[case][2], "n_trainable": n["peft"], "initial_loss": losses,
            "median_s": med, "times_s": times, "ratio": med["deltatune"] / med["peft"], "per_round": rounds}


def memory_child(args: argparse.Namespace) -> None:
    base = load_base_model()
    ids = make_batch(base, args.batch_size, args.seq_len)
    with torch.no_grad():
        for p in base.parameters():
            p.sum()
    gc.collect()
    baseline = _proc_status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    _, step, _ = build(args.measure_memory, base, args.case, ids, copy_base=False)
    for _ in range(3):
        step()
    print(json.dumps({"peak_delta_mb": (_proc_status_kb("VmHWM") - baseline) / 1024}))


def measure_memory(variant: str, case: str, args: argparse.Namespace) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--measure-memory", variant, "--case", case,
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {variant}/{case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_delta_mb"]


def markdown(results: list[dict], memory: dict | None, args: argparse.Namespace, command: str) -> str:
    lines = [f"SmolLM2-135M, fp32, CPU ({args.threads} threads), batch {args.batch_size} x {args.seq_len} tokens, "
             f"all 210 linear layers; median of {args.rounds} interleaved steps per variant.", "",
             "| case | trainable params | peft | deltatune | deltatune / peft | per round |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        m, pr = r["median_s"], r["per_round"]
        lines.append(f"| {r['label']} | {r['n_trainable']:,d} | {m['peft']:.2f} s | {m['deltatune']:.2f} s | "
                     f"{r['ratio']:.2f}x | {statistics.median(pr):.2f} ({min(pr):.2f}-{max(pr):.2f}) |")
    if memory:
        lines += ["", "| peak memory above the loaded model | peft | deltatune | deltatune / peft |",
                  "|---|---:|---:|---:|"]
        for r in results:
            mm = memory[r["case"]]
            lines.append(f"| {r['label']} | {mm['peft']:.0f} MiB | {mm['deltatune']:.0f} MiB | "
                         f"{mm['deltatune'] / mm['peft']:.2f}x |")
    return "\n".join(lines + ["", f"Reproduce: `{command}`"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="oft,boft", help=f"comma list of {','.join(CASES)}")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", default=None, help="also write every number to this JSON file")
    p.add_argument("--measure-memory", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--case", default="oft", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if any(c not in CASES for c in cases + [args.case]):
        p.error(f"unknown case in {cases}; choose from {list(CASES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.measure_memory:
        memory_child(args)
        return
    command = "python bench/orthogonal_train.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    base = load_base_model()
    ids = make_batch(base, args.batch_size, args.seq_len)
    results = []
    for case in cases:
        print(f"timing {case} ({CASES[case][2]})", flush=True)
        results.append(time_case(base, case, ids, args))
    memory = None
    if not args.no_memory:
        memory = {}
        for case in cases:
            memory[case] = {v: measure_memory(v, case, args) for v in VARIANTS}
            print(f"  [{case}] peak memory: " + ", ".join(f"{k} {mb:.0f} MiB" for k, mb in memory[case].items()),
                  flush=True)
    table = markdown(results, memory, args, command)
    print("\n" + table)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"command": command, "results": results, "peak_memory_mib": memory, "table": table}, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
