"""Tiny random models, a tokenizer trained in-process, and small data files: no downloads.

Shared by tests/training, tests/cli, tests/distributed and tests/integrations (``from support import tinymodels``).
"""

from __future__ import annotations

import csv
import json
import os
import random

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

TOPICS = {
    "sport": ["the team won the match", "a goal in the final minute", "the coach praised the players",
              "the striker scored twice", "fans cheered the cup win"],
    "tech": ["the new phone has a faster chip", "software update fixes bugs", "the computer network was hacked",
             "a startup built an app", "the laptop battery lasts longer"],
    "politics": ["the minister announced a vote", "parliament debated the bill", "the election campaign began",
                 "the party leader gave a speech", "voters went to the polls"],
}


def corpus() -> list[str]:
    texts = [s for sents in TOPICS.values() for s in sents]
    texts += ["what is your name? my name is bot.", "how are you? i am fine, thank you.",
              "<|user|>hello</s><|assistant|>hi there</s>", "Question: which of these labels fits the text above:",
              "Answer: sport tech politics", "Article: Question: is this news article about"]
    return texts


def make_tokenizer():
    """A byte-level BPE tokenizer (~300 tokens) trained on :func:`corpus`, with BOS/EOS/PAD and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<|user|>",
                                                                 "<|assistant|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=["<|user|>", "<|assistant|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_llama(directory: str, seed: int = 0) -> str:
    """Save a 2-layer random Llama (hidden 32) and its tokenizer to ``directory``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_bert(directory: str, seed: int = 0) -> str:
    """Save a 2-layer random BERT encoder (no head, like all-MiniLM) and a tokenizer to ``directory``."""
    from transformers import BertConfig, BertModel

    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def classification_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = list(TOPICS)[i % len(TOPICS)]
        out.append({"text": " and ".join(rng.sample(TOPICS[label], 2)), "label": label})
    return out


def write_jsonl(path: str, records: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return path


def write_csv(path: str, records: list[dict]) -> str:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def write_text(path: str, paragraphs: list[str]) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n\n".join(paragraphs) + "\n")
    return path


def prompt_records(n: int) -> list[dict]:
    pairs = [("what is your name?", " my name is bot."), ("how are you?", " i am fine, thank you.")]
    return [{"prompt": pairs[i % 2][0], "completion": pairs[i % 2][1]} for i in range(n)]


def chat_records(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
                          {"role": "user", "content": "how are you?"},
                          {"role": "assistant", "content": "i am fine"}]} for _ in range(n)]


def listdir(path: str) -> list[str]:
    return sorted(os.listdir(path)) if os.path.isdir(path) else []
