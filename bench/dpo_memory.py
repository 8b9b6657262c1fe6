"""Peak memory of DPO steps: deltatune (reference = adapter disabled) vs ``peft`` in TRL vs a second reference model.

What is measured
----------------
SmolLM2-135M in fp32 on the CPU (``deltatune.builtin``), LoRA ``r=16, lora_alpha=32, target_modules="all-linear"``,
``trl.DPOConfig`` with ``--batch-size`` preference pairs per step (default 4), ``max_length=--max-length``
(default 128), ``--steps`` optimizer steps (default 3), fp32, no checkpoints. The preference set is synthetic
(prompt, chosen, rejected built from a fixed word list with a seeded RNG) and identical for every variant.
Variants, each in its own fresh child process:

* ``deltatune``          -- ``deltatune.get_peft_model`` and ``deltatune.integrations.trl.DPOTrainer`` with no
                            ``ref_model``: the reference is the policy with its adapter disabled.
* ``peft``               -- ``trl.DPOTrainer(model=base, peft_config=peft.LoraConfig(...))``: TRL wraps the model
                            in ``peft`` and its reference is likewise the adapter disabled.
* ``deltatune-ref-copy`` -- deltatune's trainer given ``ref_model=`` a second copy of SmolLM2-135M (what a
                            trainer without adapter-disabling does: TRL builds one for a plain model).

Peak memory, as in ``bench/trainer_memory.py``: each child loads the model, touches every weight, takes its RSS
as the baseline and resets the kernel's high-water mark (``/proc/self/clear_refs``; where a sandbox forbids the
reset, ``reset: false`` is printed and the loading peak stays in). It then builds the variant (the second copy's
load included) and trains; it reports ``VmHWM - baseline`` and ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
(the whole process, model included). Linux only.

Usage::

    python bench/dpo_memory.py                     # ~3 min on 2 cores
    python bench/dpo_memory.py --steps 2 --batch-size 2 --variants deltatune,peft
    python bench/dpo_memory.py --model llama-tiny  # a seconds-long smoke run (random tiny Llama, same tokenizer)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/lora_train.py: spinning threads on a shared CPU

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

VARIANTS = ("deltatune", "peft", "deltatune-ref-copy")
LORA_KWARGS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear",
               "task_type": "CAUSAL_LM"}
TEXT = ("the cat sat on a mat while rain fell over quiet hills and the river ran past old stone bridges toward "
        "distant towns where people sold bread fish apples and warm tea in busy morning markets")
WORDS = TEXT.split()


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status (this benchmark needs Linux)")


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` synthetic (prompt, chosen, rejected) rows: word salads of fixed lengths, the same for every variant."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [{"prompt": text(24) + "?", "chosen": " " + text(40) + ".", "rejected": " " + text(40) + "."}
            for _ in range(n)]


def load_model(name: str):  # noqa: ANN201 - (model, tokenizer)
    from deltatune.builtin.models import load_builtin_model, resolve_model_path

    if name == "smollm2-135m":
        return load_builtin_model("smollm2-135m", dtype=torch.float32)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg), tok


def child(variant: str, args: argparse.Namespace) -> None:
    """Print one JSON line: the variant's peak RSS above the loaded model, the process peak, and the losses."""
    # Every variant imports the same libraries before the baseline, so no variant pays another's imports.
    import datasets
    import peft
    import trl

    import deltatune
    from deltatune.integrations.trl import DPOTrainer

    model, tok = load_model(args.model)
    model.config.use_cache = False
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
    gc.collect()
    baseline = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    t0 = time.perf_counter()
    rows = datasets.Dataset.from_list(preference_rows(args.batch_size * args.steps))
    with tempfile.TemporaryDirectory() as out:
        cfg = trl.DPOConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                            max_length=args.max_length, learning_rate=1e-4, report_to=[], save_strategy="no",
                            use_cpu=True, disable_tqdm=True, seed=0, logging_steps=1, bf16=False,
                            dataloader_num_workers=0)
        if variant == "peft":
            trainer = trl.DPOTrainer(model=model, args=cfg, processing_class=tok, train_dataset=rows,
                                     peft_config=peft.LoraConfig(**LORA_KWARGS))
        else:
            ref = load_model(args.model)[0] if variant == "deltatune-ref-copy" else None
            policy = deltatune.get_peft_model(model, deltatune.LoraConfig(**LORA_KWARGS))
            trainer = DPOTrainer(model=policy, ref_model=ref, args=cfg, processing_class=tok, train_dataset=rows)
        reference = type(trainer.ref_model).__name__ if trainer.ref_model is not None else "adapter disabled (peft)"
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    peak = _status_kb("VmHWM")
    print(json.dumps({"variant": variant, "peak_mib": (peak - baseline) / 1024, "baseline_mib": baseline / 1024,
                      "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "reset": reset,
                      "losses": losses, "reference": reference, "seconds": time.perf_counter() - t0}))


def run_child(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--batch-size", str(args.batch_size),
           "--max-length", str(args.max_length), "--steps", str(args.steps), "--threads", str(args.threads),
           "--model", args.model]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"child {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=4, help="preference pairs per step")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per variant")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", choices=("smollm2-135m", "llama-tiny"), default="smollm2-135m")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    return p


def report(results: dict, args: argparse.Namespace, command: str) -> list[str]:
    """The markdown table: each variant's peak, its ratio to deltatune's, and the command."""
    ref = results.get("deltatune")
    lines = [f"Peak RSS of {args.steps} DPO steps on {args.model} (fp32, CPU), {args.batch_size} pairs per step, "
             f"max_length {args.max_length}, LoRA r=16 all-linear; one fresh process per variant.", "",
             "| variant | reference | peak above the loaded model | / deltatune | process peak (ru_maxrss) |",
             "|---|---|---:|---:|---:|"]
    for name, r in results.items():
        ratio = f"{r['peak_mib'] / ref['peak_mib']:.2f}x" if ref else "-"
        lines.append(f"| {name} | {r['reference']} | {r['peak_mib']:.0f} MiB | {ratio} | "
                     f"{r['ru_maxrss_mib']:.0f} MiB |")
    if not all(r["reset"] for r in results.values()):
        lines.append("\n(The high-water mark could not be reset here: the loading peak is included.)")
    return [*lines, "", f"Reproduce: `{command}`"]


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.child:
        child(args.child, args)
        return {}
    command = ("python bench/dpo_memory.py " + shlex.join(sys.argv[1:] if argv is None else argv)).rstrip()
    results = {}
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        results[variant] = r = run_child(variant, args)
        print(f"  {variant}: {r['peak_mib']:.0f} MiB above the model ({r['ru_maxrss_mib']:.0f} MiB process peak), "
              f"losses {[round(x, 4) for x in r['losses']]}, {r['seconds']:.0f} s", flush=True)
    print("\n" + "\n".join(report(results, args, command)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
