"""``deltatune merge``: fold an adapter into its base model and write a standalone model for serving."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import torch

from deltatune.cli import common
from deltatune.cli.common import UsageError, human_bytes


def register(subparsers) -> None:
    p = subparsers.add_parser("merge", help="write a standalone merged model (safetensors + config)",
                              description="W' = W + delta(W) for every adapted layer; the result loads with plain "
                                          "transformers, no deltatune or peft needed.")
    p.add_argument("--adapter", required=True, help="adapter directory")
    p.add_argument("--output-dir", required=True, help="where the merged model goes (must not exist, or "
                                                       "--overwrite)")
    p.add_argument("--model", help="base model (default: the one the adapter names)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the saved weights")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    out = os.path.abspath(args.output_dir)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not args.overwrite:
        raise UsageError(f"--output-dir {args.output_dir} exists and is not empty; pass --overwrite or another "
                         "directory")
    model, tokenizer, spec, _, _ = common.load_with_adapter(args.adapter, args.model, torch.device("cpu"))
    merged = model.merge_and_unload()
    merged = merged.to(getattr(torch, args.dtype))
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
    print(f"merged {args.adapter} into {spec.name}: wrote {out} ({human_bytes(size)}, {args.dtype}); "
          "load it with transformers' from_pretrained")
    return 0
