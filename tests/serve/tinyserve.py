"""A tiny Llama (config only, random weights) with the shipped SmolLM2 tokenizer, and adapters of several methods
and ranks saved next to it: what tests/serve and bench/serve start the server on. No downloads."""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from deltatune.builtin.models import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))


def make_base(directory: str, seed: int = 0, hidden: int = 32) -> str:
    """Save a 2-layer random Llama (hidden ``hidden``) with SmolLM2's tokenizer (and chat template) to ``directory``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
                         architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(config)
    # Larger weights than the init's: greedy decoding then follows clear maxima, not near-ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_adapter(base_dir: str, out_dir: str, config, seed: int) -> str:
    """Apply ``config`` to the base, set its adapter tensors to random values (so it changes outputs), save."""
    from transformers import AutoModelForCausalLM

    from deltatune import get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(p + torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(out_dir)
    return out_dir


def make_adapters(base_dir: str, root: str) -> dict[str, str]:
    """Four adapters under ``root``: LoRA r=4 and r=8 (different targets), DoRA, IA3."""
    from deltatune import IA3Config, LoraConfig

    configs = {
        "lora-r4": LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        "lora-r8": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj", "down_proj"]),
        "dora": LoraConfig(r=2, use_dora=True, target_modules=["k_proj", "up_proj"]),
        "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    }
    return {name: save_adapter(base_dir, os.path.join(root, name), cfg, seed=i)
            for i, (name, cfg) in enumerate(configs.items())}
