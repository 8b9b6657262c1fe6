"""Training parity with peft: the same tiny LLaMA, the same adapter tensors, the same batches and AdamW, and the
two libraries' loss trajectories must agree step by step.

A layer test on fixed tensors checks one forward and backward; this checks what a training run sees over several
optimizer steps (which tensors train, their gradients, how the update feeds back into the next forward), so a
method that misbehaves in `deltatune compare` can be told apart from one whose maths is PEFT's.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import peft
import torch

import deltatune

from .models import VOCAB, tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batches(steps: int) -> list[dict[str, torch.Tensor]]:
    """``steps`` seeded language-modelling batches: input_ids (2, 9), labels = input_ids."""
    g = torch.Generator().manual_seed(321)
    out = []
    for _ in range(steps):
        ids = torch.randint(3, VOCAB, (2, 9), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def _train(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], lr: float) -> list[float]:
    """AdamW (torch's defaults, weight decay 0.01) on the trainable tensors; the loss before each step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def assert_trains_as_peft(ours_config: deltatune.PeftConfig, theirs_config: peft.PeftConfig, steps: int = 5,
                          lr: float = 1e-3, rename: Callable[[str], str] = lambda key: key) -> list[float]:
    """Train deltatune's and peft's adapter from the same start for ``steps`` AdamW steps at ``lr``.

    Both wrap copies of one seeded tiny LLaMA; peft's model then takes deltatune's whole state (adapter tensors
    and the buffers derived at init, so a random draw or a decomposition cannot differ), key by key
    (``rename`` maps a deltatune key to peft's where the two spell a container differently). The same trainable
    names, the same initial loss and the same loss after every step (to float32 rounding) are asserted.
    Returns deltatune's losses.
    """
    base = tiny_llama()
    ours = deltatune.get_peft_model(copy.deepcopy(base), ours_config)
    theirs = peft.get_peft_model(base, theirs_config)
    state = {rename(k): v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(state, strict=True)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert {rename(n) for n in trainable} == {n for n, p in theirs.named_parameters() if p.requires_grad}
    batches = _batches(steps)
    got, want = _train(ours, batches, lr), _train(theirs, batches, lr)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)
    assert got[-1] != got[0], "the adapter did not train"
    return got


def swap_key_parts(pattern: str) -> Callable[[str], str]:
    """A ``rename`` for a container keyed ``<adapter>.<name>`` here and ``<name>.<adapter>`` in peft:
    ``swap_key_parts(r"(frod_V)\\.(\\w+)\\.(\\w+)")`` maps ``frod_V.default.q`` to ``frod_V.q.default``."""
    regex = re.compile(pattern)
    return lambda key: regex.sub(r"\1.\3.\2", key)
