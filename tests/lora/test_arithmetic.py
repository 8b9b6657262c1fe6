"""``add_weighted_adapter``: every combination type equals Hugging Face PEFT 0.21.2's on the same adapters.

Both libraries get the same base model and the same (randomised) adapter tensors; each then combines them.
The new adapter's tensors must be bit-identical: the deterministic types because the math is the same, the
DARE types because both draw the Bernoulli masks from torch's global RNG in the same order after the same
``torch.manual_seed`` (the new adapter's injection consumes the RNG identically too). The math is also
checked against a direct reference (``B A`` of ``cat``/``svd`` equals ``Σ w_i s_i B_i A_i``), including layer
types where PEFT's SVD path does not work (Conv1d/Conv3d).
"""

from __future__ import annotations

import math
import warnings

import peft
import pytest
import torch
from support.models import assert_same_state, make_inputs, output, params_snapshot, tiny_gpt2, tiny_llama, tiny_net

import deltatune
from deltatune.core import merge_utils
from deltatune.errors import AdapterNameError, ConfigError

DETERMINISTIC = ["cat", "linear", "svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd"]
RANDOM = ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"]
MODELS = {  # factory, targets of adapters a and b (c adapts only the first one)
    "llama": (tiny_llama, ["q_proj", "v_proj", "embed_tokens"]),
    "gpt2": (tiny_gpt2, ["c_attn", "wte"]),                # Conv1D (fan_in_fan_out) and Embedding
    "net": (tiny_net, ["lin1", "conv2d", "emb"]),          # Conv2d 3x3
}
WEIGHTS = [0.7, -0.4, 0.5]


def _perturb(model: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def build_pair(factory, specs: list[tuple[str, dict]]):
    """The same base and the same random adapters in PEFT and in deltatune: ``(peft_model, our_model)``."""
    models = []
    for lib in (peft, deltatune):
        model = None
        for name, kwargs in specs:
            config = lib.LoraConfig(init_lora_weights=False, **kwargs)
            if model is None:
                model = lib.get_peft_model(factory(), config, adapter_name=name)
            else:
                model.add_adapter(name, config)
        models.append(model)
    theirs, ours = models
    _perturb(theirs)
    result = ours.load_state_dict(theirs.state_dict(), strict=False)  # same keys in both libraries
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    return theirs, ours


def adapter_tensors(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if f".{name}." in k or k.endswith(f".{name}")}


def three_specs(targets: list[str], **extra) -> list[tuple[str, dict]]:
    return [("a", dict(r=4, lora_alpha=8, target_modules=targets, **extra)),
            ("b", dict(r=4, lora_alpha=16, target_modules=targets, **extra)),
            ("c", dict(r=4, lora_alpha=4, target_modules=targets[:1], **extra))]


def _combine_both(theirs, ours, adapters, weights, how, seed=11, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        theirs.add_weighted_adapter(adapters, weights, "m", combination_type=how, **kwargs)
        torch.manual_seed(seed)
        ours.add_weighted_adapter(adapters, weights, "m", combination_type=how, **kwargs)


@pytest.mark.parametrize("how", DETERMINISTIC + RANDOM)
@pytest.mark.parametrize("kind", list(MODELS))
def test_each_combination_equals_peft_bit_for_bit(kind, how):
    factory, targets = MODELS[kind]
    theirs, ours = build_pair(factory, three_specs(targets))
    kwargs = {} if how in ("cat", "linear", "svd") else {"density": 0.5}
    _combine_both(theirs, ours, ["a", "b", "c"], WEIGHTS, how, **kwargs)
    want, got = adapter_tensors(theirs, "m"), adapter_tensors(ours, "m")
    assert want.keys() == got.keys() and want
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert ours.peft_config["m"].r == theirs.peft_config["m"].r
    assert set(ours.peft_config["m"].target_modules) == set(theirs.peft_config["m"].target_modules)
    assert ours.active_adapter == "a"  # the new adapter is not made active (as PEFT)
    theirs.set_adapter("m")
    ours.set_adapter("m")
    inputs = make_inputs(kind)
    torch.testing.assert_close(output(ours, inputs), output(theirs, inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how, kwargs", [
    ("svd", {"svd_clamp": 0.9}),
    ("svd", {"svd_rank": 3, "svd_full_matrices": False}),
    ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("dare_ties_svd", {"density": 0.7, "majority_sign_method": "frequency", "svd_rank": 2}),
    ("magnitude_prune", {"density": 1.0}),   # nothing pruned (PEFT warns)
    ("ties", {"density": 0.0}),              # everything pruned: a zero update
])
def test_options_equal_peft(how, kwargs):
    theirs, ours = build_pair(tiny_llama, three_specs(["q_proj", "embed_tokens"]))
    _combine_both(theirs, ours, ["a", "b", "c"], WEIGHTS, how, **kwargs)
    want, got = adapter_tensors(theirs, "m"), adapter_tensors(ours, "m")
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


def _delta(model, module: str, name: str) -> torch.Tensor:
    layer = model.get_submodule(module)
    return layer.get_delta_weight(name).detach()


@pytest.mark.parametrize("how", ["cat", "svd"])
def test_cat_and_full_rank_svd_give_the_exact_weighted_sum_also_on_conv1d_conv3d(how):
    """``cat`` is exact by construction; ``svd`` with rank >= the sum of ranks loses nothing. Conv1d/Conv3d:
    PEFT's SVD path handles Conv2d only, so these layers are checked against the reference sum alone."""
    targets = ["conv1d", "conv3d", "lin1", "emb"]
    model = deltatune.get_peft_model(tiny_net(), deltatune.LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                                                      init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", deltatune.LoraConfig(r=3, lora_alpha=3, target_modules=targets, init_lora_weights=False))
    _perturb(model)
    model.add_weighted_adapter(["a", "b"], [0.6, -1.3], "m", combination_type=how, svd_rank=5)
    assert model.peft_config["m"].r == 5
    for module in ["base_model.model." + t for t in targets]:
        want = 0.6 * _delta(model, module, "a") + -1.3 * _delta(model, module, "b")
        torch.testing.assert_close(_delta(model, module, "m"), want, rtol=1e-4, atol=5e-5)  # SVD rounding


def test_linear_combines_the_factors_with_signed_square_roots():
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                        init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", deltatune.LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj"],
                                                init_lora_weights=False))
    _perturb(model)
    model.add_weighted_adapter(["a", "b"], [2.0, -0.5], "m", combination_type="linear")
    layer = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    wa, wb = 2.0 * 2.0, -0.5 * 0.5  # weight · scaling (8/4, 2/4)
    a = math.sqrt(wa) * layer.lora_A["a"].weight - math.sqrt(-wb) * layer.lora_A["b"].weight
    b = math.sqrt(wa) * layer.lora_B["a"].weight + math.sqrt(-wb) * layer.lora_B["b"].weight
    torch.testing.assert_close(layer.lora_A["m"].weight, a)
    torch.testing.assert_close(layer.lora_B["m"].weight, b)
    assert layer.scaling["m"] == 1.0


def test_one_adapter_is_always_linear_and_negation_subtracts_it():
    theirs, ours = build_pair(tiny_llama, three_specs(["q_proj", "v_proj"])[:1])
    _combine_both(theirs, ours, ["a"], [-1.0], "svd")  # a single adapter: PEFT switches to linear
    for key, value in adapter_tensors(theirs, "m").items():
        assert torch.equal(value, ours.state_dict()[key])
    module = "base_model.model.model.layers.1.self_attn.v_proj"
    torch.testing.assert_close(_delta(ours, module, "m"), -_delta(ours, module, "a"))


def test_different_ranks_cat_sums_svd_takes_max_and_rank_pattern_is_padded(tmp_path):
    theirs, ours = build_pair(tiny_llama, [("a", dict(r=2, target_modules=["q_proj"])),
                                          ("b", dict(r=6, target_modules=["q_proj"]))])
    _combine_both(theirs, ours, ["a", "b"], [1.0, 1.0], "cat")
    assert ours.peft_config["m"].r == 8
    for key, value in adapter_tensors(theirs, "m").items():
        assert torch.equal(value, ours.state_dict()[key])
    ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "s", combination_type="svd")
    assert ours.peft_config["s"].r == 6
    with pytest.raises(ConfigError, match="same rank"):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "x", combination_type="ties", density=0.5)
    assert "x" not in ours.peft_config

    # rank_pattern: q_proj has rank 2 inside r=4 adapters. Equal ranks, so `linear` works; the rank-2 factors are
    # zero-padded into the rank-4 result (PEFT would write rank-2 tensors under r=4, which do not load back).
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2}, init_lora_weights=False),
        adapter_name="a")
    model.add_adapter("b", deltatune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2},
                                                init_lora_weights=False))
    _perturb(model)
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "m", combination_type="linear")
    layer = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert layer.lora_A["m"].weight.shape[0] == 4 and not layer.lora_A["m"].weight[2:].any()
    model.save_pretrained(tmp_path, selected_adapters=["m"])
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "m")
    model.set_adapter("m")
    inputs = make_inputs("llama")
    torch.testing.assert_close(output(loaded, inputs), output(model, inputs), rtol=1e-5, atol=1e-6)


def test_combined_adapter_saves_and_loads_in_peft(tmp_path):
    _, ours = build_pair(tiny_gpt2, three_specs(["c_attn", "wte"]))
    ours.add_weighted_adapter(["a", "b", "c"], WEIGHTS, "mix", combination_type="ties_svd", density=0.6)
    ours.save_pretrained(tmp_path, selected_adapters=["mix"])
    loaded = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "mix")
    ours.set_adapter("mix")
    inputs = make_inputs("gpt2")
    torch.testing.assert_close(output(loaded, inputs), output(ours, inputs), rtol=1e-5, atol=1e-6)
    with ours.disable_adapter():
        base = output(ours, inputs)
    assert not torch.allclose(output(ours, inputs), base, atol=1e-3)


def test_rslora_sources_give_scaling_one():
    """PEFT keeps use_rslora on the combined adapter, so its scaling becomes sqrt(r) instead of 1; ours is exact."""
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj"], init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", deltatune.LoraConfig(r=4, lora_alpha=2, use_rslora=True, target_modules=["q_proj"],
                                                init_lora_weights=False))
    _perturb(model)
    model.add_weighted_adapter(["a", "b"], [0.3, 0.9], "m", combination_type="cat")
    assert model.peft_config["m"].use_rslora is False
    module = "base_model.model.model.layers.1.self_attn.q_proj"
    want = 0.3 * _delta(model, module, "a") + 0.9 * _delta(model, module, "b")
    torch.testing.assert_close(_delta(model, module, "m"), want, rtol=1e-5, atol=1e-6)


# ---- the tensor ops on golden values ------------------------------------------------------------
def test_merge_utils_golden_values():
    t1 = torch.tensor([3.0, -1.0, 0.5, -4.0])
    t2 = torch.tensor([-2.0, 2.0, 0.25, -1.0])
    w = torch.tensor([1.0, 0.5])
    assert torch.equal(merge_utils.prune_by_magnitude(t1, 0.5), torch.tensor([3.0, 0.0, 0.0, -4.0]))
    torch.testing.assert_close(merge_utils.combine([t1, t2], w, "linear"), torch.tensor([2.0, 0.0, 0.625, -4.5]))
    # ties, density 0.5: t1 -> [3, 0, 0, -4], t2 -> [-2, 2, 0, 0]; total signs [+, +, +(tie), -];
    # kept & weighted: [3 | -], [- | 1], [-], [-4 | -] -> means [3, 1, 0, -4]
    torch.testing.assert_close(merge_utils.combine([t1, t2], w, "ties", density=0.5),
                               torch.tensor([3.0, 1.0, 0.0, -4.0]))
    # frequency: position 0 has one + and one -: a tie elects +, so t2's -2 is dropped there as well
    mask = merge_utils.majority_sign_mask(torch.stack([t1, t2]), "frequency")
    assert mask.tolist() == [[True, False, True, True], [False, True, True, True]]


def test_dare_keeps_the_expectation_and_the_density():
    torch.manual_seed(0)
    t = torch.full((200_000,), 2.0)
    out = merge_utils.prune(t, 0.3, "random", rescale=True)
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.005
    assert abs(out.mean().item() - 2.0) < 0.03
    values = out.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(2.0 / 0.3)


# ---- errors: clear, and the model is unchanged ---------------------------------------------------
def _two_adapters(**b_kwargs):
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(r=4, target_modules=["q_proj"]),
                                     adapter_name="a")
    model.add_adapter("b", deltatune.LoraConfig(**{"r": 4, "target_modules": ["q_proj"], **b_kwargs}))
    return model


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((["a", "zz"], [1, 1], "m"), {}, AdapterNameError, "no adapter named 'zz'"),
    ((["a", "b"], [1.0], "m"), {}, ConfigError, "2 adapters but 1 weights"),
    (([], [], "m"), {}, ConfigError, "at least one adapter"),
    ((["a", "b"], [1, 1], "a"), {}, AdapterNameError, "already exists"),
    ((["a", "b"], [1, 1], "m"), {"combination_type": "mean"}, ConfigError, "combination_type='mean' is unknown"),
    ((["a", "b"], [1, 1], "m"), {"combination_type": "ties"}, ConfigError, "pass density"),
    ((["a", "b"], [1, 1], "m"), {"combination_type": "dare_linear", "density": 0}, ConfigError, "1/0"),
    ((["a", "b"], [1, 1], "m"), {"combination_type": "ties_svd", "density": 1.5}, ConfigError, r"in \[0, 1\]"),
    ((["a", "b"], [1, 1], "m"), {"combination_type": "ties", "density": 0.5, "majority_sign_method": "max"},
     ConfigError, "'total' or 'frequency'"),
    ((["a", "b"], [1, 1], "m"), {"svd_rank": 0}, ConfigError, "svd_rank"),
    ((["a", "b"], [1, 1], "m"), {"svd_clamp": 2.0}, ConfigError, "svd_clamp"),
])
def test_bad_arguments_raise_and_change_nothing(args, kwargs, error, match):
    model = _two_adapters()
    before = params_snapshot(model)
    with pytest.raises(error, match=match):
        model.add_weighted_adapter(*args, **kwargs)
    assert_same_state(before, model)
    assert sorted(model.peft_config) == ["a", "b"]


@pytest.mark.parametrize("b_kwargs, match", [
    ({"target_modules": r".*\.q_proj"}, "mix a regex string with a list"),
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, None),   # only b saves lm_head: allowed
])
def test_incompatible_sources(b_kwargs, match):
    model = _two_adapters(**b_kwargs)
    if match is None:
        model.add_weighted_adapter(["a", "b"], [1, 1], "m", combination_type="cat")
        return
    before = params_snapshot(model)
    with pytest.raises(ConfigError, match=match):
        model.add_weighted_adapter(["a", "b"], [1, 1], "m", combination_type="cat")
    assert_same_state(before, model)


def test_shared_modules_to_save_and_uncovered_layers_are_refused():
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(r=4, target_modules=["q_proj"],
                                                                        modules_to_save=["lm_head"]), adapter_name="a")
    model.add_adapter("b", deltatune.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ConfigError, match="modules_to_save"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "m")
    # a selects layer 0 only; the combined config inherits that and would silently drop b's layer-1 update
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(
        r=4, target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers"), adapter_name="a")
    model.add_adapter("b", deltatune.LoraConfig(r=4, target_modules=["q_proj"]))
    before = params_snapshot(model)
    with pytest.raises(ConfigError, match="does not reach it"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "m", combination_type="cat")
    assert_same_state(before, model)
    assert "m" not in model.peft_config


@pytest.mark.parametrize("how", ["cat", "linear", "svd"])
def test_a_joined_target_no_source_adapted_gets_a_zero_update(how):
    """a adapts q_proj everywhere, b adapts v_proj in layer 1 only; the joined config (a's: no layer filter) also
    reaches layer 0's v_proj, where the combination is zero (PEFT raises or fails with an IndexError there)."""
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(r=4, target_modules=["q_proj"],
                                                                        init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", deltatune.LoraConfig(r=4, target_modules=["v_proj"], layers_to_transform=[1],
                                                layers_pattern="layers", init_lora_weights=False))
    _perturb(model)
    model.add_weighted_adapter(["a", "b"], [0.5, 2.0], "m", combination_type=how)
    empty = model.get_submodule("base_model.model.model.layers.0.self_attn.v_proj")
    assert "m" in empty.r and not empty.get_delta_weight("m").any()
    for module, name, weight in [("layers.1.self_attn.v_proj", "b", 2.0), ("layers.0.self_attn.q_proj", "a", 0.5)]:
        module = "base_model.model.model." + module
        # one source per layer: even `linear` is exact (sqrt(w s) B times sqrt(w s) A)
        torch.testing.assert_close(_delta(model, module, "m"), weight * _delta(model, module, name),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind, svd_rank", [("llama", None), ("llama", 3), ("gpt2", None), ("net", 5)])
def test_svd_from_factors_gives_peft_dense_svd_update(kind, svd_rank):
    """deltatune's opt-in fast SVD (QR of the stacked factors, then an R x R SVD) gives the same ``B A`` per layer
    as PEFT's dense SVD, truncated or not (singular vectors may differ in sign, so factors are not compared)."""
    factory, targets = MODELS[kind]
    theirs, ours = build_pair(factory, three_specs(targets))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.add_weighted_adapter(["a", "b", "c"], WEIGHTS, "m", combination_type="svd", svd_rank=svd_rank)
    ours.add_weighted_adapter(["a", "b", "c"], WEIGHTS, "m", combination_type="svd", svd_rank=svd_rank,
                              svd_from_factors=True)
    layers = [name for name, _ in ours.base_model.adapter_layers()]
    assert layers
    for name in layers:
        module = "base_model.model." + name
        want = theirs.get_submodule(module).get_delta_weight("m").detach()
        # float32 SVDs by two routes: agree to ~1e-5 of the update's scale (a truncated one is also sensitive to
        # the gap between the kept and the dropped singular values)
        scale = want.abs().max().item()
        torch.testing.assert_close(_delta(ours, module, "m"), want, rtol=0, atol=1e-4 * scale)
    with pytest.raises(ConfigError, match="svd_from_factors applies to combination_type='svd' only"):
        ours.add_weighted_adapter(["a", "b"], [1, 1], "x", combination_type="ties_svd", density=0.5,
                                  svd_from_factors=True)
