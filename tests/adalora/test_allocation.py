"""AdaLoRA's allocation on tiny models with a deterministic schedule (data and init are seeded).

Reference math is written out here, independently of deltatune.adalora.allocator.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from adalora_helpers import adalora_model, batch, layers, orth_distance, target_map, train

import deltatune as dt
from deltatune.errors import ConfigError

TOTAL, TINIT, TFINAL = 15, 2, 3


def reference_budget(step: int, b0: int, b_target: int) -> int:
    """The paper's cubic schedule: b0 until tinit, b_target from total - tfinal, cubic in between."""
    if step <= TINIT:
        return b0
    if step >= TOTAL - TFINAL:
        return b_target
    frac = (step - TINIT) / (TOTAL - TFINAL - TINIT)
    return int((b0 - b_target) * (1 - frac) ** 3 + b_target)


def kept(model) -> dict[str, int]:
    return {k: sum(v) for k, v in model.peft_config["default"].rank_pattern.items()}


def test_total_rank_after_schedule_equals_target_budget():
    model = adalora_model()
    train(model, TOTAL)
    pattern = model.peft_config["default"].rank_pattern
    assert sorted(pattern) == [f"branch.{i}.lora_E" for i in range(4)]
    assert sum(kept(model).values()) == 2 * 4  # target_r · n_layers
    for name, layer in layers(model):
        e = layer.lora_E["default"].detach().view(-1)
        keep = torch.tensor(pattern[f"{name}.lora_E"])
        assert torch.all(e[~keep] == 0)
        assert torch.all(e[keep] != 0), "kept triplets were trained away from Λ = 0"


def test_budget_follows_the_cubic_schedule_at_every_masking_step():
    model = adalora_model()
    budgets = {}
    opt = None
    for step in range(1, TOTAL + 1):
        opt = train(model, 1, first_step=step, optimizer=opt)
        pattern = model.peft_config["default"].rank_pattern
        budgets[step] = None if pattern is None else sum(sum(v) for v in pattern.values())
    assert budgets[1] is None and budgets[2] is None  # warm-up: nothing masked yet
    for step in range(TINIT + 1, TOTAL + 1):
        assert budgets[step] == reference_budget(step, 24, 8), step
    assert budgets[3] < 24 and budgets[TOTAL - TFINAL] == 8


def test_masking_every_delta_t_steps():
    model = adalora_model(deltaT=3)
    patterns = {}
    opt = None
    for step in range(1, TOTAL - TFINAL):
        opt = train(model, 1, first_step=step, optimizer=opt)
        pattern = model.peft_config["default"].rank_pattern
        patterns[step] = None if pattern is None else sum(sum(v) for v in pattern.values())
    # the first masking is at step 3 (3 % 3 == 0), then 6 and 9; in between the pattern is unchanged
    assert patterns[1] is None and patterns[2] is None
    assert patterns[3] == patterns[4] == patterns[5] == reference_budget(3, 24, 8)
    assert patterns[6] == patterns[7] == patterns[8] == reference_budget(6, 24, 8)
    assert patterns[9] == reference_budget(9, 24, 8)


def test_allocation_follows_importance():
    # branch 0's output counts 10x, branch 3's 0.02x: its gradients, and so |w · grad|, are tiny
    gains = (10.0, 1.0, 1.0, 0.02)
    model = adalora_model(gains)
    train(model, TOTAL, lr=0.01)
    ranks = kept(model)
    assert sum(ranks.values()) == 8
    assert len(set(ranks.values())) > 1, f"allocation is uniform: {ranks}"
    assert ranks["branch.0.lora_E"] > ranks["branch.3.lora_E"], ranks
    assert ranks["branch.0.lora_E"] == max(ranks.values()) and ranks["branch.3.lora_E"] == min(ranks.values())


def test_masked_triplets_stay_zero_after_each_allocation():
    model = adalora_model()
    opt = train(model, TOTAL)
    pattern = model.peft_config["default"].rank_pattern
    drifted = []

    def after_step(m, step):  # Adam's momentum moves masked Λ off zero in optimizer.step() ...
        for name, layer in layers(m):
            e = layer.lora_E["default"].detach().view(-1)
            drifted.append(float(e[~torch.tensor(pattern[f"{name}.lora_E"])].abs().max()))

    train(model, 4, first_step=TOTAL + 1, optimizer=opt, after_optimizer_step=after_step)
    assert max(drifted) > 0, "the optimizer did not move masked entries, so this test would prove nothing"
    # ... and update_and_allocate puts them back to exactly zero
    for name, layer in layers(model):
        e = layer.lora_E["default"].detach().view(-1)
        assert torch.all(e[~torch.tensor(pattern[f"{name}.lora_E"])] == 0)
    assert model.peft_config["default"].rank_pattern == pattern, "the final pattern must not change"


def test_budget_phase_masks_exactly_the_budget_even_with_tied_scores():
    model = adalora_model()
    layer_list = layers(model)
    allocator = layer_list[0][1].allocator["default"]
    # no scores yet: every triplet ties at 0. PEFT masks every score <= the k-th, i.e. all of them.
    pattern = allocator.mask_to_budget(layer_list, 10)
    assert sum(sum(v) for v in pattern.values()) == 10


def test_importance_ema_and_triplet_score_match_the_paper():
    b1, b2 = 0.7, 0.6
    model = adalora_model(beta1=b1, beta2=b2, init_lora_weights=False)
    layer_list = layers(model)
    allocator = layer_list[0][1].allocator["default"]
    m = target_map()
    model.train()
    ema = unc = None
    for step in (1, 2):
        x = batch(step)
        ((model(x) - x @ m) ** 2).mean().backward()
        name, layer = layer_list[1]
        a, b, e = (layer.lora_A["default"], layer.lora_B["default"], layer.lora_E["default"])
        ipt = {k: (p.detach() * p.grad).abs().double() for k, p in (("A", a), ("B", b), ("E", e))}
        if ema is None:
            ema = {k: (1 - b1) * v for k, v in ipt.items()}
            unc = {k: (1 - b2) * (ipt[k] - ema[k]).abs() for k in ipt}
        else:
            ema = {k: b1 * ema[k] + (1 - b1) * ipt[k] for k in ipt}
            unc = {k: b2 * unc[k] + (1 - b2) * (ipt[k] - ema[k]).abs() for k in ipt}
        allocator.update_importance(layer_list)  # no optimizer step: the weights stay put
        model.zero_grad()
    for k, attr in (("A", "lora_A"), ("B", "lora_B"), ("E", "lora_E")):
        torch.testing.assert_close(allocator.exp_avg_ipt[(name, attr)].double(), ema[k], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(allocator.exp_avg_unc[(name, attr)].double(), unc[k], rtol=1e-5, atol=1e-12)
    s = {k: ema[k] * unc[k] for k in ema}
    expected = s["E"].view(-1) + s["A"].mean(dim=1) + s["B"].mean(dim=0)  # Λ_i + mean of Q row i + mean of P col i
    torch.testing.assert_close(allocator.triplet_scores(layer_list)[1].double(), expected, rtol=1e-5, atol=1e-12)


def test_orthogonality_term_lowers_the_distance_to_orthonormal():
    with_reg, without = adalora_model(orth_reg_weight=0.5), adalora_model(orth_reg_weight=0.0)
    start = orth_distance(with_reg)
    assert start == pytest.approx(orth_distance(without))
    train(with_reg, 10, allocate=False)
    train(without, 10, allocate=False)
    assert orth_distance(with_reg) < 0.8 * start
    assert orth_distance(with_reg) < 0.8 * orth_distance(without)


def test_regularization_loss_value():
    model = adalora_model(orth_reg_weight=0.3, init_lora_weights=False)
    model.train()
    expected = 0.3 * orth_distance(model)  # the mean of 2·n Frobenius norms, times the weight
    assert model.regularization_loss().item() == pytest.approx(expected, rel=1e-5)
    model.eval()
    assert model.regularization_loss().item() == pytest.approx(expected, rel=1e-5)  # the term itself is modeless
    assert adalora_model(orth_reg_weight=0.0).regularization_loss() is None


def test_forward_adds_the_penalty_to_a_returned_loss_in_training_mode_only():
    from support.models import tiny_llama

    model = dt.get_peft_model(tiny_llama(), dt.AdaLoraConfig(total_step=10, init_r=4, target_r=2,
                                                             init_lora_weights=False, task_type="CAUSAL_LM"))
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    model.eval()
    plain = model(input_ids=ids, labels=ids).loss
    model.train()  # tiny_llama has no dropout: the same logits in both modes
    with_penalty = model(input_ids=ids, labels=ids).loss
    penalty = model.regularization_loss()
    assert penalty.item() > 1.0  # random P, Q are far from orthonormal
    torch.testing.assert_close(with_penalty, plain + penalty)


def test_no_gradients_is_a_clear_error():
    model = adalora_model()
    with pytest.raises(ConfigError, match="before optimizer.zero_grad"):
        model.update_and_allocate(1)


def test_bad_global_step():
    model = adalora_model()
    with pytest.raises(ConfigError, match="global_step must be an integer >= 0"):
        model.update_and_allocate(-1)


def test_warns_when_training_past_total_step_without_allocating():
    model = adalora_model(total_step=5, tinit=1, tfinal=1)
    with pytest.warns(UserWarning, match=r"update_and_allocate\(\) was never called"):
        train(model, 6, allocate=False)
    driven = adalora_model(total_step=5, tinit=1, tfinal=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(driven, 8)


def test_lora_update_and_allocate_is_a_no_op():
    from adalora_helpers import branches

    model = dt.get_peft_model(branches(), dt.LoraConfig(r=2, target_modules=["branch.0"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.update_and_allocate(3)
    assert model.regularization_loss() is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
