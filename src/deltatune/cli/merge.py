"""``deltatune merge``: fold an adapter into its base model and write a standalone model for serving.

Over a quantised base (an adapter trained with ``--quantize``), the adapter is folded into the dequantised
weights (exact) and the model is written dense; ``--requantize`` quantises the merged model again and writes
it in bitsandbytes' format (``from_pretrained`` loads it quantised). Either way the merge error, the
difference of the merged model's logits from the unmerged model's on a few fixed inputs, is printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import torch

from deltatune.cli import common
from deltatune.cli.common import UsageError, human_bytes

# A few fixed inputs on which the merged model's logits are compared with the unmerged model's.
PROBE_TEXTS = (
    "The central bank left interest rates unchanged on Thursday, citing slower growth.",
    "She scored twice in the second half as the home side came back to win the match.",
    "The new phone has a larger screen, a faster chip and a battery that lasts two days.",
    "Parliament will vote next week on the bill, which critics say goes too far.",
)


def register(subparsers) -> None:
    p = subparsers.add_parser("merge", help="write a standalone merged model (safetensors + config)",
                              description="W' = W + delta(W) for every adapted layer; the result loads with plain "
                                          "transformers, no deltatune or peft needed. Prints the merge error: "
                                          "max/mean |logits merged - logits unmerged| on a few fixed inputs.")
    p.add_argument("--adapter", required=True, help="adapter directory")
    p.add_argument("--output-dir", required=True, help="where the merged model goes (must not exist, or "
                                                       "--overwrite)")
    p.add_argument("--model", help="base model (default: the one the adapter names)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the saved weights (with --requantize: of the dense layers and the compute)")
    p.add_argument("--quantize", choices=[*common.QUANTIZE_CHOICES, "none"],
                   help="the base the adapter was trained on (default: as its training run says)")
    p.add_argument("--requantize", choices=common.QUANTIZE_CHOICES,
                   help="quantise the merged model again (bitsandbytes) and write it quantised; costs that "
                        "format's rounding of the merged weights, which the printed merge error includes")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=main)


def probe_inputs(tokenizer, max_tokens: int = 24) -> torch.Tensor:
    """``(4, n)`` token ids of :data:`PROBE_TEXTS`, cut to the shortest so no padding is needed."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in PROBE_TEXTS]
    n = min(len(r) for r in rows)
    return torch.tensor([r[:n] for r in rows])


def main(args: argparse.Namespace) -> int:
    out = os.path.abspath(args.output_dir)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not args.overwrite:
        raise UsageError(f"--output-dir {args.output_dir} exists and is not empty; pass --overwrite or another "
                         "directory")
    if args.requantize:
        common.check_quantize(args.requantize)
    model, tokenizer, spec, _, run = common.load_with_adapter(args.adapter, args.model, torch.device("cpu"),
                                                              args.quantize)
    from deltatune.quantization import bnb_config, merge_and_report

    base_quant = common.check_quantize(run.get("quantize") if args.quantize is None else args.quantize)
    dtype = getattr(torch, args.dtype)
    inputs = probe_inputs(tokenizer)
    # Dense: layers no adapter touched are dequantised too, so the written model is plain transformers.
    merged, report = merge_and_report(model, inputs, requantize=args.requantize, dense=True, dtype=dtype)
    if args.requantize:  # so that from_pretrained loads the packed weights back as bitsandbytes layers
        head = [n for n, m in merged.named_modules() if type(m) is torch.nn.Linear]  # left dense by quantize
        merged.config.quantization_config = bnb_config(args.requantize, double_quant=True, compute_dtype=dtype,
                                                       skip_modules=head)
    # Write beside the target, then rename: a failed merge leaves no half-written model directory.
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-merge-", dir=parent)
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    base = f" ({base_quant} base, dequantised)" if base_quant else ""
    form = f"{args.requantize}-quantised, compute {args.dtype}" if args.requantize else args.dtype
    print(f"merged {args.adapter} into {spec.name}{base}: wrote {out} ({human_bytes(size)}, {form}); "
          "load it with transformers' from_pretrained")
    print(f"merge error vs the unmerged model on {inputs.shape[0]} inputs of {inputs.shape[1]} tokens: "
          f"max |logit diff| {report['max_abs_diff']:.3g}, mean {report['mean_abs_diff']:.3g}")
    return 0

