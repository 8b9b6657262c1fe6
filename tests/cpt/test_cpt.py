"""CPT against PEFT 0.21.2 and against its formulas, on the tiny Llama (hidden 32, vocab 100).

The context ``[5, 6, 7, 8, 9, 10]`` holds two examples: types ``[1, 2, 4, 5, 6, 8]`` (template, input, label of
example 1; 5, 6, 8 the same for example 2). Each test builds both libraries' models from the same base weights.
"""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch
from support.models import tiny_llama

import deltatune as dt
from deltatune.cpt.encoder import epsilon
from deltatune.cpt.tuner import cpt_labels_and_types, cpt_loss

IDS, TYPES = [5, 6, 7, 8, 9, 10], [1, 2, 4, 5, 6, 8]
CONFIG = {"task_type": "CAUSAL_LM", "cpt_token_ids": IDS, "cpt_mask": [1] * 6, "cpt_tokens_type_mask": TYPES,
          "opt_weighted_loss_type": "decay", "opt_loss_decay_factor": 0.5}


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (2, 5), generator=g)
    # one more example per row: input (types 1, 2), its label (4); padding (0) at the end of the second row
    type_mask = torch.tensor([[1, 2, 2, 4, 4], [1, 2, 4, 4, 0]])
    return {"input_ids": ids, "attention_mask": (type_mask > 0).long(), "labels": ids.clone(),
            "input_type_mask": type_mask}


def _pair(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    return (dt.get_peft_model(tiny_llama(seed), dt.CPTConfig(**CONFIG)),
            peft.get_peft_model(tiny_llama(seed), peft.CPTConfig(**CONFIG)))


def _set_delta(models: tuple[torch.nn.Module, ...], delta: torch.Tensor) -> None:
    with torch.no_grad():
        for m in models:
            m.prompt_encoder["default"].delta_embedding.weight.copy_(delta)


def test_config_fields_and_defaults_equal_peft():
    ours, theirs = dt.CPTConfig(task_type="CAUSAL_LM"), peft.CPTConfig(task_type="CAUSAL_LM")
    names = {f.name for f in dataclasses.fields(peft.CPTConfig)}
    assert names <= {f.name for f in dataclasses.fields(dt.CPTConfig)}
    for name in names - {"peft_version"}:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.num_virtual_tokens == 1 and ours.cpt_token_ids == [0]


@pytest.mark.parametrize("kwargs", [{"task_type": "SEQ_CLS"}, {"task_type": "CAUSAL_LM", "cpt_token_ids": [1, 2],
                                                               "cpt_mask": [1]}])
def test_refusals_begin_with_peft_sentence(kwargs):
    with pytest.raises(ValueError) as theirs:
        peft.CPTConfig(**kwargs)
    with pytest.raises(ValueError, match="^" + str(theirs.value).replace(".", r"\.")):
        dt.CPTConfig(**kwargs)


def test_init_prompt_is_the_context_embeddings():
    model, _ = _pair()
    base = model.get_base_model()
    enc = model.prompt_encoder["default"]
    words = base.get_input_embeddings().weight
    assert torch.equal(enc().detach(), words[IDS].detach())
    assert not enc.delta_embedding.weight.any()
    # identity at init: the prompt is exactly the context written as real tokens in front of the input
    x = _batch()["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=x).logits
        ref = base(input_ids=torch.cat([torch.tensor(IDS).expand(2, -1), x], dim=1)).logits
    torch.testing.assert_close(ours, ref)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "prompt_encoder.default.delta_embedding.weight"]


def test_loss_against_formula_and_peft():
    ours, theirs = _pair()
    _set_delta((ours, theirs), torch.randn(6, 32, generator=torch.Generator().manual_seed(1)) * 0.01)
    batch = _batch()
    out = ours(**{k: v.clone() for k, v in batch.items()})
    ref = theirs(**{k: v.clone() for k, v in batch.items()})
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss)
    # the formula by hand: labels at types 4, 8 (context) and 12 (the input's, shifted by max=8)
    labels, types = cpt_labels_and_types(ours.peft_config["default"], batch["labels"], batch["input_type_mask"])
    full = torch.cat([torch.tensor(IDS).expand(2, -1), batch["labels"]], dim=1)
    kept = (types > 0) & (types % 4 == 0)
    assert torch.equal(labels, torch.where(kept, full, -100))
    w = {4: 0.25, 8: 0.5, 12: 1.0}  # the last example weighs 1, each earlier one half the next
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
    terms = [-logp[b, j - 1, full[b, j]] * w[int(types[b, j])] for b in range(2) for j in range(1, 11) if kept[b, j]]
    torch.testing.assert_close(out.loss, torch.stack(terms).mean())
    torch.testing.assert_close(cpt_loss(out.logits, labels, types, ours.peft_config["default"]), out.loss)
    # PEFT shifts the caller's input_type_mask in place; deltatune does not
    mask = batch["input_type_mask"].clone()
    ours(**{**batch, "input_type_mask": mask})
    assert torch.equal(mask, batch["input_type_mask"])


def test_training_steps_equal_peft_and_delta_stays_in_its_ball():
    ours, theirs = _pair()
    batch = _batch()
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=50.0) for m in (ours, theirs)]
    eps = epsilon(ours.peft_config["default"], 32)
    for _ in range(3):
        losses = []
        for m, opt in zip((ours, theirs), opts):
            loss = m(**{k: v.clone() for k, v in batch.items()}).loss
            loss.backward()
            opt.step()
            m.update_and_allocate(0) if m is ours else None
            opt.zero_grad()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1])
        delta = ours.prompt_encoder["default"].delta_embedding.weight.detach()
        assert (delta.norm(dim=1) <= eps * (1 + 1e-5)).all()  # projected after the step
        assert not delta[[2, 5]].any()  # label rows (types 4, 8) never move
        assert delta[[0, 1, 3, 4]].norm(dim=1).gt(0).all()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=batch["input_ids"]).logits,
                                   theirs(input_ids=batch["input_ids"]).logits)


def test_files_cross_both_ways_with_equal_logits_and_greedy_decoding(tmp_path):
    ours, theirs = _pair()
    _set_delta((ours,), torch.randn(6, 32, generator=torch.Generator().manual_seed(2)))  # projected on use
    ours.save_pretrained(tmp_path / "dt")
    x = _batch()["input_ids"]
    loaded_peft = peft.PeftModel.from_pretrained(tiny_llama(0), tmp_path / "dt")
    loaded_dt = dt.PeftModel.from_pretrained(tiny_llama(0), tmp_path / "dt")
    with torch.no_grad():
        ref = ours(input_ids=x).logits
        torch.testing.assert_close(loaded_peft(input_ids=x).logits, ref)
        torch.testing.assert_close(loaded_dt(input_ids=x).logits, ref)
    loaded_peft.save_pretrained(tmp_path / "peft")
    again = dt.PeftModel.from_pretrained(tiny_llama(0), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, ref)
    # greedy decoding: deltatune's generate() against full forward passes of PEFT's model (PEFT's own generate()
    # under transformers 5.25 parts from its full forward passes on this input, so it is not the reference)
    out = loaded_dt.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False)
    seq = x
    with torch.no_grad():
        for _ in range(4):
            nxt = loaded_peft(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out[:, -4:], seq[:, -4:])
