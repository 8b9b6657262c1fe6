"""``deltatune merge``: fold an adapter into its base model, or combine several adapters into one.

- ``--adapter DIR``: write a standalone model (safetensors + config + tokenizer) with the adapter folded in.
- ``--adapters DIR1 DIR2 ... --weights ... --how ties``: write a new LoRA adapter directory, the weighted
  combination (``PeftModel.add_weighted_adapter``); with ``--merge-into-base``, a standalone model with that
  combination folded in instead.

Over a quantised base (an adapter trained with ``--quantize``), an adapter is folded into the dequantised weights
(exact) and the model is written dense; ``--requantize`` quantises the merged model again and writes it in
bitsandbytes' format (``from_pretrained`` loads it quantised). Either way the merge error, the difference of the
merged model's logits from the unmerged model's on a few fixed inputs, is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable

import torch

from deltatune.cli import common, loading
from deltatune.cli import options as options_mod
from deltatune.cli.common import UsageError, human_bytes
from deltatune.core.io import is_disk_full
from deltatune.errors import DiskFullError

# A few fixed inputs on which the merged model's logits are compared with the unmerged model's.
PROBE_TEXTS = (
    "The central bank left interest rates unchanged on Thursday, citing slower growth.",
    "She scored twice in the second half as the home side came back to win the match.",
    "The new phone has a larger screen, a faster chip and a battery that lasts two days.",
    "Parliament will vote next week on the bill, which critics say goes too far.",
)


# The combined adapter is "default", so save_pretrained writes it at the top of the output directory.
COMBINED = "default"


def register(subparsers) -> None:
    from deltatune.lora.arithmetic import COMBINATION_TYPES

    p = subparsers.add_parser(
        "merge", help="write a standalone merged model, or combine adapters into one",
        description="With --adapter: W' = W + delta(W) for every adapted layer; the result loads with plain "
                    "transformers, no deltatune or peft needed. With --adapters: a new LoRA adapter that combines "
                    "them (task arithmetic, TIES, DARE, SVD...), loadable by deltatune and peft.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--adapter", help="adapter directory to fold into its base model")
    which.add_argument("--adapters", nargs="+", metavar="DIR", help="LoRA adapter directories to combine")
    p.add_argument("--output-dir", required=True, help="where the result goes (must not exist, or --overwrite)")
    p.add_argument("--model", help="base model (default: the one the (first) adapter names)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the saved weights of a merged model (with --requantize: of the dense layers "
                        "and the compute)")
    p.add_argument("--quantize", choices=[*options_mod.QUANTIZE_CHOICES, "none"],
                   help="the base the adapter was trained on (default: as its training run says)")
    p.add_argument("--requantize", choices=options_mod.QUANTIZE_CHOICES,
                   help="--adapter: quantise the merged model again (bitsandbytes) and write it quantised; costs "
                        "that format's rounding of the merged weights, which the printed merge error includes")
    p.add_argument("--overwrite", action="store_true")
    g = p.add_argument_group("combining adapters (--adapters)")
    g.add_argument("--weights", nargs="+", type=float, metavar="W",
                   help="one weight per adapter, negative to subtract (default: 1/n each)")
    g.add_argument("--how", choices=COMBINATION_TYPES, default="svd",
                   help="combination type, as PEFT's combination_type (default: svd)")
    g.add_argument("--density", type=float, help="fraction of entries kept by ties / dare_* / magnitude_prune")
    g.add_argument("--majority-sign-method", choices=["total", "frequency"], default="total",
                   help="sign election of ties / dare_ties")
    g.add_argument("--svd-rank", type=int, help="rank of an *svd combination (default: the largest source rank)")
    g.add_argument("--svd-clamp", type=float, help="clamp the SVD factors to this quantile of their entries")
    g.add_argument("--svd-from-factors", action="store_true",
                   help="--how svd only: SVD of the stacked LoRA factors instead of the dense update (same result "
                        "up to rounding, much faster on large layers)")
    g.add_argument("--seed", type=int, default=0, help="torch seed for the random DARE drop (default: 0)")
    g.add_argument("--merge-into-base", action="store_true",
                   help="write a standalone model with the combination folded in, not an adapter")
    p.set_defaults(handler=main)


def probe_inputs(tokenizer, max_tokens: int = 24) -> torch.Tensor:
    """``(4, n)`` token ids of :data:`PROBE_TEXTS`, cut to the shortest so no padding is needed."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in PROBE_TEXTS]
    n = min(len(r) for r in rows)
    return torch.tensor([r[:n] for r in rows])


def _check_output(args: argparse.Namespace) -> str:
    """The output directory, checked before any loading (and bitsandbytes, where ``--requantize`` needs it)."""
    out = os.path.abspath(args.output_dir)
    loading.check_quantize(args.requantize)  # bitsandbytes present for --requantize: known before any loading
    _refuse_overlap(out, args)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--output-dir {args.output_dir} is a file; pass a directory")
    if os.path.exists(out) and os.listdir(out) and not args.overwrite:
        raise UsageError(f"--output-dir {args.output_dir} exists and is not empty; pass --overwrite or another "
                         "directory")
    return out


def _inputs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(flag, directory)`` for every directory the merge reads: the adapters and the base model (``--model``,
    else the local base directory an adapter names)."""
    found = [("--adapter", args.adapter)] if args.adapter else [("--adapters", d) for d in args.adapters or []]
    if args.model:
        found.append(("--model", args.model))
    else:
        for _, d in list(found):
            base = loading.recorded_base(d, common.read_json(os.path.join(d, common.RUN_CONFIG_NAME))) \
                if os.path.isdir(d) else None
            if base and os.path.isdir(base):
                found.append(("the base model", base))
    return [(flag, d) for flag, d in found if os.path.exists(d)]


def _refuse_overlap(out: str, args: argparse.Namespace) -> None:
    """An output directory that is, holds, or lies inside an input would be written over what the merge reads
    (and ``--overwrite`` would replace its files): refuse it before anything is read or written."""
    real_out = os.path.realpath(out)
    for flag, d in _inputs(args):
        real_in = os.path.realpath(d)
        if real_out == real_in:
            how = "is"
        elif real_out.startswith(real_in.rstrip(os.sep) + os.sep):
            how = "is inside"
        elif real_in.startswith(real_out.rstrip(os.sep) + os.sep):
            how = "holds"
        else:
            continue
        what = d if flag == "the base model" else f"{flag} {d}"
        raise UsageError(f"--output-dir {args.output_dir} {how} {what}, which the merge reads; write the result to "
                         "a directory of its own")


# What a merge writes (a model: weights, shards and their index, config, generation config, tokenizer; a combined
# adapter: its two files and run_config.json). With --overwrite these, and only these, are replaced: an earlier
# merge's shards must not sit beside the new weights, and nothing else in the directory is the merge's to delete.
_OUTPUT_FILE = re.compile(
    r"(config\.json|generation_config\.json|(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)"
    r"|(model\.safetensors|pytorch_model\.bin)\.index\.json"
    r"|tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)"
    r"|merges\.txt|spiece\.model|sentencepiece\.bpe\.model|chat_template\.(jinja|json)"
    r"|adapter_config\.json|adapter_model\.(safetensors|bin)|" + re.escape(common.RUN_CONFIG_NAME) + ")")


def _is_merge_output(name: str) -> bool:
    return _OUTPUT_FILE.fullmatch(name) is not None


def _write_dir(out: str, write: Callable[[str], None]) -> int:
    """Run ``write(tmp)`` on a temporary directory beside ``out``, then move its files into ``out``: a failure
    leaves no half-written output (and an existing ``out`` as it was). Into an existing ``out`` (``--overwrite``)
    only the merge's own files are replaced (:data:`_OUTPUT_FILE`); anything else there stays. Returns the bytes
    written."""
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-merge-", dir=parent)
    try:
        write(tmp)
        written = sorted(os.listdir(tmp))
        size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(tmp) for f in files)
        if not os.path.exists(out):
            os.replace(tmp, out)
            return size
        # README.md: save_pretrained's model card, written over a copy of the one in ``out`` (see the combine's
        # write), so replacing it keeps the user's text.
        clash = [f for f in written if os.path.isdir(os.path.join(out, f))
                 or (os.path.exists(os.path.join(out, f)) and not _is_merge_output(f) and f != "README.md")]
        if clash:  # e.g. a tokenizer file of a kind the list does not know, over a file of the user's
            raise UsageError(f"--output-dir {out} already holds {', '.join(clash)}, which this merge would write "
                             "over; choose an empty --output-dir")
        for name in written:
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
        for name in os.listdir(out):  # an earlier merge's files this one did not write (its other shards...)
            if name not in written and _is_merge_output(name) and os.path.isfile(os.path.join(out, name)):
                os.unlink(os.path.join(out, name))
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and is_disk_full(exc):
            full = DiskFullError(out, getattr(exc, "errno", None))
            full.strerror = (f"no space left on device writing {out}; nothing was written there: free some space "
                             "on that disk (or pass an --output-dir on another one) and run the merge again")
            raise full from None
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return size


def _save_model(merged, tokenizer) -> Callable[[str], None]:
    """The writer of a standalone model directory: weights (safetensors), config and tokenizer."""

    def write(tmp: str) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return write


def main(args: argparse.Namespace) -> int:
    if args.adapters:
        return combine(args)
    extra = [f for f in ("weights", "density", "svd_rank", "svd_clamp") if getattr(args, f) is not None]
    if extra or args.merge_into_base:
        flags = ", ".join("--" + f.replace("_", "-") for f in extra + (["merge_into_base"] * args.merge_into_base))
        raise UsageError(f"{flags} combine several adapters: use --adapters DIR1 DIR2 ... instead of --adapter")
    out = _check_output(args)
    model, tokenizer, spec, _, run = loading.load_with_adapter(args.adapter, args.model, torch.device("cpu"),
                                                              args.quantize)
    return _fold_and_write(model, tokenizer, out, args, loading.run_quantize(run, args.quantize),
                           f"{args.adapter} into {spec.name}")


def _fold_and_write(model, tokenizer, out: str, args: argparse.Namespace, base_quant: str | None, what: str) -> int:
    """Fold the active adapter of ``model`` into its base, write the standalone model to ``out``, and print
    the merge error (merged vs unmerged logits on :data:`PROBE_TEXTS`)."""
    from deltatune.quantization import bnb_config, merge_and_report

    dtype = getattr(torch, args.dtype)
    inputs = probe_inputs(tokenizer)
    # Dense: layers no adapter touched are dequantised too, so the written model is plain transformers.
    merged, report = merge_and_report(model, inputs, requantize=args.requantize, dense=True, dtype=dtype)
    if args.requantize:  # so that from_pretrained loads the packed weights back as bitsandbytes layers
        head = [n for n, m in merged.named_modules() if type(m) is torch.nn.Linear]  # left dense by quantize
        merged.config.quantization_config = bnb_config(args.requantize, double_quant=True, compute_dtype=dtype,
                                                       skip_modules=head)

    size = _write_dir(out, _save_model(merged, tokenizer))  # merge_and_report already applied --dtype
    base = f" ({base_quant} base, dequantised)" if base_quant else ""
    form = f"{args.requantize}-quantised, compute {args.dtype}" if args.requantize else args.dtype
    print(f"merged {what}{base}: wrote {out} ({human_bytes(size)}, {form}); load it with transformers' "
          "from_pretrained")
    print(f"merge error vs the unmerged model on {inputs.shape[0]} inputs of {inputs.shape[1]} tokens: "
          f"max |logit diff| {report['max_abs_diff']:.3g}, mean {report['mean_abs_diff']:.3g}")
    return 0


def combine(args: argparse.Namespace) -> int:
    """``--adapters``: load every adapter onto one base, ``add_weighted_adapter``, save the result."""
    from deltatune import PeftModel
    from deltatune.lora.conversion import expects_rewritten_base

    dirs = list(args.adapters)
    weights = args.weights if args.weights is not None else [1.0 / len(dirs)] * len(dirs)
    if len(weights) != len(dirs):
        raise UsageError(f"--weights has {len(weights)} values for {len(dirs)} --adapters; give one per adapter")
    if not args.merge_into_base:
        # The combination is computed from the LoRA factors alone; the base (and its quantisation) only
        # matters when the result is folded into it.
        given = [f for f in ("quantize", "requantize") if getattr(args, f) is not None]
        if given:
            raise UsageError(f"{', '.join('--' + f for f in given)} apply to a merged model: add "
                             "--merge-into-base (the combined adapter itself does not depend on the base's format)")
    out = _check_output(args)
    spec, labels, run = loading.adapter_base_and_labels(dirs[0], args.model)
    if args.model is None:  # every adapter must expect the same base, or the sum means nothing
        for d in dirs[1:]:
            other, _, _ = loading.adapter_base_and_labels(d, None)
            if other.name != spec.name:
                raise UsageError(f"{dirs[0]} expects base {spec.name} but {d} expects {other.name}; combine "
                                 "adapters trained on the same base (or pass --model to force one)")
    for d in dirs:
        config = loading.check_adapter_dir(d, "--adapters")
        peft_type = config.get("peft_type")
        if str(peft_type).upper() != "LORA":
            raise UsageError(f"{d} is a {peft_type} adapter; --adapters combines LoRA adapters only")
        init = config.get("init_lora_weights")
        if len(dirs) > 1 and expects_rewritten_base(init):
            # Loading it rewrites the base: a second load would rewrite the already rewritten base, and the sources
            # would not share one base.
            raise UsageError(f"{d} was initialised with init_lora_weights={init!r} and saved as created, so it works "
                             "on its own rewritten base only; save it with path_initial_model_for_weight_conversion "
                             "(a plain LoRA for the original base; deltatune train does) before combining it")
        loading.check_adapter_weights(d)
    base, tokenizer = loading.load_model(spec, labels=labels or run.get("labels"), device=torch.device("cpu"))
    base_quant = loading.run_quantize(run, args.quantize) if args.merge_into_base else None
    base = loading.quantize_base(base, base_quant)  # the base the adapters were trained on (QLoRA), to fold into
    names = [f"source_{i}" for i in range(len(dirs))]
    model = PeftModel.from_pretrained(base, dirs[0], adapter_name=names[0])
    for name, d in zip(names[1:], dirs[1:]):
        model.load_adapter(d, adapter_name=name)
    torch.manual_seed(args.seed)  # the DARE types draw their drop masks from torch's global RNG
    model.add_weighted_adapter(names, weights, COMBINED, combination_type=args.how, svd_rank=args.svd_rank,
                               svd_clamp=args.svd_clamp, density=args.density,
                               majority_sign_method=args.majority_sign_method,
                               svd_from_factors=args.svd_from_factors)
    model.set_adapter(COMBINED)
    what = f"{len(dirs)} adapters ({args.how}, weights {weights})"
    if args.merge_into_base:
        for name in names:
            model.delete_adapter(name)
        return _fold_and_write(model, tokenizer, out, args, base_quant, f"{what} into {spec.name}")

    def write(tmp: str) -> None:
        if os.path.isfile(os.path.join(out, "README.md")):  # the model card updates the user's (PEFT's rules)
            shutil.copyfile(os.path.join(out, "README.md"), os.path.join(tmp, "README.md"))
        model.save_pretrained(tmp, selected_adapters=[COMBINED])
        if run:  # keep what `deltatune eval/generate` read (base, labels, template), and say where it came from
            record = dict(run, combined_from={"adapters": [os.path.abspath(d) for d in dirs], "weights": weights,
                                              "how": args.how, "density": args.density})
            with open(os.path.join(tmp, common.RUN_CONFIG_NAME), "w", encoding="utf-8") as fh:
                json.dump(record, fh, indent=2)

    size = _write_dir(out, write)
    print(f"combined {what}: wrote adapter {out} (r={model.peft_config[COMBINED].r}, {human_bytes(size)}); "
          "load it with PeftModel.from_pretrained (deltatune or peft)")
    return 0
