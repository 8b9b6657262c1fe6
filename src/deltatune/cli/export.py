"""``deltatune export --to lora``: any weight adapter as a plain LoRA adapter (PEFT's format) for serving engines
that only take LoRA (vLLM, LoRAX).

Prints each layer's relative Frobenius error ``‖ΔW - B A‖_F / ‖ΔW‖_F`` and, as ``deltatune merge`` prints its
merge error, the logit error of the exported adapter against the original on a few fixed sentences
(``cli.merge.PROBE_TEXTS``). The output directory is written whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import torch

from deltatune.cli import common, loading
from deltatune.cli.common import UsageError, human_bytes


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write an adapter (DoRA, LoHa, LoKr, OFT, BOFT, IA3, VeRA, AdaLoRA...) as plain LoRA",
        description="Export any weight adapter as a plain LoRA adapter (PEFT's files) for serving engines that only "
                    "take LoRA: per layer, ΔW = merged weight - base weight, truncated SVD at --rank (or --energy) "
                    "-> lora_A, lora_B with lora_alpha = r. Prints the per-layer and the logit error.")
    p.add_argument("adapter", help="adapter directory (deltatune's or peft's)")
    p.add_argument("output_dir", help="directory for the LoRA adapter (must not exist, or be empty)")
    p.add_argument("--to", choices=["lora"], default="lora", help="target format (only lora)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="rank of every exported layer, e.g. 16")
    size.add_argument("--energy", type=float, help="keep this fraction of each layer's ‖ΔW‖² (e.g. 0.99); "
                                                   "r is the largest rank that needs")
    p.add_argument("--model", help="base model (default: the one the adapter names)")
    p.add_argument("--layers", type=int, default=8, help="per-layer errors to print, worst first (default 8)")
    p.set_defaults(handler=main)


def _check_output(out: str, adapter: str) -> str:
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UsageError(f"{out} exists and is not an empty directory; choose a new output directory")
    real_in, real_out = os.path.realpath(adapter), os.path.realpath(out)
    if real_out == real_in or real_out.startswith(real_in.rstrip(os.sep) + os.sep):
        raise UsageError(f"{out} is inside the adapter directory {adapter}; write the export to a directory of its "
                         "own")
    return out


def main(args: argparse.Namespace) -> int:
    from deltatune.cli.merge import probe_inputs
    from deltatune.errors import ConfigError
    from deltatune.export import export_to_lora

    if args.rank is not None and args.rank <= 0:
        raise UsageError(f"--rank must be a positive integer, got {args.rank}")
    if args.energy is not None and not 0.0 < args.energy <= 1.0:
        raise UsageError(f"--energy must be in (0, 1], got {args.energy}; 0.99 keeps 99% of each layer's ‖ΔW‖²")
    out = _check_output(args.output_dir, args.adapter)
    device = torch.device("cpu")
    model, tokenizer, spec, labels, run = loading.load_with_adapter(args.adapter, args.model, device, "none")
    try:
        exported = export_to_lora(model, rank=args.rank, energy=args.energy)
    except ConfigError as exc:
        raise UsageError(f"{args.adapter}: {exc}") from None
    inputs = probe_inputs(tokenizer)
    with torch.no_grad():
        before = model(input_ids=inputs).logits.float()
    base, _ = loading.load_model(spec, labels=labels or run.get("labels"), device=device)
    lora = exported.to_peft_model(base).eval()
    with torch.no_grad():
        diff = (lora(input_ids=inputs).logits.float() - before).abs()

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
    try:
        exported.save_pretrained(tmp)
        if run:  # so that `deltatune generate/eval --adapter OUT` find the base, labels and template
            record = dict(run, exported_from={"adapter": os.path.abspath(args.adapter),
                                              "rank": args.rank, "energy": args.energy})
            with open(os.path.join(tmp, common.RUN_CONFIG_NAME), "w", encoding="utf-8") as fh:
                json.dump(record, fh, indent=2)
        size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    report = exported.report
    layers = sorted(report["layers"].items(), key=lambda kv: -kv[1]["rel_error"])
    print(f"exported {args.adapter} ({report['source_method']}) as LoRA r={report['rank']}, lora_alpha="
          f"{report['rank']}: wrote {out} ({human_bytes(size)}, {report['parameters']:,d} parameters); load it with "
          "PeftModel.from_pretrained (deltatune or peft), vLLM or LoRAX")
    if report["lora_bias"]:
        print("note: the adapter changes biases, written as lora_B.bias (lora_bias=True); some engines ignore it")
    print(f"per-layer relative error ‖ΔW - BA‖/‖ΔW‖ over {len(layers)} layers: max {report['max_rel_error']:.3g}, "
          f"mean {report['mean_rel_error']:.3g}")
    for name, info in layers[: max(args.layers, 0)]:
        print(f"  {name}: rank {info['rank']}, error {info['rel_error']:.3g}")
    print(f"logit error vs the original adapter on {inputs.shape[0]} inputs of {inputs.shape[1]} tokens: "
          f"max |logit diff| {diff.max().item():.3g}, mean {diff.mean().item():.3g}")
    return 0
