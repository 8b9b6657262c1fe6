"""Tiny LoRA experts on disk for X-LoRA tests: folders written by deltatune or by peft, for the tiny Llama."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import warnings

import torch
from support.models import tiny_llama

_ROOT: str | None = None


def write_experts(root: str, n: int = 2, library: str = "deltatune", targets: tuple[str, ...] = ("q_proj", "v_proj"),
                  r: int = 2) -> dict[str, str]:
    """``n`` LoRA experts (random, non-zero ``A`` and ``B``: ``init_lora_weights=False``, seeds ``10 + i``) saved by
    ``library`` ("deltatune" or "peft") under ``root/e<i>``; returns PEFT's ``adapters`` dict ``{"0": dir, ...}``."""
    import peft

    import deltatune

    lib = deltatune if library == "deltatune" else peft
    out = {}
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(n):
            torch.manual_seed(10 + i)
            config = lib.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False)
            model = lib.get_peft_model(tiny_llama(), config)
            torch.manual_seed(20 + i)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_" in name:
                        p.copy_(torch.randn_like(p) * 0.3)
            out[str(i)] = f"{root}/e{i}"
            model.save_pretrained(out[str(i)])
    return out


def contract_experts() -> dict[str, str]:
    """Two deltatune experts on q/v and the embedding, written once per test process (the contract row's)."""
    global _ROOT
    if _ROOT is None:
        _ROOT = tempfile.mkdtemp(prefix="deltatune-xlora-")
        atexit.register(shutil.rmtree, _ROOT, True)
        write_experts(_ROOT, targets=("q_proj", "v_proj", "embed_tokens"))
    return {"0": f"{_ROOT}/e0", "1": f"{_ROOT}/e1"}
