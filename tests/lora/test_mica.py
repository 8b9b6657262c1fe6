"""``init_lora_weights="mica"`` (MiCA): B = the base weight's minor left singular vectors (frozen), A = 0, equal to
PEFT's initialisation on the same base; only A trains; files cross both ways."""

from __future__ import annotations

import peft
import pytest
import torch
from support.models import make_inputs, output, tiny_gpt2, tiny_llama

from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.errors import ConfigError

TARGETS = ["q_proj", "v_proj", "embed_tokens"]


def _lora_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


@pytest.mark.parametrize("factory,targets", [(tiny_llama, TARGETS), (tiny_gpt2, ["c_attn", "wte"])],
                         ids=["llama", "gpt2-conv1d"])
def test_mica_init_equals_peft(factory, targets) -> None:
    ours = get_peft_model(factory(), LoraConfig(r=4, target_modules=targets, init_lora_weights="mica"))
    theirs = peft.get_peft_model(factory(), peft.LoraConfig(r=4, target_modules=targets, init_lora_weights="mica"))
    mine, ref = _lora_tensors(ours), _lora_tensors(theirs)
    assert set(mine) == set(ref) and mine
    for k in ref:
        torch.testing.assert_close(mine[k], ref[k], atol=1e-5, rtol=1e-5)  # singular vectors: same LAPACK call
        if "_A" in k:
            assert not mine[k].any()  # A = 0: the model is unchanged
    w = factory().state_dict()
    q = "model.layers.0.self_attn.q_proj.weight" if factory is tiny_llama else "transformer.h.0.attn.c_attn.weight"
    key = next(k for k in mine if ".0." in k and ("q_proj" in k or "c_attn" in k) and "lora_B" in k)
    base = w[q] if factory is tiny_llama else w[q].T
    u = torch.linalg.svd(base, full_matrices=False)[0]
    torch.testing.assert_close(mine[key], u[:, -4:])  # the minor components, not the principal ones
    inputs = make_inputs("llama" if factory is tiny_llama else "gpt2")
    torch.testing.assert_close(output(ours, inputs), output(factory(), inputs))


def test_only_a_trains_and_it_stays_so(tmp_path) -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="mica"))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="mica"))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    assert trainable and all("lora_A" in n or "lora_embedding_A" in n for n in trainable)
    b_before = {k: v.clone() for k, v in _lora_tensors(model).items() if "_B" in k}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    model.train()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    after = _lora_tensors(model)
    assert all(torch.equal(after[k], v) for k, v in b_before.items())  # B frozen
    assert any(after[k].abs().max() > 0 for k in after if "_A" in k)  # A moved
    model.base_model.set_adapter("default")  # switching adapters must not unfreeze B
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == trainable

    # Files cross both ways with equal outputs; a loaded trainable MiCA adapter keeps B frozen (as PEFT's).
    inputs = make_inputs("llama")
    expected = output(model, inputs)
    model.save_pretrained(tmp_path / "ours")
    loaded_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(output(loaded_peft, inputs), expected, atol=1e-5, rtol=1e-5)
    loaded_peft.save_pretrained(tmp_path / "theirs")
    back = PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs", is_trainable=True)
    torch.testing.assert_close(output(back, inputs), expected, atol=1e-5, rtol=1e-5)
    assert sorted(n for n, p in back.named_parameters() if p.requires_grad) == trainable


def test_mica_rank_too_large_refused() -> None:
    with pytest.raises(ConfigError, match=r"mica.*r <= min\(in, out\)"):
        get_peft_model(tiny_llama(), LoraConfig(r=40, target_modules=["q_proj"], init_lora_weights="mica"))
