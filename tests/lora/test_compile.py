"""torch.compile of a LoRA training step: the custom autograd nodes trace and train like eager.

``aot_eager`` runs TorchDynamo's capture and AOTAutograd (what breaks on custom autograd functions) without
Inductor's code generation, which takes minutes on a 2-core CPU; Inductor was checked by hand to give the
same losses.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt


def _losses(compiled: bool, **lora_kwargs) -> list[float]:
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2))
    model = dt.get_peft_model(base, dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                                  **lora_kwargs))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))

    def forward_backward() -> torch.Tensor:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    step = torch.compile(forward_backward, backend="aot_eager", fullgraph=False) if compiled else forward_backward
    losses = []
    for _ in range(3):
        losses.append(step().item())
        opt.step()
        opt.zero_grad()
    return losses


@pytest.mark.parametrize("lora_kwargs", [{}, {"use_dora": True}], ids=["lora", "dora"])
def test_compiled_training_step_matches_eager(lora_kwargs):
    torch._dynamo.reset()
    eager = _losses(False, **lora_kwargs)
    compiled = _losses(True, **lora_kwargs)
    assert eager[-1] < eager[0]  # it trains
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), atol=1e-5, rtol=1e-5)
