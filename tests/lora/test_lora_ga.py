"""LoRA-GA (``init_lora_weights="lora_ga"``): created by deltatune as by PEFT 0.21.2 (issue 19 item 2).

The same model, batches and seed give PEFT's gradients, factors and residual base; the model's output at creation
is the original's; a trained adapter crosses to and from PEFT with equal logits through
``path_initial_model_for_weight_conversion``; creation without the gradients is refused before the model changes.
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from support.models import (
    assert_same_state,
    make_inputs,
    output,
    params_snapshot,
    perturb_trainable,
    tiny_gpt2,
    tiny_llama,
)

import deltatune as dt
from deltatune.lora.init import get_peft_model_with_data
from deltatune.lora.layer import LoraLinear
from deltatune.lora.lora_ga import GRAD_ATTR

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _batches(seed: int = 3, n: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 100, (2, 9), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def _train_step(model, batches=None):
    def step() -> None:
        for batch in batches or _batches():
            model(**batch).loss.backward()
    return step


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: getattr(m, GRAD_ATTR) for n, m in model.named_modules() if hasattr(m, GRAD_ATTR)}


def _both(factory, kw: dict, ga: dict):
    """PEFT's and deltatune's LoRA-GA adapter on two copies of the same model, from the same batches and seeds."""
    pm, dm = factory(), factory()
    pcfg = peft.LoraConfig(**kw, init_lora_weights="lora_ga", lora_ga_config=peft.LoraGAConfig(**ga))
    dcfg = dt.LoraConfig(**kw, init_lora_weights="lora_ga", lora_ga_config=dt.LoraGAConfig(**ga))
    torch.manual_seed(11)  # GPT-2's dropout is on while the gradients are estimated
    _quiet(peft.preprocess_loraga, pm, pcfg, _train_step(pm))
    torch.manual_seed(11)
    dt.preprocess_loraga(dm, dcfg, _train_step(dm))
    theirs, ours = _grads(pm), _grads(dm)
    assert sorted(ours) == sorted(theirs) and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-7, rtol=0)
    torch.manual_seed(0)  # the randomised SVDs (and "random"'s permutation) draw from the global generator
    pp = _quiet(peft.get_peft_model, pm, pcfg)
    torch.manual_seed(0)
    dp = dt.get_peft_model(dm, dcfg)
    return pp, dp


CASES = {
    "ArB2r-stable": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=TARGETS), {}),
    "ArBr-weight_svd": (tiny_llama, dict(r=4, lora_alpha=16, target_modules=TARGETS),
                        dict(direction="ArBr", scale="weight_svd")),
    "random-gd_scale-rslora": (tiny_llama, dict(r=8, lora_alpha=8, use_rslora=True, target_modules=["k_proj"]),
                               dict(direction="random", scale="gd_scale")),
    "A2rBr-unit-rank_pattern": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=TARGETS,
                                                 rank_pattern={"down_proj": 2}),
                                dict(direction="A2rBr", scale="unit", stable_gamma=4)),
    "gpt2-conv1d-stable": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                           fan_in_fan_out=True), dict(stable_gamma=4)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_gradients_factors_and_residual_base_as_peft(case):
    """Every tensor of the created model (A, B and the rewritten base weights) is PEFT's, and the output is the
    original model's: the residual ``W - s B A`` plus the adapter ``s B A`` is ``W``."""
    factory, kw, ga = CASES[case]
    pp, dp = _both(factory, kw, ga)
    theirs, ours = pp.state_dict(), dp.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in ours:  # gradients of a tiny random model are small: tolerances relative to each tensor
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6 * theirs[key].abs().max().item(), rtol=0,
                                   msg=key)
    original = dict(factory().named_modules())
    layers = [(n, m) for n, m in dp.base_model.model.named_modules() if isinstance(m, LoraLinear)]
    assert layers
    for name, layer in layers:
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert a.shape == (layer.r["default"], layer.in_features) and b.abs().max() > 0  # B is not zero
        delta = layer.scaling["default"] * (b @ a)
        w = original[name].weight
        w = w.T if layer.fan_in_fan_out else w
        # the base holds the residual W - s B A, to fp32 rounding of W
        torch.testing.assert_close(w - layer._base_weight(), delta, atol=1e-7 * w.abs().max().item(),
                                   rtol=1e-4)
        assert delta.abs().max() > 1e-3 * w.abs().max()  # large enough for the check above to mean something
    assert not any(hasattr(m, GRAD_ATTR) for m in dp.modules())  # consumed, as PEFT
    kind = "gpt2" if factory is tiny_gpt2 else "llama"
    inputs = make_inputs(kind)
    torch.testing.assert_close(output(dp.eval(), inputs), output(factory(), inputs), atol=2e-5, rtol=0)


def test_factors_follow_the_gradient_svd():
    """The math on its own: ``A`` = the top right singular vectors of the gradient, ``B`` = the next left ones times
    their singular values and ``out^(1/4) / sqrt(γ)`` (ArB2r, stable), checked against a full SVD."""
    model = tiny_llama()
    cfg = dt.LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights="lora_ga",
                        lora_ga_config={"direction": "ArB2r", "scale": "stable", "stable_gamma": 9})
    dt.preprocess_loraga(model, cfg, _train_step(model))
    grad = model.model.layers[0].self_attn.o_proj._peft_loraga_grad.clone()
    layer = dt.get_peft_model(model, cfg).base_model.model.model.layers[0].self_attn.o_proj
    u, s, vh = torch.linalg.svd(grad, full_matrices=False)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    # singular vectors are defined up to sign: compare each with the sign of its reference
    for i in range(2):
        sign = torch.sign(a[i] @ vh[i])
        torch.testing.assert_close(a[i] * sign, vh[i], atol=1e-4, rtol=0)
        sign = torch.sign(b[:, i] @ u[:, 2 + i])
        torch.testing.assert_close(b[:, i] * sign, u[:, 2 + i] * s[2 + i] * 32 ** 0.25 / 3, atol=1e-4, rtol=0)


def test_created_from_batches_as_peft(tmp_path):
    """``get_peft_model_with_data`` (what the CLI calls) gives PEFT's adapter for the same batches; an unset
    ``lora_ga_config`` becomes the defaults and is saved as PEFT writes it."""
    batches = _batches(seed=8, n=3)
    pm = tiny_llama()
    pcfg = peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="lora_ga",
                           lora_ga_config=peft.LoraGAConfig())
    _quiet(peft.preprocess_loraga, pm, pcfg, _train_step(pm, batches))
    torch.manual_seed(0)
    pp = _quiet(peft.get_peft_model, pm, pcfg)
    model = tiny_llama()  # (it seeds the generator itself)
    torch.manual_seed(0)
    dp = get_peft_model_with_data(model, dt.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="lora_ga"),
                                  batches)
    theirs = pp.state_dict()
    assert sorted(dp.state_dict()) == sorted(theirs)
    for key, value in dp.state_dict().items():
        torch.testing.assert_close(value, theirs[key], atol=1e-6 * theirs[key].abs().max().item(), rtol=0, msg=key)
    dp.save_pretrained(tmp_path)
    loaded = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert loaded.init_lora_weights == "lora_ga"
    assert loaded.lora_ga_config == peft.LoraGAConfig()


def test_trained_adapter_crosses_to_and_from_peft_through_the_conversion(tmp_path):
    """Saved with ``path_initial_model_for_weight_conversion``, a trained LoRA-GA adapter is a plain rank-2r LoRA
    for the original base: PEFT loads deltatune's and deltatune loads PEFT's with the trainer's logits."""
    inputs = make_inputs("llama")
    kw = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="lora_ga")

    # deltatune -> peft
    model = tiny_llama()
    cfg = dt.LoraConfig(**kw, lora_ga_config=dt.LoraGAConfig())
    dt.preprocess_loraga(model, cfg, _train_step(model))
    dp = dt.get_peft_model(model, cfg)
    dp.save_pretrained(tmp_path / "ours_init")
    perturb_trainable(dp, std=0.05)  # stands in for training
    trained = output(dp.eval(), inputs)
    assert (trained - output(tiny_llama(), inputs)).abs().max() > 1e-2
    dp.save_pretrained(tmp_path / "ours", path_initial_model_for_weight_conversion=str(tmp_path / "ours_init"))
    saved = peft.LoraConfig.from_pretrained(str(tmp_path / "ours"))
    assert (saved.r, saved.lora_alpha, saved.init_lora_weights) == (8, 16, True)
    theirs = _quiet(peft.PeftModel.from_pretrained, tiny_llama(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(output(theirs, inputs), trained, atol=1e-5, rtol=0)
    ours = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(output(ours, inputs), trained, atol=1e-5, rtol=0)

    # peft -> deltatune (PEFT's own flow: initial adapter saved right after creation)
    pm = tiny_llama()
    pcfg = peft.LoraConfig(**kw, lora_ga_config=peft.LoraGAConfig())
    _quiet(peft.preprocess_loraga, pm, pcfg, _train_step(pm))
    pp = _quiet(peft.get_peft_model, pm, pcfg)
    _quiet(pp.save_pretrained, str(tmp_path / "theirs_init"))
    perturb_trainable(pp, std=0.05)
    p_trained = output(pp.eval(), inputs)
    _quiet(pp.save_pretrained, str(tmp_path / "theirs"),
           path_initial_model_for_weight_conversion=str(tmp_path / "theirs_init"))
    ours = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs").eval()
    torch.testing.assert_close(output(ours, inputs), p_trained, atol=1e-5, rtol=0)


def test_gradient_cache_is_peft_format(tmp_path):
    """``cache_file``: written once, then read instead of running ``train_step``; PEFT reads deltatune's file."""
    cache = tmp_path / "grads" / "loraga.pt"
    cfg = dt.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="lora_ga", lora_ga_config=dt.LoraGAConfig())
    first = tiny_llama()
    dt.preprocess_loraga(first, cfg, _train_step(first), cache_file=str(cache))
    assert cache.stat().st_size > 0

    def must_not_run() -> None:
        raise AssertionError("train_step ran although the cache exists")

    again, theirs = tiny_llama(), tiny_llama()
    dt.preprocess_loraga(again, cfg, must_not_run, cache_file=str(cache))
    pcfg = peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="lora_ga",
                           lora_ga_config=peft.LoraGAConfig())
    _quiet(peft.preprocess_loraga, theirs, pcfg, must_not_run, cache_file=str(cache))
    expected = _grads(first)
    for got in (_grads(again), _grads(theirs)):
        assert sorted(got) == sorted(expected)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=0, rtol=0)


def test_preprocessing_leaves_the_model_as_it_was():
    """Only the target weights get gradients meanwhile; flags, ``.grad``, mode and weights are restored."""
    model = tiny_llama()
    before = params_snapshot(model)
    model.lm_head.weight.requires_grad_(False)
    cfg = dt.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="lora_ga", lora_ga_config=dt.LoraGAConfig())
    dt.preprocess_loraga(model, cfg, _train_step(model))
    assert not model.training
    assert_same_state(before, model)
    assert all(p.grad is None for p in model.parameters())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert flags.pop("lm_head.weight") is False and all(flags.values())
    assert len(_grads(model)) == 2 * len(TARGETS)


def test_creation_refused_before_the_model_changes():
    """Without the gradients (``preprocess_loraga`` not run, or run for other targets), with a rank the gradient
    cannot give, or without ``lora_ga_config`` (PEFT's ``ValueError`` too), nothing is created or changed."""
    kw = dict(r=4, target_modules=TARGETS, init_lora_weights="lora_ga")
    model = tiny_llama()
    before = params_snapshot(model)
    with pytest.raises(dt.ConfigError, match="preprocess_loraga"):
        dt.get_peft_model(model, dt.LoraConfig(**kw, lora_ga_config=dt.LoraGAConfig()))
    assert_same_state(before, model)

    partial = dt.LoraConfig(**{**kw, "target_modules": ["q_proj", "k_proj"]}, lora_ga_config=dt.LoraGAConfig())
    dt.preprocess_loraga(model, partial, _train_step(model))
    with pytest.raises(dt.ConfigError, match=r"no gradient for 4 targeted layer\(s\): model.layers.0.self_attn.v_proj"):
        dt.get_peft_model(model, dt.LoraConfig(**kw, lora_ga_config=dt.LoraGAConfig()))
    with pytest.raises(dt.ConfigError, match=r"2r = 18 .* use r <= 8"):
        dt.get_peft_model(model, dt.LoraConfig(**{**kw, "target_modules": ["k_proj"], "r": 9},
                                               lora_ga_config=dt.LoraGAConfig()))
    assert_same_state(before, model)
    assert len(_grads(model)) == 4  # still there for a corrected call

    # no lora_ga_config: PEFT's preprocessing raises ValueError, and so do deltatune's and its creation
    with pytest.raises(ValueError, match="lora_ga_config"):
        _quiet(peft.preprocess_loraga, tiny_llama(), peft.LoraConfig(**kw), lambda: None)
    with pytest.raises(ValueError, match="lora_ga_config"):
        dt.preprocess_loraga(tiny_llama(), dt.LoraConfig(**kw), lambda: None)
    with pytest.raises(dt.ConfigError, match="lora_ga_config"):
        dt.get_peft_model(model, dt.LoraConfig(**kw))
    with pytest.raises(dt.ConfigError, match="direction='AB'"):
        dt.LoraGAConfig(direction="AB")
    assert_same_state(before, model)
