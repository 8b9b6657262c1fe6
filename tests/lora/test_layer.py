"""LoRA layers against independent reference math, init identities, merging, disabling, PiSSA/OLoRA.

Each layer is wrapped in a one-module model (``Holder.layer``) and adapted with ``get_peft_model``; the
adapted layer is then ``peft_model.base_model.model.layer`` (PEFT's attribute layout) and its tensors are
read under PEFT's names (``lora_A[name].weight``, ``lora_embedding_A[name]``, ``lora_magnitude_vector[name]``...).
The reference outputs are computed here from those tensors with plain ``torch.nn.functional`` calls.
"""

from __future__ import annotations

import math

import peft
import pytest
import torch
import torch.nn.functional as F
from support.layers import layer_and_input
from support.models import Holder, make_inputs, output, tiny_gpt2, tiny_llama, tiny_net
from torch import nn

import deltatune
from deltatune import LoraConfig, get_peft_model

ATOL = 1e-5


def _adapt(kind: str, **config) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(peft model, its adapted layer, input) with a non-trivial adapter."""
    model, x = layer_and_input(kind)
    config.setdefault("init_lora_weights", False)
    config.setdefault("r", 3)
    config.setdefault("lora_alpha", 6)
    if kind == "conv1D":
        config.setdefault("fan_in_fan_out", True)
    pm = get_peft_model(model, LoraConfig(target_modules=["layer"], **config))
    pm.eval()
    return pm, pm.base_model.model.layer, x


def _randomise(layer: nn.Module, seed: int = 1, std: float = 0.3) -> None:
    """Replace every adapter tensor of ``default`` with fresh noise (so no init identity hides a bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("lora_") and name.split(".")[1] == "default":
                p.copy_(torch.randn(p.shape, generator=g) * std)


# ---- output vs reference math --------------------------------------------------------------------

@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("r,alpha", [(1, 1), (3, 6), (4, 16), (8, 5)])
def test_linear_matches_reference(r, alpha, use_rslora):
    pm, layer, x = _adapt("linear", r=r, lora_alpha=alpha, use_rslora=use_rslora)
    _randomise(layer)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.shape == (r, 16) and B.shape == (12, r)
    s = alpha / math.sqrt(r) if use_rslora else alpha / r
    assert layer.scaling["default"] == pytest.approx(s)
    expected = x @ W.T + b + s * (x @ A.T @ B.T)
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)


def test_linear_lora_bias_matches_reference():
    pm, layer, x = _adapt("linear", lora_bias=True)
    _randomise(layer)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B, bB = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_B["default"].bias
    assert bB is not None and bB.shape == (12,)
    s = 6 / 3
    expected = x @ W.T + b + s * (x @ A.T @ B.T + bB)
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)


def test_conv1D_fan_in_fan_out_matches_reference():
    pm, layer, x = _adapt("conv1D")
    _randomise(layer)
    W, b = layer.base_layer.weight, layer.base_layer.bias  # W: (in=16, out=12)
    assert W.shape == (16, 12)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.shape == (3, 16) and B.shape == (12, 3)
    expected = x @ W + b + 2.0 * (x @ A.T @ B.T)
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "linear_nobias", "conv1D"])
def test_dora_linear_matches_reference(kind):
    """``y = m ⊙ (W + s B A) x / ||W + s B A||_row + b``: the norm is per output row of ``W: (out, in)``."""
    pm, layer, x = _adapt(kind, use_dora=True)
    _randomise(layer)
    mag = layer.lora_magnitude_vector["default"].weight
    assert mag.shape == (12,)
    with torch.no_grad():
        mag.copy_(torch.rand(12) + 0.5)
    W = layer.base_layer.weight
    W = W.T if kind == "conv1D" else W  # (out, in)
    b = layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    merged = W + 2.0 * B @ A
    norm = merged.norm(dim=1)  # (out,)
    expected = (x @ merged.T) * (mag / norm)
    if b is not None:
        expected = expected + b
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)


def test_dora_magnitude_initialised_to_row_norm():
    pm, layer, x = _adapt("linear", use_dora=True)
    W, A, B = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, (W + 2.0 * B @ A).norm(dim=1))
    # So at init DoRA equals plain LoRA.
    expected = x @ (W + 2.0 * B @ A).T + layer.base_layer.bias
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)


def test_embedding_matches_reference():
    """PEFT semantics: ``lora_embedding_A: (r, num)``, ``lora_embedding_B: (dim, r)``, ``ΔW = s (B A)^T``."""
    pm, layer, ids = _adapt("embedding", r=4, lora_alpha=8)
    _randomise(layer)
    W = layer.base_layer.weight  # (30, 12)
    A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    assert A.shape == (4, 30) and B.shape == (12, 4)
    expected = (W + 2.0 * (B @ A).T)[ids]
    torch.testing.assert_close(output(pm, {"x": ids}), expected, atol=ATOL, rtol=1e-5)


def test_embedding_respects_padding_idx():
    """F.embedding semantics of the base (padding_idx) do not zero the adapter's rows in PEFT: match that."""
    torch.manual_seed(0)
    model = Holder(nn.Embedding(30, 12, padding_idx=0)).eval()
    ref = Holder(nn.Embedding(30, 12, padding_idx=0)).eval()
    ref.load_state_dict(model.state_dict())
    ids = torch.tensor([[0, 1, 2, 0]])
    cfg = {"target_modules": ["layer"], "r": 2, "init_lora_weights": False}
    dt = get_peft_model(model, LoraConfig(**cfg)).eval()
    pf = peft.get_peft_model(ref, peft.LoraConfig(**cfg)).eval()
    pf.load_state_dict(dt.state_dict())
    torch.testing.assert_close(output(dt, {"x": ids}), output(pf, {"x": ids}), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "conv3d"])
def test_conv_matches_reference(kind):
    """``ΔW[o, i, k...] = s · Σ_r B[o, r] A[r, i, k...]``; the adapted conv is the base conv with W + ΔW."""
    pm, layer, x = _adapt(kind, r=2, lora_alpha=3)
    _randomise(layer)
    base = layer.base_layer
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.shape == (2, base.in_channels, *base.kernel_size)
    assert B.shape == (base.out_channels, 2) + (1,) * (A.dim() - 2)
    delta = (B.flatten(1) @ A.flatten(1)).view(base.weight.shape) * 1.5
    conv = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}[kind]
    expected = conv(x, base.weight + delta, base.bias, base.stride, base.padding, base.dilation)
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "conv3d"])
def test_dora_conv_matches_reference(kind):
    pm, layer, x = _adapt(kind, r=2, lora_alpha=3, use_dora=True)
    _randomise(layer)
    base = layer.base_layer
    mag = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        mag.copy_(torch.rand(mag.shape) + 0.5)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    merged = base.weight + (B.flatten(1) @ A.flatten(1)).view(base.weight.shape) * 1.5
    norm = merged.flatten(1).norm(dim=1)  # one per output channel
    scale = mag.flatten() / norm
    conv = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}[kind]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    expected = conv(x, merged, None, base.stride, base.padding, base.dilation) * scale.view(shape)
    expected = expected + base.bias.view(shape)
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)


# ---- identity at init ----------------------------------------------------------------------------

ALL_KINDS = ["linear", "conv1D", "embedding", "conv1d", "conv2d", "conv3d"]


@pytest.mark.parametrize("init", [True, "gaussian"])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_default_inits_are_identity(kind, init):
    model, x = layer_and_input(kind)
    before = output(model, {"x": x})
    pm = get_peft_model(model, LoraConfig(target_modules=["layer"], r=4, init_lora_weights=init,
                                          fan_in_fan_out=kind == "conv1D"))
    pm.eval()
    layer = pm.base_model.model.layer
    torch.testing.assert_close(output(pm, {"x": x}), before, atol=0, rtol=0)
    # ... and not because the adapter is all zero: one factor is random.
    first = layer.lora_embedding_B["default"] if kind == "embedding" else layer.lora_A["default"].weight
    assert first.abs().sum() > 0


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_init_false_is_not_identity(kind):
    model, x = layer_and_input(kind)
    before = output(model, {"x": x})
    pm = get_peft_model(model, LoraConfig(target_modules=["layer"], r=4, init_lora_weights=False,
                                          fan_in_fan_out=kind == "conv1D"))
    assert (output(pm.eval(), {"x": x}) - before).abs().max() > 1e-3


def test_gaussian_init_std():
    """PEFT's "gaussian": A ~ N(0, 1/r) (std = 1/r), B = 0."""
    torch.manual_seed(0)
    pm = get_peft_model(Holder(nn.Linear(512, 512)), LoraConfig(target_modules=["layer"], r=4,
                                                                 init_lora_weights="gaussian"))
    layer = pm.base_model.model.layer
    assert layer.lora_A["default"].weight.std().item() == pytest.approx(1 / 4, rel=0.05)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


# ---- merge / unmerge -----------------------------------------------------------------------------

MERGE_CASES = [
    ("linear", {}), ("linear_nobias", {}), ("conv1D", {}), ("embedding", {}), ("conv1d", {}), ("conv2d", {}),
    ("conv3d", {}), ("linear", {"use_dora": True}), ("conv1D", {"use_dora": True}), ("conv2d", {"use_dora": True}),
    ("linear", {"use_rslora": True}), ("linear", {"lora_bias": True}),
]


@pytest.mark.parametrize("kind,extra", MERGE_CASES, ids=[f"{k}-{'-'.join(e) or 'lora'}" for k, e in MERGE_CASES])
def test_merge_unmerge_remerge_and_unload(kind, extra):
    pm, layer, x = _adapt(kind, **extra)
    _randomise(layer)
    if extra.get("use_dora"):
        with torch.no_grad():
            layer.lora_magnitude_vector["default"].weight.mul_(1.3)
    base_w = layer.base_layer.weight.detach().clone()
    bias = getattr(layer.base_layer, "bias", None)
    base_b = None if bias is None else bias.detach().clone()
    unmerged = output(pm, {"x": x})

    pm.merge_adapter()
    assert layer.merged
    assert not torch.allclose(layer.base_layer.weight, base_w), "merging must change the base weight"
    torch.testing.assert_close(output(pm, {"x": x}), unmerged, atol=ATOL, rtol=1e-4)

    pm.unmerge_adapter()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, base_w, atol=1e-6, rtol=1e-6)
    if base_b is not None:
        torch.testing.assert_close(layer.base_layer.bias, base_b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(output(pm, {"x": x}), unmerged, atol=ATOL, rtol=1e-4)

    pm.merge_adapter()
    torch.testing.assert_close(output(pm, {"x": x}), unmerged, atol=ATOL, rtol=1e-4)
    pm.unmerge_adapter()

    base_type = type(layer.base_layer)
    merged_model = pm.merge_and_unload()
    assert type(merged_model.layer) is base_type, "merge_and_unload must leave the original layer type"
    assert not any("lora" in n for n, _ in merged_model.named_parameters())
    torch.testing.assert_close(output(merged_model, {"x": x}), unmerged, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("factory,cfg", [
    (tiny_llama, {"target_modules": "all-linear", "use_dora": True}),
    # Not wte: GPT-2 ties it to lm_head, so merging into it changes the head too (in PEFT as well).
    (tiny_gpt2, {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
    (tiny_net, {"target_modules": ["emb", "conv1d", "lin1", "conv2d", "conv3d", "head"]}),
], ids=["llama-dora", "gpt2", "net"])
def test_model_merge_and_unload_equals_unmerged(factory, cfg):
    kind = {tiny_llama: "llama", tiny_gpt2: "gpt2", tiny_net: "net"}[factory]
    inputs = make_inputs(kind)
    pm = get_peft_model(factory(0), LoraConfig(r=4, init_lora_weights=False, **cfg)).eval()
    unmerged = output(pm, inputs)
    pm.merge_adapter()
    torch.testing.assert_close(output(pm, inputs), unmerged, atol=ATOL, rtol=1e-4)
    pm.unmerge_adapter()
    model = pm.merge_and_unload()
    assert not any("lora_" in n for n, _ in model.named_modules())
    assert sorted(model.state_dict()) == sorted(factory(0).state_dict())
    torch.testing.assert_close(output(model, inputs), unmerged, atol=ATOL, rtol=1e-4)


def test_merge_matches_peft_merge():
    """The merged weights equal PEFT's merged weights for the same adapter (DoRA included)."""
    cfg = {"target_modules": ["q_proj", "v_proj", "gate_proj"], "r": 4, "use_dora": True, "init_lora_weights": False}
    dt = get_peft_model(tiny_llama(0), LoraConfig(**cfg))
    pf = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(**cfg))
    with torch.no_grad():
        for k, v in pf.state_dict().items():
            if "lora_" in k:
                v.add_(torch.randn(v.shape) * 0.1)
    dt.load_state_dict(pf.state_dict())
    a = dt.merge_and_unload().state_dict()
    b = pf.merge_and_unload().state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)


# ---- disable_adapter -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind,extra", [
    ("linear", {}), ("embedding", {}), ("conv2d", {}), ("linear", {"use_dora": True}), ("conv1D", {}),
])
def test_disable_adapter_gives_base_output(kind, extra):
    model, x = layer_and_input(kind)
    base_out = output(model, {"x": x})
    pm, _layer, _ = _adapt(kind, **extra)
    adapted = output(pm, {"x": x})
    assert (adapted - base_out).abs().max() > 1e-3
    with pm.disable_adapter():
        torch.testing.assert_close(output(pm, {"x": x}), base_out, atol=0, rtol=0)
    torch.testing.assert_close(output(pm, {"x": x}), adapted, atol=0, rtol=0)


def test_disable_adapter_while_merged():
    pm, _layer, x = _adapt("linear")
    model, _ = layer_and_input("linear")
    base_out = output(model, {"x": x})
    adapted = output(pm, {"x": x})
    pm.merge_adapter()
    with pm.disable_adapter():
        torch.testing.assert_close(output(pm, {"x": x}), base_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(output(pm, {"x": x}), adapted, atol=ATOL, rtol=1e-4)


def test_disable_adapter_restores_on_exception():
    pm, _layer, x = _adapt("linear")
    adapted = output(pm, {"x": x})
    with pytest.raises(RuntimeError, match="boom"), pm.disable_adapter():
        raise RuntimeError("boom")
    torch.testing.assert_close(output(pm, {"x": x}), adapted, atol=0, rtol=0)


def test_disable_adapter_also_disables_modules_to_save():
    inputs = make_inputs("llama")
    base_out = output(tiny_llama(0), inputs)
    pm = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        pm.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    pm.eval()
    assert (output(pm, inputs) - base_out).abs().max() > 1e-3
    with pm.disable_adapter():
        torch.testing.assert_close(output(pm, inputs), base_out, atol=0, rtol=0)


# ---- safe_merge ----------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
def test_safe_merge_refuses_nan_and_changes_nothing(how):
    pm = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    bad = pm.base_model.model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        bad.lora_B["default"].weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    with pytest.raises(ValueError) as info:
        getattr(pm, how)(safe_merge=True)
    assert isinstance(info.value, deltatune.DeltatuneError)
    msg = str(info.value)
    assert "nan" in msg.lower() and "default" in msg
    assert "layers.1.self_attn.v_proj" in msg, f"the message should name the broken layer: {msg}"
    after = pm.state_dict()
    assert sorted(after) == sorted(before)
    for k, v in before.items():
        assert torch.equal(after[k], v) or (torch.isnan(v).any() and torch.equal(after[k].isnan(), v.isnan())), k
    for _, m in pm.named_modules():
        if hasattr(m, "merged_adapters"):
            assert m.merged_adapters == [], "no layer may be left merged after a refused safe merge"


def test_safe_merge_ok_equals_unsafe_merge():
    pm = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    inputs = make_inputs("llama")
    expected = output(pm.eval(), inputs)
    pm.merge_adapter(safe_merge=True)
    torch.testing.assert_close(output(pm, inputs), expected, atol=ATOL, rtol=1e-4)


# ---- PiSSA / OLoRA -------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
@pytest.mark.parametrize("factory,targets", [(tiny_llama, ["q_proj", "v_proj", "down_proj"]),
                                             (tiny_gpt2, ["c_attn", "c_fc"])], ids=["llama", "gpt2-conv1D"])
def test_pissa_olora_keep_output(init, factory, targets):
    kind = "llama" if factory is tiny_llama else "gpt2"
    inputs = make_inputs(kind)
    before = output(factory(0), inputs)
    torch.manual_seed(0)
    pm = get_peft_model(factory(0), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init,
                                               fan_in_fan_out=factory is tiny_gpt2)).eval()
    torch.testing.assert_close(output(pm, inputs), before, atol=1e-4, rtol=1e-4)
    layers = [m for _, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(layers) == len(targets) * 2
    for m in layers:
        assert m.lora_A["default"].weight.abs().sum() > 0
        assert m.lora_B["default"].weight.abs().sum() > 0
    # The base weights were changed (the principal part moved into A, B).
    base_sd = factory(0).state_dict()
    changed = [k for k, v in pm.get_base_model().state_dict().items()
               if "base_layer.weight" in k and not torch.equal(v, base_sd[k.replace("base_layer.", "")])]
    assert len(changed) == len(layers)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_match_peft(init):
    """The deterministic inits give PEFT's A, B and residual base weights."""
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "init_lora_weights": init}
    dt = get_peft_model(tiny_llama(0), LoraConfig(**cfg))
    pf = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(**cfg))
    a, b = dt.state_dict(), pf.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


def test_pissa_on_embedding_is_refused_clearly():
    with pytest.raises(ValueError, match="(?i)pissa"):
        get_peft_model(tiny_net(0), LoraConfig(r=2, target_modules=["emb"], init_lora_weights="pissa"))


# ---- gradients -----------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    {"target_modules": ["q_proj", "v_proj", "embed_tokens"]},
    {"target_modules": ["q_proj", "v_proj", "up_proj"], "use_dora": True},
    {"target_modules": ["q_proj", "o_proj"], "lora_bias": True},
], ids=["lora+embedding", "dora", "lora_bias"])
def test_gradients_match_peft(cfg):
    """Same adapter, same batch: every trainable parameter gets PEFT's gradient (custom autograd checked)."""
    cfg = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **cfg}
    dt = get_peft_model(tiny_llama(0), LoraConfig(**cfg))
    pf = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(**cfg))
    dt.load_state_dict(pf.state_dict())
    dt.train()
    pf.train()
    inputs = make_inputs("llama")
    dt(**inputs, labels=inputs["input_ids"]).loss.backward()
    pf(**inputs, labels=inputs["input_ids"]).loss.backward()
    g_dt = {n: p.grad for n, p in dt.named_parameters() if p.requires_grad}
    g_pf = {n: p.grad for n, p in pf.named_parameters() if p.requires_grad}
    assert sorted(g_dt) == sorted(g_pf)
    for n, grad in g_pf.items():
        assert g_dt[n] is not None, n
        torch.testing.assert_close(g_dt[n], grad, atol=1e-6, rtol=1e-4, msg=n)


def test_dropout_branch_gradcheck():
    """With a fixed mask (seed reset before each call), the dropout branch's backward is the true derivative."""
    torch.manual_seed(0)
    pm = get_peft_model(Holder(nn.Linear(6, 5)), LoraConfig(target_modules=["layer"], r=2, lora_dropout=0.5,
                                                            init_lora_weights=False)).double().train()
    layer = pm.base_model.model.layer
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(2, 3, 6, dtype=torch.double, requires_grad=True)

    def f(x, a, b):
        torch.manual_seed(1234)
        return torch.func.functional_call(layer, {"lora_A.default.weight": a, "lora_B.default.weight": b}, (x,))

    a0, b0 = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x, a0, b0))
    # ... and the branch really drops: two seeds give different outputs in train mode.
    torch.manual_seed(1)
    y1 = pm(x)
    torch.manual_seed(2)
    y2 = pm(x)
    assert not torch.allclose(y1, y2)
    # Eval mode: no dropout, deterministic.
    pm.eval()
    torch.testing.assert_close(pm(x), pm(x))


def test_dora_input_and_magnitude_gradcheck():
    """DoRA's norm is detached w.r.t. A and B, but not involved for x and m: gradcheck those exactly."""
    torch.manual_seed(0)
    pm = get_peft_model(Holder(nn.Linear(6, 5)), LoraConfig(target_modules=["layer"], r=2, use_dora=True,
                                                            init_lora_weights=False)).double().eval()
    layer = pm.base_model.model.layer
    m0 = layer.lora_magnitude_vector["default"].weight.detach().clone().requires_grad_()
    x = torch.randn(2, 3, 6, dtype=torch.double, requires_grad=True)

    def f(x, m):
        return torch.func.functional_call(layer, {"lora_magnitude_vector.default.weight": m}, (x,))

    assert torch.autograd.gradcheck(f, (x, m0))
