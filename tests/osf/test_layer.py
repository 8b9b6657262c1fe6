"""OSF layers against reference math (Linear of each shape, GPT-2's Conv1D), against peft's own layer on the same
tensors (outputs, ΔW, merged weight and the projected gradients), identity at init, the continual-learning property
(training leaves the high subspace alone), effective_rank resolution, default targets, merge/unmerge, several
adapters, PEFT's refusals, files both ways with peft, and ``deltatune train --method osf``.

The reference is written here from the SVD of ``W`` computed in float64: the frozen high part plus the low part at
init must give ``W`` back, and the adapted layer computes ``W + U_low diag(S_low) V_low − U₀ diag(S₀) V₀``.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from support import tinymodels
from support.family_checks import check_model_contract, check_two_adapters
from support.layers import base_output, layer_and_input
from support.models import make_inputs, output, perturb_trainable, tiny_gpt2, tiny_llama
from torch import nn

import deltatune
from deltatune import OSFConfig, OSFLayer, OSFModel, PeftModel, get_peft_model
from deltatune.cli import main
from deltatune.errors import ConfigError

ATOL = 1e-5
DIMS = {"tall": (8, 16), "wide": (16, 8), "square": (12, 12)}  # (in, out)


def _adapt(dims=(16, 12), seed: int = 0, **config):
    model, x = layer_and_input("linear", seed=seed, dims=dims)
    config.setdefault("effective_rank", 5)
    pm = get_peft_model(model, OSFConfig(target_modules=["layer"], **config))
    return pm, pm.base_model.model.layer, x


def _delta(layer: nn.Module, name: str = "default") -> torch.Tensor:
    """``U_low diag(S_low) V_low − U₀ diag(S₀) V₀: (out, in)``, in float64, from the paper's sum over directions."""
    p, fr = layer.osf_svd_params[name], layer.osf_frozen[name]
    now = torch.einsum("oj,j,ji->oi", p["U_low"].double(), p["S_low"].double(), p["V_low"].double())
    was = torch.einsum("oj,j,ji->oi", fr.U_low_init.double(), fr.S_low_init.double(), fr.V_low_init.double())
    return (now - was).float()


@pytest.mark.parametrize("shape", DIMS)
def test_split_reconstructs_the_weight_and_the_layer_matches_reference(shape):
    pm, layer, x = _adapt(DIMS[shape])
    assert isinstance(layer, OSFLayer) and isinstance(pm.base_model, OSFModel)
    w = layer.base_layer.weight.detach().double()
    m = min(w.shape)
    fr, p = layer.osf_frozen["default"], layer.osf_svd_params["default"]
    assert p["U_low"].shape == (w.shape[0], m - 5) and p["S_low"].shape == (m - 5,) and p["V_low"].shape == (m - 5,
                                                                                                             w.shape[1])
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    high = u[:, :5] @ torch.diag(s[:5]) @ vh[:5]
    low = fr.U_low_init.double() @ torch.diag(fr.S_low_init.double()) @ fr.V_low_init.double()
    torch.testing.assert_close(high + low, w, atol=1e-5, rtol=0)  # the two parts are W
    torch.testing.assert_close(fr.S_low_init.double(), s[5:], atol=1e-5, rtol=1e-5)
    # PEFT keeps the high basis only where the low one at init cannot span its complement
    assert (fr.U_high is not None) == (shape == "tall") and (fr.V_high is not None) == (shape == "wide")
    torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x), atol=1e-5, rtol=0)  # identity at init
    perturb_trainable(pm, seed=1, std=0.2)
    torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x, _delta(layer)), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(layer.get_delta_weight("default"), _delta(layer), atol=1e-6, rtol=1e-5)


def _peft_twin(dims, **config):
    model, _ = layer_and_input("linear", dims=dims)
    config.setdefault("effective_rank", 5)
    return peft.get_peft_model(model, peft.OSFConfig(target_modules=["layer"], **config))


@pytest.mark.parametrize("shape", DIMS)
def test_equals_peft_layer_forward_merge_and_projected_gradients(shape):
    pm, layer, x = _adapt(DIMS[shape])
    theirs = _peft_twin(DIMS[shape])
    their_layer = theirs.base_model.model.layer
    for name in ("U_low_init", "S_low_init", "V_low_init"):
        torch.testing.assert_close(getattr(layer.osf_frozen["default"], name),
                                   getattr(their_layer, f"_osf_{name}")["default"], atol=0, rtol=0)
    perturb_trainable(pm, seed=2, std=0.2)
    their_layer.osf_svd_params["default"].load_state_dict(layer.osf_svd_params["default"].state_dict())
    pm.train(), theirs.train()
    target = torch.randn(3, 5, DIMS[shape][1])
    for model in (pm, theirs):
        F.mse_loss(model(x=x), target).backward()
    for name in ("U_low", "S_low", "V_low"):
        ours, want = layer.osf_svd_params["default"][name].grad, their_layer.osf_svd_params["default"][name].grad
        torch.testing.assert_close(ours, want, atol=1e-7, rtol=1e-5, msg=name)
    pm.eval(), theirs.eval()
    torch.testing.assert_close(output(pm, {"x": x}), output(theirs, {"x": x}), atol=ATOL, rtol=1e-5)
    pm.merge_adapter()
    theirs.merge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, their_layer.base_layer.weight, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", DIMS)
def test_training_leaves_the_high_subspace_alone(shape):
    """The continual-learning property: with the projected gradients, ``U_low`` stays orthogonal to ``U_high`` and
    ``V_low`` to ``V_high``, so ``U_highᵀ W' V_highᵀ = diag(S_high)`` after any number of steps."""
    pm, layer, x = _adapt(DIMS[shape])
    w = layer.base_layer.weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    u_high, v_high = u[:, :5], vh[:5]
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    target = torch.randn(3, 5, DIMS[shape][1])
    pm.train()
    for _ in range(5):
        opt.zero_grad()
        F.mse_loss(pm(x=x), target).backward()
        opt.step()
    p = layer.osf_svd_params["default"]
    assert (p["U_low"].detach() - layer.osf_frozen["default"].U_low_init).abs().max() > 1e-3  # it did move
    assert (u_high.T @ p["U_low"].detach().double()).abs().max() < 1e-5
    assert (p["V_low"].detach().double() @ v_high.T).abs().max() < 1e-5
    merged = w + layer.get_delta_weight("default").detach().double()
    torch.testing.assert_close(u_high.T @ merged @ v_high.T, torch.diag(s[:5]), atol=1e-5, rtol=0)


def test_init_weights_false_draws_the_factors():
    pm, layer, x = _adapt(init_weights=False)
    fr, p = layer.osf_frozen["default"], layer.osf_svd_params["default"]
    assert not torch.allclose(p["U_low"], fr.U_low_init)
    assert (output(pm, {"x": x}) - base_output(layer, x)).abs().max() > 1e-2
    torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x, _delta(layer)), atol=ATOL, rtol=1e-5)


def test_merge_unmerge_and_disable_give_the_base_back():
    """Beyond PEFT, which refuses to unmerge: the merged ``ΔW`` is subtracted again."""
    pm, layer, x = _adapt()
    perturb_trainable(pm, seed=3, std=0.2)
    pm.eval()
    w0, expected = layer.base_layer.weight.detach().clone(), output(pm, {"x": x})
    with pm.disable_adapter():
        torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x), atol=0, rtol=0)
    pm.merge_adapter()
    torch.testing.assert_close(output(pm, {"x": x}), expected, atol=ATOL, rtol=1e-5)
    pm.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)
    pm.add_adapter("other", OSFConfig(target_modules=["layer"], effective_rank=8, init_weights=False))
    pm.base_model.set_adapter(["default", "other"])
    torch.testing.assert_close(output(pm, {"x": x}), base_output(layer, x, _delta(layer) + _delta(layer, "other")),
                               atol=ATOL, rtol=1e-5)


# ---- config, ranks, targets and PEFT's refusals ------------------------------------------------------

def test_config_fields_and_defaults_match_peft():
    ours, theirs = OSFConfig().to_dict(), peft.OSFConfig().to_dict()
    assert set(ours) | {"peft_version"} == set(theirs)
    for key, value in ours.items():
        if key != "peft_type":
            assert value == theirs[key], key
    assert ours["peft_type"] == "OSF"


@pytest.mark.parametrize("given,want", [(None, 6), (0.5, 6), (1.0, 12), (3, 3), (3.0, 3), (40, 12),
                                        ({"lay": 2}, 2), ({"^lay": 0.25, "layer": 7}, 3), ({"nomatch": 1}, 5)])
def test_effective_rank_resolution_as_peft(given, want):
    """``None``: half of min(out, in); a float in (0, 1]: that fraction; else an int, clamped to min(out, in);
    ``rank_pattern``: the first regex found in the module name (else ``effective_rank``, 5 here)."""
    config = {"rank_pattern": given} if isinstance(given, dict) else {"effective_rank": given}
    _, layer, _ = _adapt(**config)
    theirs = _peft_twin((16, 12), **config).base_model.model.layer
    assert layer.effective_rank["default"] == theirs.effective_rank["default"] == want


def test_zero_effective_rank_refused_with_peft_sentence():
    with pytest.raises(ValueError, match="`effective_rank` should be a positive integer value but the value passed "
                                         "is 0"):
        _adapt(effective_rank=0)
    with pytest.raises(ConfigError, match="effective_rank"):
        OSFConfig(effective_rank="half")


def test_default_targets_every_projection_else_all_linear():
    model = get_peft_model(tiny_llama(), OSFConfig(task_type="CAUSAL_LM"))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, OSFLayer)}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    assert sum(isinstance(m, OSFLayer) for m in get_peft_model(net, OSFConfig()).modules()) == 2


def test_unsupported_layer_type_is_refused():
    with pytest.raises(ValueError, match="Embedding"):
        get_peft_model(layer_and_input("embedding")[0], OSFConfig(target_modules=["layer"]))


# ---- whole models, files and the CLI -------------------------------------------------------------

def test_model_contract_gpt2(tmp_path):
    """Beyond PEFT (which skips ``Conv1D``): GPT-2's projections, the SVD of the ``(out, in)`` view."""
    check_model_contract(tiny_gpt2, "gpt2", lambda: OSFConfig(effective_rank=0.75, target_modules=["c_attn", "c_fc"]),
                         "osf_", tmp_path)


def test_two_named_adapters(tmp_path):
    check_two_adapters(tiny_llama, "llama", OSFConfig(effective_rank=0.75),
                       OSFConfig(effective_rank=4, target_modules=["q_proj", "down_proj"]), tmp_path)


def test_files_cross_both_ways_with_peft_with_rank_pattern(tmp_path):
    inputs = make_inputs("llama")
    options = {"effective_rank": 0.5, "rank_pattern": {r"mlp\.": 24, "k_proj": 4}, "task_type": "CAUSAL_LM"}
    ours = get_peft_model(tiny_llama(), OSFConfig(**options))
    perturb_trainable(ours, seed=5, std=0.05)
    ours.eval().save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(output(theirs, inputs), output(ours, inputs), atol=ATOL, rtol=0)

    made = peft.get_peft_model(tiny_llama(), peft.OSFConfig(**options))
    perturb_trainable(made, seed=6, std=0.05)
    made.eval().save_pretrained(tmp_path / "theirs")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs")
    torch.testing.assert_close(output(loaded, inputs), output(made, inputs), atol=ATOL, rtol=0)
    torch.testing.assert_close(output(loaded.merge_and_unload(), inputs), output(made.merge_and_unload(), inputs),
                               atol=ATOL, rtol=1e-4)


FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "4", "--eval-batch-size", "4", "--max-steps", "1",
        "--no-eval-before", "--eval-samples", "4", "--forgetting-tokens", "0"]


def test_train_with_method_osf_writes_peft_files(capsys, tmp_path):
    model_dir = tinymodels.make_llama(str(tmp_path / "llama"))
    tinymodels.write_jsonl(str(tmp_path / "pc.jsonl"), tinymodels.prompt_records(24))
    out = tmp_path / "run"
    code = main([str(a) for a in ("train", "--model", model_dir, "--data", tmp_path / "pc.jsonl", "--output-dir", out,
                                  "--method", "osf", "--effective-rank", "0.75", *FAST)])
    assert code == 0, capsys.readouterr().err
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["effective_rank"]) == ("OSF", 0.75)
    with open(out / "summary.json") as fh:
        assert json.load(fh)["trainable_params"] > 0
    assert isinstance(deltatune.PeftConfig.from_pretrained(out), OSFConfig)
