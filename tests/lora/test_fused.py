"""The one-node LoRA linear layer (with and without dropout), its dropout mask, and DoRA's expanded norm,
against reference math written here with plain torch ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.models import Holder
from torch import nn

from deltatune import LoraConfig, get_peft_model
from deltatune.lora import kernels
from deltatune.lora.kernels import LoraDropoutBranch, LoraLinearNode, keep_mask


def _count_forwards(monkeypatch, node: type) -> list:
    """A list that gets one entry per call of ``node.forward`` (to check which path a layer took)."""
    calls, original = [], node.forward
    monkeypatch.setattr(node, "forward", staticmethod(lambda *a: calls.append(1) or original(*a)))
    return calls


def _adapted(p: float, bias: bool = True, lora_bias: bool = False, **kw):
    torch.manual_seed(0)
    base = nn.Linear(12, 7, bias=bias)
    pm = get_peft_model(Holder(base), LoraConfig(target_modules=["layer"], r=3, lora_alpha=6, lora_dropout=p,
                                                 init_lora_weights=False, lora_bias=lora_bias, **kw)).train()
    return pm, pm.base_model.model.layer


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias, lora_bias", [(True, False), (False, False), (True, True)])
def test_fused_lora_layer_matches_reference_math_and_gradients(p, bias, lora_bias, monkeypatch):
    """Same seed, same mask: ``y = W x + b + s B A (k ⊙ x) / q (+ s b_B)`` and all its gradients."""
    pm, layer = _adapted(p, bias, lora_bias)
    calls = _count_forwards(monkeypatch, LoraLinearNode)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    b_B = layer.lora_B["default"].bias
    s = layer.scaling["default"]
    x = torch.randn(2, 5, 12, requires_grad=True)
    g_out = torch.randn(2, 5, 7)

    torch.manual_seed(42)
    y = pm(x)
    assert calls, "the one-node path did not run"
    grads = torch.autograd.grad(y, [x, A, B] + ([b_B] if lora_bias else []), g_out)

    torch.manual_seed(42)
    if p > 0:
        keep, q = keep_mask((10, 12), p, x.device)
        keep = keep.view(2, 5, 12)
        assert abs(q - (1 - p)) < 2 ** -16
    else:
        keep, q = torch.ones(2, 5, 12, dtype=torch.bool), 1.0
    ref = F.linear(x, W, b) + s * F.linear((x * keep) @ A.T / q, B, b_B)
    ref_grads = torch.autograd.grad(ref, [x, A, B] + ([b_B] if lora_bias else []), g_out)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    if p > 0:  # the mask really drops, and a new seed draws another one
        torch.manual_seed(43)
        assert not torch.allclose(pm(x), y)


def test_fused_layer_gradcheck_in_double_with_a_fixed_mask():
    pm, layer = _adapted(0.5)
    pm.double()
    x = torch.randn(3, 12, dtype=torch.double, requires_grad=True)
    w = layer.base_layer.weight.detach().clone().requires_grad_()   # the base weight's gradient too
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_()
    b = layer.lora_B["default"].weight.detach().clone().requires_grad_()
    bias = layer.base_layer.bias.detach().clone().requires_grad_()

    def f(x, w, bias, a, b):
        torch.manual_seed(7)
        return LoraLinearNode.apply(x, w, bias, a, b, None, 2.0, 0.5)

    assert torch.autograd.gradcheck(f, (x, w, bias, a, b))


def test_dropout_branch_under_autocast_uses_the_same_mask_rule():
    """The branch used where the one-node path cannot run (autocast...) is the same function of the seed."""
    x = torch.randn(4, 12)
    a, b = torch.randn(3, 12), torch.randn(7, 3)
    torch.manual_seed(5)
    branch = LoraDropoutBranch.apply(x, a, b, None, 0.25, 2.0)
    torch.manual_seed(5)
    node = LoraLinearNode.apply(x, torch.zeros(7, 12), None, a, b, None, 2.0, 0.25)
    torch.testing.assert_close(branch, node)


@pytest.mark.parametrize("p", [0.05, 0.3])
@pytest.mark.parametrize("margin", [6.0, -6.0])  # -6: too few draws per round, the loop must go on
def test_keep_mask_is_bernoulli(p, margin, monkeypatch):
    """Every entry drops with rate p, independently of its neighbours, rows and columns alike."""
    monkeypatch.setattr(kernels, "_MARGIN_SIGMAS", margin)
    torch.manual_seed(0)
    keep, q = keep_mask((400, 1000), p, torch.device("cpu"))
    assert keep.shape == (400, 1000) and keep.dtype == torch.bool and q == 1 - p
    drop = ~keep
    n = drop.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(drop.float().mean().item() - p) < 5 * sigma
    flat = drop.flatten().float()
    pair = (flat[1:] * flat[:-1]).mean().item()  # both of two neighbours dropped: p² if independent
    assert abs(pair - p * p) < 5 * (p * p * (1 - p * p) / n) ** 0.5
    gaps = torch.diff(drop.flatten().nonzero().flatten()).float()  # geometric with mean 1/p
    assert abs(gaps.mean().item() - 1 / p) < 5 * ((1 - p) / p**2 / gaps.numel()) ** 0.5
    for axis_rate in (drop.float().mean(0), drop.float().mean(1)):  # no row or column drops at another rate
        spread = (p * (1 - p) / (n / axis_rate.numel())) ** 0.5
        assert (axis_rate - p).abs().max().item() < 6 * spread
    assert drop[-1].any() and drop[:, -1].any()  # the last positions are reached
    torch.manual_seed(0)
    assert torch.equal(keep_mask((400, 1000), p, torch.device("cpu"))[0], keep)  # reproducible


def test_keep_mask_edge_probabilities():
    assert keep_mask((3, 3), 0.0, torch.device("cpu"))[0].all()
    none, q = keep_mask((3, 3), 1.0, torch.device("cpu"))
    assert not none.any() and q == 0.0
    tiny, q = keep_mask((1, 5), 0.5, torch.device("cpu"))  # fewer entries than one round's minimum draw
    assert tiny.shape == (1, 5) and q == 0.5
    empty, q = keep_mask((0, 5), 0.5, torch.device("cpu"))  # an empty batch
    assert empty.shape == (0, 5) and q == 0.5
    pm, _ = _adapted(0.5)
    x = torch.randn(0, 12, requires_grad=True)
    pm(x).sum().backward()
    assert x.grad.shape == (0, 12)


def test_eval_mode_is_deterministic_and_equals_no_dropout():
    pm, _ = _adapted(0.5)
    x = torch.randn(2, 12)
    pm.eval()
    y = pm(x)
    torch.testing.assert_close(pm(x), y)
    pm0, _ = _adapted(0.0)
    torch.testing.assert_close(pm0.eval()(x), y)


def test_dora_expanded_norm_equals_the_direct_row_norm():
    torch.manual_seed(0)
    pm = get_peft_model(Holder(nn.Linear(40, 30)), LoraConfig(target_modules=["layer"], r=4, use_dora=True,
                                                              init_lora_weights=False))
    layer = pm.base_model.model.layer
    W = layer.base_layer.weight
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    direct = (W + layer.scaling["default"] * B @ A).norm(dim=1)
    torch.testing.assert_close(layer._dora_weight_norm("default"), direct, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_fused_layer_under_bf16_autocast_matches_bf16_reference_math(p, monkeypatch):
    """The trainer's CPU default is bf16 autocast: the one-node layer runs there too, every operand cast to bf16
    once; output and gradients equal the same math done in bf16 by hand (same mask), and the parameters and
    the input get fp32 gradients."""
    pm, layer = _adapted(p, bias=True, lora_bias=True)
    calls = _count_forwards(monkeypatch, LoraLinearNode)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B, b_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_B["default"].bias
    s = layer.scaling["default"]
    x = torch.randn(2, 5, 12, requires_grad=True)
    g_out = torch.randn(2, 5, 7)
    params = [x, A, B, b_B]

    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pm(x)
    assert calls and y.dtype == torch.bfloat16
    grads = torch.autograd.grad(y, params, g_out.bfloat16())
    assert all(g.dtype == torch.float32 for g in grads)

    torch.manual_seed(3)
    keep, q = keep_mask((10, 12), p, x.device) if p > 0 else (torch.ones(10, 12, dtype=torch.bool), 1.0)
    bf = lambda t: t.to(torch.bfloat16)  # noqa: E731
    h = (bf(x) * bf(keep.view(2, 5, 12))) @ bf(A).T * (1 / q)
    ref = F.linear(bf(x), bf(W), bf(b)) + s * F.linear(h, bf(B), bf(b_B))
    ref_grads = torch.autograd.grad(ref, params, g_out.bfloat16())
    torch.testing.assert_close(y.float(), ref.float(), atol=3e-2, rtol=3e-2)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r.float(), atol=5e-2, rtol=3e-2)


def test_dropout_branch_trains_under_bf16_autocast():
    """The branch (for layers the one-node path cannot take) runs its backward under the same autocast: fp32
    gradients close to the fp32 run with the same seed."""
    torch.manual_seed(0)
    pm = get_peft_model(Holder(nn.Linear(32, 24)), LoraConfig(r=4, target_modules=["layer"], lora_dropout=0.25,
                                                                 init_lora_weights=False))
    layer = pm.base_model.model.layer
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(6, 32, requires_grad=True)

    def grads(amp: bool):
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = LoraDropoutBranch.apply(x, a, b, None, 0.25, 2.0)
        assert out.dtype == (torch.bfloat16 if amp else torch.float32)
        return torch.autograd.grad(out.float().square().sum(), [a, b, x])

    plain, amp = grads(False), grads(True)
    for g32, g16 in zip(plain, amp):
        assert g16.dtype == torch.float32
        torch.testing.assert_close(g16, g32, atol=0.1, rtol=0.05)


def _dora_case(bias: bool, zero_magnitude: bool):
    """A DoRA layer (12 -> 7, r=3) with magnitudes away from the row norms (one exactly 0 if asked), its
    tensors ``(W, b, A, B, m)`` and an input ``x: (2, 5, 12)`` that requires grad."""
    torch.manual_seed(0)
    pm = get_peft_model(Holder(nn.Linear(12, 7, bias=bias)), LoraConfig(
        target_modules=["layer"], r=3, lora_alpha=6, use_dora=True, init_lora_weights=False)).train()
    layer = pm.base_model.model.layer
    mag = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        mag.copy_(torch.rand(7) + 0.5)
        if zero_magnitude:
            mag[2] = 0.0
    tensors = (layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"].weight,
               layer.lora_B["default"].weight, mag)
    return pm, tensors, torch.randn(2, 5, 12, requires_grad=True)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("zero_magnitude", [False, True])
def test_dora_node_gradients_match_reference_math(bias, zero_magnitude):
    """The one-node DoRA layer against autograd through ``m/n ⊙ (W x + s B A x) + b`` (n detached), for x, A, B,
    m and b; with one ``m`` exactly 0 (the node keeps ``z`` then, Σ g ⊙ (y - b) / m being undefined)."""
    pm, (W, b, A, B, mag), x = _dora_case(bias, zero_magnitude)
    if bias:
        b.requires_grad_(True)
    g_out = torch.randn(2, 5, 7)
    params = [x, A, B, mag] + ([b] if bias else [])

    y = pm(x)
    grads = torch.autograd.grad(y, params, g_out)
    norm = (W + 2.0 * B @ A).norm(dim=1).detach()
    ref = (x @ W.T + 2.0 * (x @ A.T) @ B.T) * (mag / norm) + (b if bias else 0)
    ref_grads = torch.autograd.grad(ref, params, g_out)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for name, g, r in zip(["x", "A", "B", "m", "b"], grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5, msg=name)
    if zero_magnitude:
        assert grads[3][2].abs() > 0  # the zeroed magnitude still learns


def test_dora_node_keeps_its_output_not_a_second_out_sized_tensor():
    """Saved for backward: the layer output itself (which the next op usually keeps anyway), no extra
    ``(tokens, out)`` pre-scale tensor."""
    torch.manual_seed(0)
    pm = get_peft_model(Holder(nn.Linear(12, 7, bias=False)), LoraConfig(
        target_modules=["layer"], r=3, use_dora=True, init_lora_weights=False)).train()
    x = torch.randn(4, 12, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = pm(x)
    out_sized = [t for t in saved if t.shape == (4, 7)]
    assert len(out_sized) == 1 and out_sized[0].data_ptr() == y.data_ptr()


def test_dropout_draw_is_kept_as_positions_and_equals_the_keep_mask():
    """On CPU the node keeps the dropped positions (int32, 4 bytes per dropped entry), not an (N, in) mask; the
    positions, the float keep-values and the bool keep-mask are one draw for one seed."""
    torch.manual_seed(1)
    mask, q = kernels.draw_dropout((64, 50), 0.05, torch.device("cpu"))
    assert mask.dtype == torch.int32 and q == 0.95 and torch.all(mask[1:] > mask[:-1])
    torch.manual_seed(1)
    keep, _ = keep_mask((64, 50), 0.05, torch.device("cpu"))
    assert torch.equal((~keep).flatten().nonzero().flatten(), mask.long())
    values = kernels.keep_values(mask, (64, 50), torch.float32)
    assert torch.equal(values, keep.float())

    pm, layer = _adapted(0.05, bias=False)
    x = torch.randn(4, 64, 12, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        pm(x)
    draws = [t for t in saved if t.dtype == torch.int32]
    assert len(draws) == 1 and draws[0].numel() < 0.1 * x.numel()  # ~5% of the entries, not all of them
    assert not any(t.dtype == torch.bool for t in saved)


@pytest.mark.parametrize("zero_magnitude", [False, True])
def test_dora_node_under_bf16_autocast_matches_bf16_reference_math(zero_magnitude):
    """Under autocast DoRA's products run in bf16 with each operand cast once; the row scale m/n stays fp32 and
    is applied before the output is rounded to bf16 (a bf16 scale would move in steps of 2^-7). Output and
    gradients equal that math done by hand; the magnitude gets an fp32 gradient."""
    pm, (W, b, A, B, mag), x = _dora_case(True, zero_magnitude)
    g_out = torch.randn(2, 5, 7).bfloat16()
    params = [x, A, B, mag]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pm(x)
    assert y.dtype == torch.bfloat16
    grads = torch.autograd.grad(y, params, g_out)
    assert all(g.dtype == torch.float32 for g in grads)

    bf = lambda t: t.to(torch.bfloat16)  # noqa: E731
    norm = (W + 2.0 * B @ A).norm(dim=1).detach()
    z = bf(x) @ bf(W).T + 2.0 * (bf(x) @ bf(A).T) @ bf(B).T
    ref = bf(z.float() * (mag / norm)) + bf(b)
    ref_grads = torch.autograd.grad(ref, params, g_out)
    torch.testing.assert_close(y.float(), ref.float(), atol=3e-2, rtol=3e-2)
    for name, g, r in zip(["x", "A", "B", "m"], grads, ref_grads):
        torch.testing.assert_close(g, r.float(), atol=5e-2, rtol=3e-2, msg=name)


@pytest.mark.parametrize("use_dora", [False, True])
def test_gpt2_conv1d_layers_take_the_one_node_paths(use_dora, monkeypatch):
    """transformers' Conv1D (GPT-2; ``W: (in, out)``) runs the same nodes on ``Wᵀ``: output and gradients equal
    the reference math with the same dropout mask (LoRA) or the row-normalised update (DoRA)."""
    from transformers.pytorch_utils import Conv1D

    from deltatune.lora.kernels import DoraLinearNode

    node = DoraLinearNode if use_dora else LoraLinearNode
    calls = _count_forwards(monkeypatch, node)
    torch.manual_seed(0)
    p = 0.0 if use_dora else 0.3
    pm = get_peft_model(Holder(Conv1D(7, 12)), LoraConfig(target_modules=["layer"], r=3, lora_alpha=6,
                                                          lora_dropout=p, use_dora=use_dora, fan_in_fan_out=True,
                                                          init_lora_weights=False)).train()
    layer = pm.base_model.model.layer
    W, b = layer.base_layer.weight, layer.base_layer.bias                    # W: (in=12, out=7)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(2, 5, 12, requires_grad=True)
    g_out = torch.randn(2, 5, 7)
    params = [x, A, B] + ([layer.lora_magnitude_vector["default"].weight] if use_dora else [])

    torch.manual_seed(4)
    y = pm(x)
    assert calls
    grads = torch.autograd.grad(y, params, g_out)
    torch.manual_seed(4)
    if use_dora:
        m = params[-1]
        merged = W.T + 2.0 * B @ A
        ref = (x @ merged.T) * (m / merged.norm(dim=1).detach()) + b
    else:
        keep, q = keep_mask((10, 12), p, x.device)
        ref = x @ W + b + 2.0 * ((x * keep.view(2, 5, 12)) @ A.T / q) @ B.T
    ref_grads = torch.autograd.grad(ref, params, g_out)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fp32_adapter_over_a_bf16_base_takes_the_node_and_computes_the_update_in_fp32(p, monkeypatch):
    """A bf16 model with fp32 adapters (how both libraries place them), no autocast: the base runs in bf16, the
    update in fp32 on the input upcast, added with one rounding, as PEFT computes it; gradients likewise."""
    calls = _count_forwards(monkeypatch, LoraLinearNode)
    torch.manual_seed(0)
    pm = get_peft_model(Holder(nn.Linear(12, 7).to(torch.bfloat16)), LoraConfig(
        target_modules=["layer"], r=3, lora_alpha=6, lora_dropout=p, init_lora_weights=False)).train()
    layer = pm.base_model.model.layer
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.dtype == B.dtype == torch.float32 and W.dtype == torch.bfloat16
    x = torch.randn(2, 5, 12, dtype=torch.bfloat16, requires_grad=True)
    g_out = torch.randn(2, 5, 7, dtype=torch.bfloat16)

    torch.manual_seed(3)
    y = pm(x)
    assert calls and y.dtype == torch.bfloat16
    grads = torch.autograd.grad(y, [x, A, B], g_out)
    torch.manual_seed(3)
    keep, q = keep_mask((10, 12), p, x.device) if p > 0 else (torch.ones(10, 12, dtype=torch.bool), 1.0)
    update = ((x.float() * keep.view(2, 5, 12)) @ A.T / q) @ B.T
    ref = (F.linear(x, W, b) + 2.0 * update).to(torch.bfloat16)
    ref_grads = torch.autograd.grad(ref, [x, A, B], g_out)
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, atol=1e-2, rtol=1e-2)


def test_fp32_adapter_over_a_bf16_base_equals_peft_bit_for_bit():
    """The same bf16 base and fp32 adapter weights in ``peft`` give the same bf16 output, and the same gradients
    to within one bf16 rounding."""
    import copy

    import peft

    torch.manual_seed(0)
    base = Holder(nn.Linear(12, 7).to(torch.bfloat16))
    config = dict(target_modules=["layer"], r=3, lora_alpha=6, init_lora_weights=False)
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**config)).train()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config)).train()
    theirs.load_state_dict(ours.state_dict(), strict=False)
    named = lambda m: {n: p for n, p in m.named_parameters() if "lora_" in n}  # noqa: E731
    assert all(p.dtype == torch.float32 for p in named(theirs).values())
    x = torch.randn(2, 5, 12, dtype=torch.bfloat16)
    g_out = torch.randn(2, 5, 7, dtype=torch.bfloat16)
    y_ours, y_theirs = ours(x), theirs(x)
    assert torch.equal(y_ours, y_theirs)
    for (n, a), (_, b) in zip(sorted(named(ours).items()), sorted(named(theirs).items()), strict=True):
        ga = torch.autograd.grad(y_ours, a, g_out, retain_graph=True)[0]
        gb = torch.autograd.grad(y_theirs, b, g_out, retain_graph=True)[0]
        torch.testing.assert_close(ga, gb, atol=1e-3, rtol=1e-3, msg=n)
