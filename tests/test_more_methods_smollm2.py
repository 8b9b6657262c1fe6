"""LN tuning, BitFit, trainable tokens, LoRA + trainable_token_indices, bottleneck adapters and the weight methods of
issue 22 (HiRA, SHiRA, MiSS, Lily, HRA, C3A) on a real model (SmolLM2-135M, whose output layer is tied to its input
embedding).

Per method: a few AdamW steps on short sentences of one pattern lower the loss on *held-out* sentences of the
same pattern; the adapter reloads with the same logits (in PEFT for the methods PEFT has, else in deltatune).
"""

from __future__ import annotations

import gc

import pytest
import torch
from support.smollm2 import load_smollm2, smollm2_with_texts

from deltatune import (
    BitFitConfig,
    BottleneckConfig,
    C3AConfig,
    HiraConfig,
    HRAConfig,
    LilyConfig,
    LNTuningConfig,
    LoraConfig,
    MissConfig,
    PeftModel,
    ShiraConfig,
    TrainableTokensConfig,
    get_peft_model,
)

TRAIN = [f"Order {n}: {n} red apples, shipped on Monday." for n in (3, 8, 15, 21)]
HELD_OUT = [f"Order {n}: {n} red apples, shipped on Monday." for n in (5, 12)]


QVD = ["q_proj", "v_proj", "down_proj"]
CASES = [  # (id, config factory(train token ids), lr, steps, in peft)
    ("ln_tuning", lambda ids: LNTuningConfig(task_type="CAUSAL_LM"), 1e-2, 4, True),
    ("bitfit", lambda ids: BitFitConfig(target_modules=["q_proj", "v_proj", "down_proj"]), 1e-2, 4, False),
    ("trainable_tokens", lambda ids: TrainableTokensConfig(token_indices=ids), 1e-2, 4, True),
    ("lora_tokens", lambda ids: LoraConfig(r=4, target_modules=["q_proj", "v_proj"], trainable_token_indices=ids,
                                           task_type="CAUSAL_LM"), 3e-3, 4, True),
    ("bottleneck", lambda ids: BottleneckConfig(reduction_factor=64), 3e-3, 4, False),
    # issue 22's weight methods, on the layers LoRA's recipes adapt (q/v/down_proj: widths 576, 192, 1536)
    ("hira", lambda ids: HiraConfig(r=4, target_modules=QVD, task_type="CAUSAL_LM"), 1e-2, 4, True),
    ("shira", lambda ids: ShiraConfig(r=4, target_modules=QVD, random_seed=0, task_type="CAUSAL_LM"), 1e-3, 4, True),
    ("miss", lambda ids: MissConfig(r=16, target_modules=QVD, task_type="CAUSAL_LM"), 1e-3, 4, True),
    ("lily", lambda ids: LilyConfig(r=4, target_modules=QVD, task_type="CAUSAL_LM"), 3e-3, 4, True),
    ("hra", lambda ids: HRAConfig(r=4, target_modules=QVD, task_type="CAUSAL_LM"), 3e-3, 4, True),
    ("c3a", lambda ids: C3AConfig(block_size=64, init_weights=True, target_modules=QVD, task_type="CAUSAL_LM"),
     3e-2, 4, True),
]


@pytest.mark.slow
@pytest.mark.parametrize("case_id, make_config, lr, steps, in_peft", CASES, ids=[c[0] for c in CASES])
def test_method_lowers_held_out_loss_and_reloads(case_id, make_config, lr, steps, in_peft, tmp_path):
    base, tok, (train, train_labels), (held, held_labels) = smollm2_with_texts(TRAIN, HELD_OUT)
    ids = sorted(set(train["input_ids"].flatten().tolist()))
    model = get_peft_model(base, make_config(ids))

    def held_out_loss(model) -> float:
        model.eval()
        with torch.no_grad():
            return model(**held, labels=held_labels).loss.item()

    start = held_out_loss(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**train, labels=train_labels).loss.backward()
        opt.step()
    end = held_out_loss(model)
    assert end < start - 0.05, f"{case_id}: held-out loss went {start:.4f} -> {end:.4f}"

    with torch.no_grad():
        expected = model(**held).logits
    model.save_pretrained(tmp_path)
    del model, base, opt
    gc.collect()
    fresh = load_smollm2()[0]
    if in_peft:  # one reload per test (each load costs seconds): in PEFT where it has the method
        import peft

        loaded, atol = peft.PeftModel.from_pretrained(fresh, tmp_path).eval(), 1e-4
    else:
        loaded, atol = PeftModel.from_pretrained(fresh, tmp_path), 1e-5
    with torch.no_grad():
        torch.testing.assert_close(loaded(**held).logits, expected, atol=atol, rtol=atol)


@pytest.mark.slow
def test_adamss_with_asa_lowers_held_out_loss_and_reloads_in_peft(tmp_path):
    """AdaMSS (R=32, PEFT's 5 subspaces of rank 1) on q/v_proj with ASA pruning during the steps:
    the held-out loss falls, subspaces are frozen, and peft reloads the adapter with the same logits."""
    from deltatune import AdamssConfig
    from deltatune.adamss import asa, asa_layers

    base, tok, (train, train_labels), (held, held_labels) = smollm2_with_texts(TRAIN, HELD_OUT)
    config = AdamssConfig(r=32, target_modules=["q_proj", "v_proj"], use_asa=True, asa_target_subspaces=100,
                          init_warmup=1, final_warmup=3, mask_interval=1, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)

    def held_out_loss(model) -> float:
        model.eval()
        with torch.no_grad():
            return model(**held, labels=held_labels).loss.item()

    start = held_out_loss(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(4):
        model(**train, labels=train_labels).loss.backward()
        opt.step()
        model.update_and_allocate(step)  # PEFT's step index, as its AdamssAsaCallback passes it
        opt.zero_grad()
    end = held_out_loss(model)
    assert end < start - 0.05, f"adamss: held-out loss went {start:.4f} -> {end:.4f}"
    layers = asa_layers(model.base_model, "default")
    assert asa.active_subspaces(layers, "default") < 5 * len(layers)  # 300 subspaces, 99 left trainable

    with torch.no_grad():
        expected = model(**held).logits
    model.save_pretrained(tmp_path)
    del model, base, opt, layers
    gc.collect()
    import peft

    loaded = peft.PeftModel.from_pretrained(load_smollm2()[0], tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**held).logits, expected, atol=1e-4, rtol=1e-4)
