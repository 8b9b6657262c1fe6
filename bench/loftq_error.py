"""LoftQ's starting error against plain QLoRA's on SmolLM2-135M (issue 19 item 2).

A 4-bit base starts training off the float model by its quantisation error. Three starts, all LoRA r=16 on every
linear layer of the 30 decoder blocks (``target_modules="all-linear"``: 210 layers, the tied head stays float),
``lora_alpha = r`` (scaling 1, the scaling LoftQ's factors are fitted for):

(a) plain QLoRA: the NF4 base ``Q = nf4(W)`` and ``B = 0`` (bitsandbytes NF4, blocks of 64, fp32 scales: the
    quantiser LoftQ uses; ``deltatune.quantize(..., double_quant=False)``, read back with ``dequantize_weight``);
(b) LoftQ (``init_lora_weights="loftq"``) with ``loftq_iter`` = 1 and 5: ``Q + s B A``.

Measured for each: per layer and in total the relative weight error ``||W - (Q + s B A)||_F / ||W||_F`` (the
total is over all 210 layers: ``sqrt(sum ||E||^2) / sqrt(sum ||W||^2)``), and the logit error against the float
model on the first 64 tokens of 8 held-out BBC News articles (deltatune's built-in ``bbc-news`` test split):
``||z - z_float||_F / ||z_float||_F`` over all positions, and the mean per-token ``KL(p_float || p)``. Every number
is printed with the ratio (b)/(a); ``--json`` writes every layer's numbers too. Deterministic (no sampling):
rerunning gives the same numbers on the same machine.

SmolLM2-135M ships as a Q4_1 GGUF (deltatune.builtin.models): its "float" weights are that file's exact fp32
dequantisation, which NF4 then re-quantises.

Usage::

    python bench/loftq_error.py                              # SmolLM2-135M, about 2 min on 2 cores
    python bench/loftq_error.py --iters 1 2 5 --json /tmp/loftq.json
    python bench/loftq_error.py --model llama-tiny           # seconds: the smoke test's
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
import warnings

import torch
from torch import nn

MODELS = ("smollm2-135m", "llama-tiny")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The float model (eval, fp32) and ``(8, 64)`` token ids to compare logits on."""
    if name == "llama-tiny":  # seeded random weights, random ids: a smoke test, not a measurement
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        return model.eval(), torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    from deltatune.builtin.datasets import load_bbc_news
    from deltatune.builtin.models import load_builtin_model

    model, tokenizer = load_builtin_model(name, dtype=torch.float32)
    articles = load_bbc_news("test")[::25][:8]  # spread over the topics (the split is ordered by topic)
    ids = [tokenizer(a["text"], add_special_tokens=False)["input_ids"][:64] for a in articles]
    return model.eval(), torch.tensor(ids)


def layer_errors(float_model: nn.Module, model: nn.Module) -> dict[str, tuple[float, float]]:
    """``{name: (||W - W_eff||_F^2, ||W||_F^2)}`` for every adapted (or quantised) projection, with ``W_eff``
    the weight the model starts with: ``Q + s B A`` of a LoRA layer, ``Q`` of a bitsandbytes layer."""
    from deltatune.lora.layer import LoraLinear
    from deltatune.quantization import dequantize_weight, is_quantized_layer

    float_weights = {n: m.weight for n, m in float_model.named_modules() if n.endswith(PROJECTIONS)}
    out = {}
    for name, module in model.named_modules():
        name = name.removeprefix("base_model.model.")
        if name not in float_weights:
            continue
        if isinstance(module, LoraLinear):
            effective = module._base_weight().float() + module.get_delta_weight("default").float()
        elif is_quantized_layer(module):
            effective = dequantize_weight(module)
        else:
            continue
        w = float_weights[name].float()
        out[name] = ((w - effective).norm().item() ** 2, w.norm().item() ** 2)
    assert len(out) == len(float_weights), "every projection is measured"
    return out


@torch.no_grad()
def logit_errors(reference: torch.Tensor, model: nn.Module, ids: torch.Tensor) -> dict[str, float]:
    """Relative Frobenius error of the logits and the mean per-token ``KL(p_float || p_model)`` (nats)."""
    logits = model(ids).logits.float()
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    return {"logit_rel_error": ((logits - reference).norm() / reference.norm()).item(), "kl_nats": kl}


def total(errors: dict[str, tuple[float, float]]) -> float:
    return math.sqrt(sum(e for e, _ in errors.values()) / sum(w for _, w in errors.values()))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=MODELS, default="smollm2-135m")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (lora_alpha = r)")
    p.add_argument("--iters", type=int, nargs="+", default=[1, 5], help="loftq_iter values to measure")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write every number (per layer too) to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*loaded onto the base as given.*")
    import deltatune as dt
    from deltatune.quantization import dequantize_weight

    float_model, ids = load(args.model)
    with torch.no_grad():
        reference = float_model(ids).logits.float()

    runs: dict[str, dict] = {}
    start = time.perf_counter()
    qlora = dt.quantize(copy.deepcopy(float_model), "nf4", double_quant=False)
    runs["qlora"] = {"layers": layer_errors(float_model, qlora)}
    # the dense fp32 Q, for the logits: the same numbers the 4-bit layers hold, without the CPU kernel's rounding
    dense = copy.deepcopy(float_model)
    for name, module in qlora.named_modules():
        if name.endswith(PROJECTIONS):
            dense.get_submodule(name).weight.data = dequantize_weight(module)
    runs["qlora"].update(logit_errors(reference, dense, ids), seconds=time.perf_counter() - start)
    del qlora, dense
    for iters in args.iters:
        start = time.perf_counter()
        model = dt.get_peft_model(copy.deepcopy(float_model), dt.LoraConfig(
            r=args.r, lora_alpha=args.r, target_modules="all-linear", init_lora_weights="loftq",
            loftq_config=dt.LoftQConfig(loftq_bits=4, loftq_iter=iters)))
        seconds = time.perf_counter() - start
        runs[f"loftq_iter{iters}"] = {"layers": layer_errors(float_model, model),
                                      **logit_errors(reference, model, ids), "seconds": seconds}
        del model

    report = {"model": args.model, "r": args.r, "lora_alpha": args.r, "tokens": list(ids.shape), "runs": {}}
    base = runs["qlora"]
    print(f"{args.model}, all-linear ({len(base['layers'])} layers), r = lora_alpha = {args.r}; logits on "
          f"{ids.shape[0]} x {ids.shape[1]} tokens")
    header = "| start | weight rel. error (total) | (b)/(a) | logit rel. error | (b)/(a) | KL (nats/token) | (b)/(a) |"
    print(header + "\n|" + "---|" * 7)
    for key, run in runs.items():
        weight = total(run["layers"])
        report["runs"][key] = {"weight_rel_error": weight, "logit_rel_error": run["logit_rel_error"],
                               "kl_nats": run["kl_nats"], "seconds": run["seconds"],
                               "layers": {n: math.sqrt(e / w) for n, (e, w) in run["layers"].items()}}
        label = "(a) QLoRA, B = 0" if key == "qlora" else f"(b) LoftQ, loftq_iter={key.removeprefix('loftq_iter')}"
        print(f"| {label} | {weight:.4f} | {weight / total(base['layers']):.3f} | {run['logit_rel_error']:.4f} | "
              f"{run['logit_rel_error'] / base['logit_rel_error']:.3f} | {run['kl_nats']:.5f} | "
              f"{run['kl_nats'] / base['kl_nats']:.3f} |")

    print("\nPer projection (relative weight error over the blocks; (b)/(a) per layer: median [min, max]):")
    loftq_keys = [k for k in runs if k != "qlora"]
    print("| projection | (a) QLoRA | " + " | ".join(f"(b) iter {k.removeprefix('loftq_iter')}" for k in loftq_keys)
          + " | " + " | ".join(f"ratio iter {k.removeprefix('loftq_iter')}" for k in loftq_keys) + " |")
    print("|" + "---|" * (2 + 2 * len(loftq_keys)))
    for proj in PROJECTIONS:
        def part(run: dict, proj: str = proj) -> dict[str, tuple[float, float]]:
            return {n: v for n, v in run["layers"].items() if n.endswith(proj)}

        cells = [f"{total(part(base)):.4f}"] + [f"{total(part(runs[k])):.4f}" for k in loftq_keys]
        for k in loftq_keys:
            ratios = sorted(math.sqrt(runs[k]["layers"][n][0] / base["layers"][n][0]) for n in part(base))
            cells.append(f"{ratios[len(ratios) // 2]:.3f} [{ratios[0]:.3f}, {ratios[-1]:.3f}]")
        print(f"| {proj} | " + " | ".join(cells) + " |")
    print("\nseconds: " + ", ".join(f"{k} {v['seconds']:.1f}" for k, v in runs.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return report


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
