"""frod: five AdamW steps at lr 1e-3 on a tiny LLaMA from the same start train as peft's (the same losses), so the
forgetting `deltatune compare` measured for it at the shared learning rate (README, issue 22's table) is the
method's at that step size, not a bug of this implementation."""

from __future__ import annotations

import peft
from support.training_parity import TARGETS, assert_trains_as_peft, swap_key_parts

from deltatune import FrodConfig


def test_five_adamw_steps_give_pefts_losses():
    config = dict(target_modules=TARGETS)
    # the shared bases and sparse positions: frod_V.<adapter>.<category> here, frod_V.<category>.<adapter> in peft
    assert_trains_as_peft(FrodConfig(**config), peft.FrodConfig(**config),
                          rename=swap_key_parts(r"(frod_V|frod_s_indices|frod_s_size)\.(\w+)\.(\w+)"))
