"""``deltatune generate``: text from a base model plus an adapter; the prompt is an argument or stdin."""

from __future__ import annotations

import argparse
import sys

import torch

from deltatune.cli import loading
from deltatune.cli import options as options_mod
from deltatune.cli.common import UsageError
from deltatune.registry import task_count


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text with a base model plus an adapter",
                              description="Continue a prompt (argument, or stdin when absent or '-').")
    p.add_argument("prompt", nargs="?", help="the prompt; read from stdin when absent or '-'")
    p.add_argument("--adapter", help="adapter directory (default: none, the base model alone)")
    p.add_argument("--model", help="base model (default: the one the adapter names, else smollm2-135m)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus mass kept (default 1: all)")
    p.add_argument("--top-k", type=int, default=0, help="sampling: keep the k likeliest tokens (default 0: all)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (default 1: none)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the scores of tokens already present by this (default 1: off)")
    p.add_argument("--num-return-sequences", type=int, default=1,
                   help="how many continuations to print (sampled, or the best beams; default 1)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--raw", action="store_true",
                   help="use the prompt as it is, not in the prompt template the adapter was trained with")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task-id", type=int, default=None,
                   help="adapters with tasks (multitask prompt tuning, Poly): which task to run (default 0, the "
                        "one `train` trains)")
    p.add_argument("--quantize", choices=[*options_mod.QUANTIZE_CHOICES, "none"],
                   help="hold the base in nf4/fp4/int8 via bitsandbytes (default: as the adapter was trained)")
    p.add_argument("--device", default="auto")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt is None or prompt == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("no prompt: pass it as an argument or pipe it on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    for flag, value, low in (("--num-beams", args.num_beams, 1), ("--top-k", args.top_k, 0),
                             ("--num-return-sequences", args.num_return_sequences, 1)):
        if value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.repetition_penalty <= 0:
        raise UsageError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    if args.num_return_sequences > 1 and args.temperature == 0 and args.num_return_sequences > args.num_beams:
        raise UsageError(f"--num-return-sequences {args.num_return_sequences} needs sampling (--temperature > 0) "
                         f"or at least as many --num-beams; greedy decoding has one answer")
    device = loading.pick_device(args.device)
    model, tokenizer, spec, _, run = loading.load_with_adapter(args.adapter, args.model, device, args.quantize)
    template = run.get("template") or ""
    if run.get("data_format") == "prompt" and "{prompt}" in template and not (args.raw or args.chat):
        prompt = template.replace("{prompt}", prompt)  # e.g. "User: {prompt}\nBot:" for chatterbot
    if spec.kind != "causal":
        raise UsageError(f"{spec.name} is an encoder with a classification head; it cannot generate text "
                         "(use `deltatune eval` for it)")
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("--chat: this model's tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(device)
    torch.manual_seed(args.seed)
    sampling = args.temperature > 0
    kwargs = {"do_sample": sampling, "max_new_tokens": args.max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
              "num_beams": args.num_beams, "num_return_sequences": args.num_return_sequences,
              "repetition_penalty": args.repetition_penalty}
    if sampling:
        kwargs.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or None)
    else:  # greedy or beam search: silence the sampling defaults some generation configs carry
        kwargs.update(temperature=None, top_p=None, top_k=None)
    configs = getattr(model, "peft_config", {}) or {}
    if task_count(configs.values()):
        kwargs["task_ids"] = torch.tensor([args.task_id or 0], device=device)
    elif args.task_id is not None:
        raise UsageError("--task-id is for adapters that route by task (multitask prompt tuning, Poly); this "
                         "adapter has no tasks")
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    texts = [tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out]
    if len(texts) == 1:
        print(texts[0])
    else:
        for i, text in enumerate(texts, start=1):
            print(f"--- {i}\n{text}")
    return 0
