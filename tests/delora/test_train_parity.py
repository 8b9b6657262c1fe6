"""delora: five AdamW steps at lr 1e-3 on a tiny LLaMA from the same start train as peft's (the same losses), so the
forgetting `deltatune compare` measured for it at the shared learning rate (README, issue 22's table) is the
method's at that step size, not a bug of this implementation."""

from __future__ import annotations

import peft
from support.training_parity import TARGETS, assert_trains_as_peft

from deltatune import DeloraConfig


def test_five_adamw_steps_give_pefts_losses():
    config = dict(target_modules=TARGETS, r=4)
    assert_trains_as_peft(DeloraConfig(**config), peft.DeloraConfig(**config))
