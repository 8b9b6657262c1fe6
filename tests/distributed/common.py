"""What the distributed tests and their torchrun worker share: the tiny model, data and run settings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torchrun runs worker.py as a script, without pytest's pythonpath: put tests/ last on the path (last, so its
# folders named like packages, tests/bottleneck, shadow nothing).
_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.append(_TESTS)

from support import tinymodels  # noqa: E402

from deltatune import LoraConfig, get_peft_model  # noqa: E402
from deltatune.training.data import Encoder  # noqa: E402
from deltatune.training.trainer import TrainConfig  # noqa: E402

WORLD = 2
GLOBAL_BATCH = 4  # 2 ranks x 2 examples, or 1 process x 4
N_EXAMPLES = 10  # 3 micro-batches per epoch, the last one ragged: rank 1 gets nothing there
STOP_AT = 3


def peft_model(llama_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))


def examples(llama_dir: str) -> list[dict]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    records = tinymodels.prompt_records(N_EXAMPLES)
    for i, r in enumerate(records):  # vary lengths so padding differs between per-rank and global batches
        r["prompt"] = "the team won " * (i % 3) + r["prompt"]
    return Encoder(tok, "prompt", 64)(records)


def config(out: str, batch_size: int) -> TrainConfig:
    return TrainConfig(output_dir=out, max_steps=6, batch_size=batch_size, grad_accum=2, lr=5e-3, warmup_ratio=0.2,
                       save_steps=0, seed=1, precision="fp32", progress=False)
