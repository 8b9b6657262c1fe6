"""``deltatune eval``: the task metric and loss of a base model, with or without an adapter."""

from __future__ import annotations

import argparse
import json
import os

from deltatune.cli import common, evaluation, loading
from deltatune.cli import options as options_mod
from deltatune.cli import settings as settings_mod
from deltatune.cli.common import UsageError
from deltatune.training.trainer import resolve_precision


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="task metric and loss of a model, with or without an adapter",
                              description="Evaluate a base model, or a base model plus an adapter, on a data set. "
                                          "With --adapter, the data and settings the adapter was trained with are "
                                          "the defaults.")
    p.add_argument("--adapter", help="adapter directory (from train, or written by peft)")
    p.add_argument("--model", help="base model (default: the one the adapter names, else smollm2-135m)")
    p.add_argument("--data", help="built-in name or file (default: the adapter's training data, else bbc-news)")
    p.add_argument("--eval-data", help="separate evaluation file")
    p.add_argument("--split", choices=["test", "validation", "train"], default="test")
    p.add_argument("--eval-samples", type=int, help="a fixed sample of this many records (0: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int)
    p.add_argument("--template", help="classification prompt for a causal LM, with {text} and {labels}")
    p.add_argument("--format", choices=["text", "prompt", "chat", "classification"])
    for role in ("text", "label", "prompt", "completion", "messages"):
        p.add_argument(f"--{role}-column")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--quantize", choices=[*options_mod.QUANTIZE_CHOICES, "none"],
                   help="hold the base in nf4/fp4/int8 via bitsandbytes (default: as the adapter was trained)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    run = {}
    if args.adapter:  # before the adapter's settings are read: a wrong path must not surface as a data error
        loading.check_adapter_dir(args.adapter)
        run = common.read_json(os.path.join(args.adapter, common.RUN_CONFIG_NAME))
    flags = {key: getattr(args, key) for key in ("data", "eval_data", "eval_samples", "max_length", "template",
                                                 "format", "text_column", "label_column", "prompt_column",
                                                 "completion_column", "messages_column")
             if getattr(args, key) is not None}
    settings = settings_mod.for_evaluation(run, flags, args.model)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = loading.pick_device(args.device)
    amp = resolve_precision(args.precision, device)
    quant_type = loading.run_quantize(run, args.quantize)
    dataset = loading.load_data(settings)
    if args.adapter:
        spec, labels, _ = loading.adapter_base_and_labels(args.adapter, args.model)
        if run.get("labels") and dataset.labels and run["labels"] != dataset.labels:
            raise UsageError(f"the adapter was trained on labels {run['labels']}, the data has {dataset.labels}")
    else:
        spec = loading.resolve_model(args.model or settings_mod.DEFAULTS["model"])
    model, tokenizer = loading.load_model(spec, labels=dataset.labels, device=device)
    model = loading.base_with_adapter(model, quant_type, args.adapter, args.model, spec, run)
    task = evaluation.make_task(dataset, spec, tokenizer, int(settings.max_length))
    records = getattr(dataset, args.split)
    examples = task.examples(records, settings.eval_samples or None)
    result = task.evaluate(model, examples, batch_size=args.batch_size, device=device, amp=amp)
    report = {"model": spec.name, "adapter": args.adapter, "data": dataset.name, "split": args.split,
              "records": len(examples), "quantize": quant_type, **result}
    if args.json:
        print(json.dumps(report))
    else:
        what = f"{spec.name}" + (f" ({quant_type})" if quant_type else "") \
            + (f" + {args.adapter}" if args.adapter else " (no adapter)")
        values = ", ".join(f"{k} {v:.4f}" for k, v in result.items())
        print(f"{what} on {dataset.name} {args.split} ({len(examples)} records): {values}")
    return 0
